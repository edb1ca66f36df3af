"""Which model the inputs of a combination say they belong to.

The result takes the first input's config (ops.combine.many.result), so its `base_model_name_or_path`,
`revision` and `task_type` are the first input's. Inputs that name another model are combined as asked (a
LoRA trained on a fine-tune of a base applies to that base too), with one AdapterNote per field saying
which input named what, so a user who mixed up models hears of it. O(1) memory in the number of inputs."""

from __future__ import annotations

from collections.abc import Mapping

from lorafuse.errors import AdapterNote, warn

FIELDS = ("base_model_name_or_path", "revision", "task_type")


class Identities:
    """The first input's value of each field, and the first later input that names another value."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[object, str]] | None = None
        self._other: dict[str, tuple[object, str]] = {}

    def see(self, config: Mapping[str, object], label: str) -> None:
        if self._first is None:
            self._first = {f: (config.get(f), label) for f in FIELDS}
            return
        for f in FIELDS:
            value = config.get(f)
            if value is not None and f not in self._other and value != self._first[f][0]:
                self._other[f] = (value, label)

    def note(self) -> None:
        if self._first is None:
            return
        for f, (value, label) in self._other.items():
            kept, first = self._first[f]
            said = "names none" if kept is None else f"names {kept!r}"
            warn(f"the adapters name different {f}: {first} {said}, {label} names {value!r}; they are combined as "
                 f"asked, and the result's config keeps the first adapter's ({kept!r}): edit it if the result "
                 "belongs to another model", AdapterNote)

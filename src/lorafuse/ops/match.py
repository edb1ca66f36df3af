"""Map canonical module names onto the keys of a base checkpoint.

`model.layers.0.self_attn.q_proj` -> `model.layers.0.self_attn.q_proj.weight`
when that key exists; otherwise the name may carry a prefix the checkpoint lacks
(`model.` of a ...ForCausalLM adapter against a bare model), or lack one the
checkpoint has. A unique match wins; several are reported as ambiguous.
"""

from __future__ import annotations

from collections.abc import Iterable

from lorafuse.errors import MissingModuleError


class BaseMatcher:
    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)
        self._by_suffix: dict[str, list[str]] = {}
        for k in self.keys:
            parts = k.split(".")
            for i in range(1, len(parts)):
                self._by_suffix.setdefault(".".join(parts[i:]), []).append(k)

    def find(self, key: str) -> str | None:
        """The checkpoint key for `key` (a full tensor name such as `x.q_proj.weight`), or None."""
        if key in self.keys:
            return key
        found = self._by_suffix.get(key, [])
        if len(found) > 1:
            raise MissingModuleError(f"{key!r} matches several base keys: {', '.join(sorted(found)[:4])}")
        if found:
            return found[0]
        parts = key.split(".")
        for i in range(1, len(parts) - 1):
            shorter = ".".join(parts[i:])
            if shorter in self.keys:
                return shorter
        return None

    def weight(self, module: str) -> str | None:
        return self.find(module + ".weight")

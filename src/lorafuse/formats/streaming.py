"""Adapters written module by module (streamed outputs), and the one write path every format's save uses.

A format turns an adapter into a `WritePlan`: its configs, the safetensors header (every tensor's name,
dtype and shape, in file order), the metadata, and a function giving one module's tensors. The plan
needs no factor values, so it can be made from the output's layout alone (model.layout: placeholder
updates that hold no memory) before anything is computed; `StreamWriter` then takes the updates in any
order (`put`), writes each module's tensors at their place in the file (SafetensorsWriter.write_at) and
keeps nothing of them: an operation holds one group of modules, not the whole output. `Adapter.save`
goes the same way with the adapter's own updates, so both write the same bytes.

The output follows io.atomic's rules: it is written under a temporary name beside `out` and renamed
into place by `close()` once every module was put (with lorafuse_manifest.json for a folder, the
`lorafuse_version` mark for a file); an error, a KeyboardInterrupt or `abort()` before that removes it
and leaves `out` as it was.

    with open_stream("kohya", out, layout, template, inputs=sources) as w:
        for name, update in computed:
            w.put(name, update)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from lorafuse.errors import FormatError, LorafuseValueError, UnsupportedError
from lorafuse.io.atomic import atomic_dir, atomic_file
from lorafuse.io.manifest import ADAPTER
from lorafuse.io.provenance import Provenance
from lorafuse.io.safetensors import SafetensorsWriter, TensorSpec
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, Update
from lorafuse.model.layout import AdapterLayout, ModuleLayout
from lorafuse.model.names import check_module_name
from lorafuse.model.registry import get_format

_CHUNK = 16 << 20  # bytes read at a time when a plan's finish hashes the written data


@dataclass(frozen=True)
class WritePlan:
    """What a format writes for an adapter, known before any factor value is.

    `specs`: the weights file's tensors in header order; `metadata`: its `__metadata__` (values that
    depend on the data, such as kohya's hashes, as same-length placeholders that `finish` replaces:
    finish gets a function giving the written data buffer's bytes and returns the final metadata);
    `module_tensors(name, update)`: one module's tensors, named as in `specs`; `fixed`: tensors known
    beforehand (PEFT's full tensors), written first. A folder output (`folder_kind`, its manifest kind)
    holds the weights file `weights_name` and the text files `side_files`; else the output is the
    weights file itself."""

    label: str
    modules: list[str]
    specs: list[TensorSpec]
    metadata: dict[str, str]
    module_tensors: Callable[[str, Update], Mapping[str, Tensor]]
    fixed: Mapping[str, Tensor] = field(default_factory=dict)
    folder_kind: str | None = None
    weights_name: str = ""
    side_files: Mapping[str, str] = field(default_factory=dict)
    finish: Callable[[Callable[[], Iterator[memoryview]]], dict[str, str]] | None = None

    def __post_init__(self) -> None:
        """Refuse, before anything is computed or written, a module or tensor name that lorafuse's own readers
        refuse (model.names.check_module_name: empty, with a path separator, an empty dotted component or a
        control character; such as a checkpoint's tensor '.weight' or 'a..b.weight' that extract would turn into
        a module): the output could not be read back."""
        try:
            for name in self.modules:
                check_module_name(name, self.label)
            for key in self.fixed:
                check_module_name(key, self.label, "tensor")
        except FormatError as e:
            raise UnsupportedError(f"{e}: lorafuse does not write it, as no reader (lorafuse's, PEFT's, diffusers') "
                                   "would read the output back; leave it out (extract: --exclude)") from None


def specs_of(tensors: Mapping[str, Tensor]) -> list[TensorSpec]:
    """The header entries of named tensors, in their order (reads no tensor's values)."""
    return [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]


def _listed(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class StreamWriter:
    """One output being written from a WritePlan: `put` every module (any order, each once), then
    `close()`; as a context manager it closes on success and aborts on an exception. With a `layout`,
    each update is checked against its entry before anything of it is written."""

    def __init__(self, plan: WritePlan, out: str | os.PathLike[str], inputs: Sequence[Path] = (),
                 overwrite: bool = False, layout: AdapterLayout | None = None,
                 final: Callable[[], WritePlan] | None = None) -> None:
        self.out = Path(out)
        self._plan = plan
        self._layout = layout
        # `final`: the plan again once values known only at the end are (the inputs' sha256, computed while the
        # modules are): its metadata (same-length placeholders replaced) and side files are written at the commit
        self._final = final
        self._folder: Path | None = None
        self._pending: dict[str, None] = dict.fromkeys(plan.modules)
        self._closed = False
        self._stack = ExitStack()
        try:
            if plan.folder_kind is not None:
                tmp = self._stack.enter_context(atomic_dir(out, inputs, overwrite=overwrite, kind=plan.folder_kind))
                self._folder = tmp
                self._write_side_files(plan)
                self._path = tmp / plan.weights_name
            else:
                self._path = self._stack.enter_context(atomic_file(out, inputs, overwrite=overwrite, kind=ADAPTER))
            # entered last, left first: close() checks that every tensor was written before the commit
            self._file = self._stack.enter_context(SafetensorsWriter(self._path, plan.specs, plan.metadata))
            for key, t in plan.fixed.items():
                self._file.write_at(key, t.raw)
        except BaseException as e:
            self._closed = True
            self._unwind(e)
            raise

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
        elif not self._closed:
            self._closed = True
            self._stack.__exit__(exc_type, exc, tb)  # removes the temporary output; the exception goes on

    def _unwind(self, e: BaseException) -> None:
        """Leave the output's contexts with `e` (the temporary output is removed); an error of the cleanup
        itself (an OutputError) propagates instead."""
        self._stack.__exit__(type(e), e, e.__traceback__)

    @property
    def pending(self) -> list[str]:
        """The modules not put yet, in the plan's order."""
        return list(self._pending)

    def put(self, name: str, update: Update) -> None:
        """Write module `name`'s update (its tensors go to the file now; nothing of it is kept)."""
        if self._closed:
            raise LorafuseValueError(f"output {self.out}: module {name!r} put after the output was closed")
        if name not in self._pending:
            if name in self._plan.modules:
                raise LorafuseValueError(f"output {self.out}: module {name!r} put twice")
            raise LorafuseValueError(f"output {self.out}: module {name!r} is not in the output's layout "
                                     f"({len(self._plan.modules)} modules)")
        if self._layout is not None:
            update = self._layout[name].check(update, f"output {self.out}")
        for key, t in self._plan.module_tensors(name, update).items():
            self._file.write_at(key, t.raw)
        del self._pending[name]

    def close(self) -> None:
        """Commit the output (atomically, by rename); an error when a module was not put, and then
        nothing is written."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._pending:
                missing = list(self._pending)
                raise LorafuseValueError(f"output {self.out}: closed before every module was put: {len(missing)} of "
                                         f"{len(self._plan.modules)} missing ({_listed(missing)}); nothing was "
                                         "written")
            plan = self._plan
            if self._final is not None:
                plan = self._final()
                if plan.specs != self._plan.specs or plan.folder_kind != self._plan.folder_kind:
                    raise LorafuseValueError(f"output {self.out}: the final plan changed the output's tensors")
                self._write_side_files(plan)
            if plan.finish is not None:
                self._file.rewrite_metadata(plan.finish(self._data))
            elif plan is not self._plan:
                self._file.rewrite_metadata(plan.metadata)
        except BaseException as e:
            self._unwind(e)
            raise
        self._stack.close()  # closes the file (checks every tensor was written), then commits

    def _write_side_files(self, plan: WritePlan) -> None:
        if self._folder is not None:
            for name, text in plan.side_files.items():
                (self._folder / name).write_text(text, encoding="utf-8")

    def abort(self) -> None:
        """Give up: the temporary output is removed, `out` keeps what it held."""
        if self._closed:
            return
        self._closed = True
        reason = LorafuseValueError(f"output {self.out}: aborted")
        self._stack.__exit__(type(reason), reason, None)

    def _data(self) -> Iterator[memoryview]:
        """The written file's data buffer (after the header), read back in chunks."""
        fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            at, end = self._file.data_start, os.fstat(fd).st_size
            while at < end:
                chunk = os.pread(fd, min(_CHUNK, end - at), at)
                if not chunk:
                    raise LorafuseValueError(f"output {self.out}: the temporary file ended at byte {at} of {end}")
                yield memoryview(chunk)
                at += len(chunk)
        finally:
            os.close(fd)


def write_adapter(plan: WritePlan, updates: Mapping[str, Update], out: str | os.PathLike[str],
                  inputs: Sequence[Path] = (), overwrite: bool = False) -> Path:
    """Write an adapter whose updates all exist (Adapter.save's path): the plan's modules in order."""
    with StreamWriter(plan, out, inputs, overwrite) as w:
        for name in plan.modules:
            w.put(name, updates[name])
    return Path(out)


def skeleton(template: Adapter, layout: AdapterLayout) -> Adapter:
    """`template` (config, state, full tensors, sources) with the layout's placeholder updates: what a
    format makes its WritePlan from before any update is computed."""
    return dataclasses.replace(template, updates=dict(layout.placeholders()), randomized=[], notes=[])


def stream_with(plan_of: Callable[[Adapter], WritePlan]) -> Callable[
        [Adapter, AdapterLayout, str | os.PathLike[str], Sequence[Path], bool, Callable[[], Provenance] | None],
        StreamWriter]:
    """A format's registry entry `open_stream`, from its plan function."""

    def open_stream(template: Adapter, layout: AdapterLayout, out: str | os.PathLike[str], inputs: Sequence[Path],
                    overwrite: bool, final: Callable[[], Provenance] | None = None) -> StreamWriter:
        def final_plan() -> WritePlan:
            assert final is not None
            return plan_of(skeleton(dataclasses.replace(template, provenance=final()), layout))

        return StreamWriter(plan_of(skeleton(template, layout)), out, inputs, overwrite, layout,
                            final_plan if final is not None else None)

    return open_stream


def open_stream(format: str | None, out: str | os.PathLike[str],
                layout: AdapterLayout | Iterable[ModuleLayout], template: Adapter, *, overwrite: bool = False,
                inputs: Iterable[str | os.PathLike[str]] | None = None,
                final_provenance: Callable[[], Provenance] | None = None) -> StreamWriter:
    """Open a streamed output `out` of `format` (None: the template's) holding the modules of `layout`,
    with the config and state of `template` (its updates are not used; its full tensors are written).
    `inputs`: the files the output must not replace (default: the template's sources()). Everything the
    format computes from all modules (configs, metadata, header) and the output checks (io.atomic) happen
    here, before any update is put. `final_provenance`: when given, the template's provenance is a draft
    (io.provenance.Recording.draft: placeholders for the hashes still being computed) and this returns the
    finished one at the commit, which rewrites the header in place and the side files (the model card)."""
    spec = get_format(template.format if format is None else format)
    if spec.open_stream is None:
        raise UnsupportedError(f"adapter format {spec.name!r} cannot be written module by module")
    lay = layout if isinstance(layout, AdapterLayout) else AdapterLayout(layout)
    sources = template.sources() if inputs is None else [Path(p) for p in inputs]
    writer = spec.open_stream(template, lay, out, sources, overwrite, final_provenance)
    assert isinstance(writer, StreamWriter)
    return writer


__all__ = ["StreamWriter", "WritePlan", "open_stream", "skeleton", "specs_of", "stream_with", "write_adapter"]

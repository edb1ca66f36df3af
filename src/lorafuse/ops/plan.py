"""Dry runs: what apply, combine, resize, extract and convert would write, without writing anything.

Each `plan_*` function takes the arguments of the operation that writes (`plan_apply`: ops.apply.apply,
`plan_combine`: ops.combine.combine_to, `plan_resize` / `plan_extract`: lorafuse.resize / lorafuse.extract,
`plan_convert`: ops.convert.convert) and runs that operation's own first part, the one before its first
byte is written (`prepare_apply`, `prepare_to`, `prepare_resize`, `prepare_extract`, `prepare_convert`,
ops.outputs.checked_output): the options are checked, the inputs read (headers), the modules matched, the
output's name and what it holds judged (io.atomic). The same refusals come out, with the same errors. Then
it returns a `Plan` instead of writing: nothing is created, replaced or touched (no output, no temporary
file, no folder).

No factor is multiplied: the output's header comes from the format's writer (formats.streaming.WritePlan)
given placeholder updates of the output's layout, so its tensors and bytes are exact. Two things are only
known once the math has run, and the plan says so (`exact` False, each module's `at_most`): a rank chosen
from the singular values (resize and extract with sv_ratio, sv_fro or sv_cumulative: the plan gives its
upper bound) and extract's modules whose weights did not change (left out when run). convert converts in
memory (LoHa / LoKr modules to LoRA, names renamed), because what it writes depends on the factors' values
(fused modules that share A); that reads the adapter, which is small.

Byte counts: `size` is the output's tensor data (what ApplyReport.bytes_written counts), `bytes_written`
the output's tensor files on disk, safetensors headers included, except the provenance record a run adds
to the metadata (io.provenance: the inputs' sha256, the command line; usually a few KiB), which only the
run makes; the side files an output gets (config.json, tokenizer files, adapter_config.json, README.md,
an index, lorafuse_manifest.json) are not counted. `bytes_read` is the tensor data read from the inputs,
every pass counted (the provenance record's hashing aside).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafuse._progress import ProgressCallback, human_bytes
from lorafuse._terminal import plural
from lorafuse._validate import check_bool, check_optional_bool, check_path, full_rank
from lorafuse.errors import LorafuseError
from lorafuse.io.atomic import overwrite_words
from lorafuse.io.dtypes import DTYPES
from lorafuse.io.manifest import mark_metadata
from lorafuse.io.provenance import Invocation, Provenance, is_provenance_key
from lorafuse.io.safetensors import TensorSpec, encode_header, read_header
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, LoraUpdate, Update
from lorafuse.model.experts import ALL_PARTS, expert_modules
from lorafuse.model.layout import ModuleLayout
from lorafuse.ops.combine import AnyAdapters, CombineOptions
from lorafuse.ops.outputs import AdapterOutput, checked_output, extract_output, python_output, write_plan
from lorafuse.ops.rank import RankRule

__all__ = ["FilePlan", "ModulePlan", "Plan", "plan_apply", "plan_combine", "plan_convert", "plan_extract",
           "plan_resize"]

SHOWN = 20  # modules listed by Plan.lines() (as_json lists them all)


@dataclass(frozen=True)
class ModulePlan:
    """One module of the plan: its name (apply: the base weight's), the shape of its delta (the base
    weight's), the distinct ranks its inputs have for it, and the rank it gets (None: merged into the
    base weight). `at_most`: the rank is chosen from the singular values when the run computes them, and
    `rank` is its upper bound."""

    name: str
    shape: tuple[int, ...]
    ranks_in: tuple[int, ...]
    rank: int | None
    at_most: bool = False

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "ranks_in": list(self.ranks_in), "rank": self.rank,
                "at_most": self.at_most}


@dataclass(frozen=True)
class FilePlan:
    """One tensor file of the output: its name (relative to the output folder; a one-file output's own
    name), its tensors and its size on disk in bytes (header and data)."""

    name: str
    tensors: int
    bytes: int


@dataclass
class Plan:
    """What a run would write (see the module docstring): the verb, the output path (None: an in-memory
    result) and format, its tensors per dtype, `size` (tensor data), `bytes_written` (the tensor files on
    disk), `bytes_read` (tensor data read, every pass), the modules, the files, the run's notes, and
    `replaces`: what --overwrite would replace at the output (None: nothing of the user's). `exact` is
    False when a rank or a module depends on the math (then the numbers are upper bounds). `details`:
    the verb's own facts (apply: the weights merged and the tensors copied; combine: method, engine,
    passes; convert: target, family, split and fused modules; ...)."""

    verb: str
    out: Path | None
    format: str
    dtypes: dict[str, int]
    size: int
    bytes_written: int
    bytes_read: int
    modules: list[ModulePlan]
    files: list[FilePlan]
    notes: list[str] = field(default_factory=list)
    replaces: str | None = None
    exact: bool = True
    details: dict[str, object] = field(default_factory=dict)

    @property
    def tensors(self) -> int:
        return sum(self.dtypes.values())

    def as_json(self) -> dict[str, object]:
        """The plan as JSON-ready values (`json.dumps(plan.as_json())`)."""
        return {"dry_run": True, "verb": self.verb, "out": None if self.out is None else str(self.out),
                "format": self.format, "tensors": self.tensors, "dtypes": dict(self.dtypes), "size": self.size,
                "bytes_written": self.bytes_written, "bytes_read": self.bytes_read, "exact": self.exact,
                "replaces": self.would_replace(), "files": [{"name": f.name, "tensors": f.tensors,
                                                             "bytes": f.bytes}
                                                     for f in self.files],
                "modules": [m.as_json() for m in self.modules], "notes": list(self.notes), **self.details}

    def would_replace(self) -> str | None:
        """What --overwrite would replace at the output (`replaces`, io.atomic's note of a run that replaced it,
        said of a run that has not happened): the path and what it holds; None when nothing of the user's."""
        if not self.replaces:
            return None
        return self.replaces.removeprefix(f"{overwrite_words()} replaced ").removesuffix(
            "; everything that was in it is gone")

    def lines(self, every: bool = False) -> list[str]:
        """The plan as text, one line each (the CLI's --dry-run output): SHOWN modules and files, or with
        `every` (--verbose, one line per module) all of them."""
        shown = max(len(self.modules), len(self.files)) if every else SHOWN
        bound = "" if self.exact else "at most "
        where = "keep the result in memory" if self.out is None else f"write {self.out}"
        out = [f"dry run: {self.verb} would {where} ({self.format}); nothing was written"]
        dtypes = ", ".join(f"{k} {v}" for k, v in self.dtypes.items())
        out.append(f"  output    {plural(self.tensors, 'tensor')} ({dtypes}), {bound}{human_bytes(self.size)} of "
                   f"tensor data in {plural(len(self.files), 'file')}")
        out.append(f"  reads     {self.bytes_read:,} bytes ({human_bytes(self.bytes_read)}) of tensor data")
        out.append(f"  writes    {bound}{self.bytes_written:,} bytes ({human_bytes(self.bytes_written)})")
        if len(self.files) > 1:
            out += [f"    {f.name}: {plural(f.tensors, 'tensor')}, {f.bytes:,} bytes" for f in self.files[:shown]]
            if len(self.files) > shown:
                out.append(f"    ... and {len(self.files) - shown} more files")
        out += [f"  {key:<9} {_text(value)}" for key, value in self.details.items() if _shown(value)]
        out.append(f"  modules   {len(self.modules)}" + (":" if self.modules else ""))
        width = max((len(m.name) for m in self.modules[:shown]), default=0)
        for m in self.modules[:shown]:
            rank = "merged" if m.rank is None else f"{'<= ' if m.at_most else ''}{m.rank}"
            ranks = "/".join(map(str, m.ranks_in)) + " -> " if m.ranks_in else ""
            out.append(f"    {m.name:<{width}}  rank {ranks}{rank}  {tuple(m.shape)}")
        if len(self.modules) > shown:
            ranks_out = Counter(m.rank for m in self.modules if m.rank is not None)
            summary = ", ".join(f"rank {k}: {v}" for k, v in sorted(ranks_out.items()))
            out.append(f"    ... and {len(self.modules) - shown} more" + (f" (in all {summary})" if summary else "")
                       + " (--json lists all)")
        what = self.would_replace()
        if what:
            out.append(f"  would replace: {what} (with {overwrite_words()}, a run replaces it whole)")
        out += [f"  note: {n}" for n in self.notes]
        return out


def _shown(value: object) -> bool:
    return value not in (None, [], {}, "")


def _text(value: object) -> str:
    """A detail on one line: a list or mapping by its length (--json lists them)."""
    return str(len(value)) if isinstance(value, list | dict) else str(value)


def _file(name: str, specs: Sequence[TensorSpec], metadata: dict[str, str] | None) -> FilePlan:
    """A safetensors file as SafetensorsWriter writes it: the header (io.safetensors.encode_header) then the
    data; the header without the provenance record (io.provenance's keys), which only the run can make."""
    header, _ = encode_header(specs, {k: v for k, v in (metadata or {}).items() if not is_provenance_key(k)})
    return FilePlan(name, len(specs), len(header) + sum(s.nbytes for s in specs))


def _data_bytes(paths: Iterable[Path]) -> int:
    """The tensor data of the safetensors files at `paths` (a folder: the .safetensors files in it)."""
    total = 0
    for p in dict.fromkeys(paths):
        for f in sorted(p.iterdir()) if p.is_dir() else [p]:
            if f.name.lower().endswith(".safetensors") and f.is_file():
                total += sum(t.nbytes for t in read_header(f)[0].values())
    return total


def _adapter_plan(verb: str, out: Path | None, fmt: str, adapter: Adapter, modules: list[ModulePlan],
                  bytes_read: int, notes: list[str], replaces: str | None, exact: bool = True,
                  details: dict[str, object] | None = None) -> Plan:
    """The plan of an adapter output: its format's writer's plan (header, metadata) for `adapter`, whose
    updates may be placeholders."""
    if adapter.provenance is None:  # what the writer decides from how the output was made (kohya: ss_* keys)
        adapter = dataclasses.replace(adapter, provenance=Provenance(verb, (), Invocation("python", "")))
    wp = write_plan(fmt, adapter)
    name = wp.weights_name if wp.folder_kind is not None else (out.name if out is not None else "adapter")
    f = _file(name, wp.specs, wp.metadata)
    return Plan(verb, out, fmt + (" folder" if wp.folder_kind is not None else " file"),
                dict(Counter(s.dtype for s in wp.specs)), sum(s.nbytes for s in wp.specs), f.bytes, bytes_read,
                modules, [f], notes, replaces, exact, details or {})


# ----------------------------------------------------------------------------- apply


def plan_apply(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    weights: Sequence[float] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str | None = None,
    threads: int = 0,
    max_shard_size: str | int | None = None,
    progress: ProgressCallback | bool | None = None,
    allow_nonfinite: bool = False,
    skip_missing: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    requantize: bool | None = None,
) -> Plan:
    """What `apply` with these arguments would write: every check and match of apply (ops.apply.prepare_apply:
    a module without a target fails as it would), then the output's shards, tensors and bytes, the weights
    merged and the tensors copied. `progress` and `allow_nonfinite` act while writing only, and are checked as
    apply checks them."""
    from lorafuse.ops.apply import check_progress, prepare_apply

    check_bool(allow_nonfinite, "allow_nonfinite")
    check_progress(progress)
    s = prepare_apply(base, adapters, weights, out, dtype=dtype, threads=threads, max_shard_size=max_shard_size,
                      skip_missing=skip_missing, overwrite=overwrite, device=device, requantize=requantize)
    model = s.mplan.model
    files: list[FilePlan] = []
    modules: list[ModulePlan] = []
    merged: list[str] = []
    replaced: list[str] = []
    biases: list[str] = []
    dtypes: Counter[str] = Counter()
    copied = read = 0
    for comp, plan in s.mplan.plans.items():
        ckpt = model.components[comp]
        for shard, entries in plan.shards:
            meta = plan.metadata.get(shard, {})
            name = s.out.name if s.one_file else (f"{comp}/{shard}" if comp else shard)
            files.append(_file(name,
                               [TensorSpec(t.name, t.dtype, t.shape) for t in entries],
                               mark_metadata(meta) if s.one_file else meta))
            for t in entries:
                src = ckpt.info(t.src_name)
                read += src.nbytes
                dtypes[t.dtype] += 1
                full = model.tensor_name(comp, t.name)
                copied += t.is_copy(src.dtype)
                if t.updates:
                    merged.append(full)
                    modules.append(ModulePlan(full, t.shape, tuple(sorted({c.update.rank for c in t.updates})),
                                              None))
                if t.replacement is not None or t.token_rows:  # whole, or rows of it (trainable tokens)
                    replaced.append(full)
                if t.bias_updates:
                    biases.append(full)
    read += _data_bytes(p for a in s.adapters for p in a.sources())  # the adapters as prepare_apply read them
    kind = "safetensors file" if s.one_file else ("checkpoint folder" if model.single else "diffusers pipeline")
    details: dict[str, object] = {"merged": merged, "replaced": replaced, "biases": biases, "copied": copied,
                                  "shards": len(files)}
    return Plan("apply", s.out, kind, dict(dtypes), s.mplan.total_bytes, sum(f.bytes for f in files), read, modules,
                files, list(s.mplan.notes), s.replaces, True, details)


# ----------------------------------------------------------------------------- combine


def plan_combine(adapters: AnyAdapters, weights: Iterable[float] | None, options: CombineOptions,
                 out: str | os.PathLike[str], format: str | None = None, *, overwrite: bool = False) -> Plan:
    """What `combine_to` with these arguments would write (ops.combine.prepare_to: the options, the header
    pass, the engine, the method's rules, each module's rank; then the output's writer and io.atomic's
    check of `out`)."""
    from lorafuse.formats.streaming import skeleton
    from lorafuse.ops.combine import many, prepare_to

    s = prepare_to(adapters, weights, options)
    target = python_output(out, format, [s.template], s.inputs, overwrite=overwrite)  # as combine_to names it
    fmt, out = target.format, target.path
    modules: list[ModulePlan] = []
    if s.stream is not None:
        passes = 1 if s.options.method == "linear" else (s.options.passes or many.DEFAULT_PASSES)  # as run_stream
        read = passes * sum(s.stream.nbytes)
        count = len(s.stream.sources)
        for name, lay in s.layout.items():
            spec = s.stream.modules[name]
            modules.append(ModulePlan(name, lay.delta_shape, tuple(sorted(spec.ranks)), lay.rank))
    else:
        assert s.prepared is not None
        passes, count = 1, len(s.prepared.loaded)
        read = _data_bytes(p for a in s.prepared.loaded for p in a.sources())
        for name, lay in s.layout.items():
            ranks = tuple(sorted({t.update.rank for t in s.prepared.by_module[name]}))
            modules.append(ModulePlan(name, lay.delta_shape, ranks, lay.rank))
    template = skeleton(s.template, s.layout)
    write_plan(fmt, template)  # (a format without a writer is refused here)
    replaces = target.replaces  # python_output checked the place (io.atomic.check_output) for this format's kind
    details: dict[str, object] = {"method": s.options.method, "adapters": count, "engine": s.engine,
                                  "passes": passes if s.stream is not None else None}
    return _adapter_plan("combine", out, fmt, template, modules, read, [target.note] if target.note else [], replaces,
                         True, details)


# ----------------------------------------------------------------------------- resize


def _rule_cap(rule: RankRule) -> int | None:
    """The largest rank the rule can give, before each module's own cap (None: no bound but the module's)."""
    caps = [k for k in (rule.rank, rule.max_rank) if k is not None]
    return min(caps) if caps else None


def plan_resize(
    adapter: str | os.PathLike[str] | Adapter,
    rank: int | None = None,
    *,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    max_rank: int | None = None,
    split: str = "B",
    threads: int = 0,
    dtype: str | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    device: str = "cpu",
) -> Plan:
    """What `lorafuse.resize` with these arguments would write (its checks: the rule, the output's name,
    ops.resize.prepare_resize). A fixed rank gives exact ranks and sizes; a rule on the singular values,
    each module's upper bound (its rank, capped by max_rank), since the SVD decides."""
    from lorafuse.formats import load
    from lorafuse.ops.resize import prepare_resize, resized

    out = None if out is None else check_path(out, "out")
    overwrite = check_bool(overwrite, "overwrite")  # a switch, whether or not there is an output to replace
    check_optional_bool(progress, "progress")  # drawn while resizing only, checked as resize checks it
    rule = RankRule(rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro, sv_cumulative=sv_cumulative, max_rank=max_rank)
    a = adapter if isinstance(adapter, Adapter) else load(adapter)
    target: AdapterOutput | None = None
    if out is not None:
        target = checked_output(out, a.format, [a], a.sources(), overwrite=overwrite)
    a, _, _, out_dtype = prepare_resize(a, rule, threads, dtype, device, split)
    cap = _rule_cap(rule)
    updates: dict[str, Update] = {}
    modules: list[ModulePlan] = []
    exact = not rule.from_spectrum
    ranks = {name: full_rank(min(u.rank, cap) if cap is not None else u.rank, tuple(u.delta_shape))
             for name, u in a.updates.items()}
    # resize pads the MoE experts PEFT stacks to one rank, the largest among them (one_expert_rank, on its results:
    # every module a LoRA by then, a LoHa / LoKr one too)
    experts = expert_modules(a.updates, ALL_PARTS)
    if experts:
        common = max(ranks[n] for n in experts)
        ranks.update(dict.fromkeys(experts, common))
    for name, u in a.updates.items():
        k = ranks[name]
        exact = exact and isinstance(u, LoraUpdate)
        new = ModuleLayout.like(u, k, scale=u.scale, dtype=out_dtype).placeholder()
        new.bias = u.bias
        updates[name] = new
        modules.append(ModulePlan(name, tuple(u.delta_shape), (u.rank,), k, rule.from_spectrum))
    result = resized(a, updates)
    notes = [target.note] if target is not None and target.note else []
    read = _data_bytes(a.sources())
    details: dict[str, object] = {"rule": rule.describe(), "split": split}
    if target is None:
        fmt = a.format
        return _adapter_plan("resize", None, fmt, result, modules, read, notes, None, exact, details)
    return _adapter_plan("resize", target.path, target.format, result, modules, read, notes, target.replaces,
                         exact, details)


# ----------------------------------------------------------------------------- extract


def plan_extract(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    max_rank: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: str = "skip",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    threads: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
    device: str = "cpu",
    dtype: object = None,
    clamp_quantile: float | None = None,
    min_diff: float | None = None,
    conv_rank: int | None = None,
) -> Plan:
    """What `lorafuse.extract` with these arguments would write (its checks: the rule, the output's name,
    ops.extract.prepare_extract). Every selected module is listed with its largest rank; a module whose
    weights did not change is left out when run (that needs both weights read), so the plan is an upper
    bound (`exact` False)."""
    from lorafuse.model.experts import expert_modules, missing_experts
    from lorafuse.ops.extract import _one_linear_layout, _update, extracted, kohya_adapter, module_rank, prepare_extract

    out = None if out is None else check_path(out, "out")
    overwrite = check_bool(overwrite, "overwrite")  # a switch, whether or not there is an output to replace
    check_optional_bool(progress, "progress")  # drawn while extracting only, checked as extract checks it
    rule = RankRule(rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro, sv_cumulative=sv_cumulative, max_rank=max_rank)
    target = extract_output(out, base, finetuned, include, exclude, overwrite=overwrite) if out is not None else None
    x = prepare_extract(base, finetuned, rule, include=include, exclude=exclude, embeddings=embeddings,
                        oversample=oversample, power_iters=power_iters, seed=seed, threads=threads, device=device,
                        dtype=dtype, clamp_quantile=clamp_quantile, min_diff=min_diff, conv_rank=conv_rank)

    def cap(shape: tuple[int, ...]) -> int:  # a kxk convolution's rank is conv_rank when given (module_rank)
        k = module_rank(x.k_max, x.conv_rank, shape)
        return k if rule.max_rank is None else min(k, rule.max_rank)

    updates: dict[str, Update] = {}
    modules: list[ModulePlan] = []
    read = 0
    ranks = {m: full_rank(cap(x.base.info(k).shape), (x.base.info(k).shape[0],
                                                      int(np.prod(x.base.info(k).shape[1:], dtype=np.int64))))
             for m, k in x.work}
    experts = expert_modules(ranks, x.expert_parts) if x.expert_parts else []
    common = max((ranks[m] for m in experts), default=0)  # extract writes every expert at one rank (model.experts)
    ranks.update({m: common for m in experts})
    ranks.update({h: ranks[e] for h, e in x.tied.items() if e in ranks})  # a tied head: its embedding's factors
    keys = dict(x.work)
    shapes = {m: x.base.info(k).shape for m, k in x.work}
    shapes.update({h: shapes[e] for h, e in x.tied.items() if e in shapes})
    shapes.update({m: x.expert_shapes[m] for m in missing_experts(experts, x.expert_parts, x.expert_shapes)})
    for module, shape in shapes.items():
        key = keys.get(module)
        cols = int(np.prod(shape[1:], dtype=np.int64))
        k = ranks.get(module, common)
        # zeros the system maps lazily: the layout of the update extract makes, without its values
        u = _update(module, shape, np.zeros((shape[0], k), np.float32), np.zeros((k, cols), np.float32),
                    module in x.conv1d, module in x.embedding or (module in x.tied
                                                                  and x.layers.kind(module) == "embedding"))
        try:
            layout = ModuleLayout.of(u)
            updates[module] = (layout if x.dtype is None else dataclasses.replace(layout, dtype=x.dtype)).placeholder()
        except LorafuseError:  # a layout has no entry for it (a fused expert tensor): its own zeros then
            updates[module] = u
        modules.append(ModulePlan(module, tuple(u.delta_shape), (), k, rule.from_spectrum))
        read += 0 if key is None else x.base.info(key).nbytes + x.finetuned.info(key).nbytes
    full: dict[str, Tensor] = {}
    for name, key in x.full:
        info = x.finetuned.info(key)
        full[name] = Tensor(np.broadcast_to(np.zeros((), DTYPES[info.dtype].raw), info.shape), info.dtype)
        read += info.nbytes
    adapter = extracted(base, x.config, _one_linear_layout(updates), full, (x.base, x.finetuned), x.layers.modules)
    skipped = list(x.skipped)
    if target is not None and target.format == "kohya":  # a kohya file from single-file SD checkpoints (extract's)
        adapter, names, left = kohya_adapter(adapter, base, finetuned)
        modules = [dataclasses.replace(m, name=names[m.name]) for m in modules if m.name in names]
        skipped, full = skipped + left, {}
    notes = [f"not extracted: {s}" for s in skipped] + x.notes + ([target.note] if target is not None and
                                                                  target.note else [])
    notes.append("a module whose weights did not change is left out when extract runs: the plan counts every module "
                 "selected, so its numbers are upper bounds")
    details: dict[str, object] = {"rule": rule.describe() + (f", conv-rank {x.conv_rank}" if x.conv_rank else ""),
                                  "kept_whole": list(full)}
    if target is None:
        return _adapter_plan("extract", None, "peft", adapter, modules, read, notes, None, False, details)
    return _adapter_plan("extract", target.path, target.format, adapter, modules, read, notes, target.replaces,
                         False, details)


# ----------------------------------------------------------------------------- convert


def plan_convert(adapter: str | os.PathLike[str] | Adapter, out: str | os.PathLike[str], to: str = "peft",
                 rank: int | None = None, conv_rank: int | None = None, family: str | None = None,
                 threads: int = 0, overwrite: bool = False, *, arch: str | None = None,
                 base_config: str | os.PathLike[str] | None = None, gguf_type: str | None = None) -> Plan:
    """What `convert` with these arguments would write (ops.convert.prepare_convert: every check, LoHa / LoKr
    modules turned into LoRA and the names converted, in memory). A GGUF output's tensors and data are
    exact; its header and metadata (a few KiB) are not counted."""
    from lorafuse.ops.convert import prepare_convert

    s = prepare_convert(adapter, out, to, rank, conv_rank, family, threads, overwrite, arch=arch,
                        base_config=base_config, gguf_type=gguf_type)
    rep = s.report
    read = _data_bytes(p for p in s.inputs if p.name.lower().endswith(".safetensors") or p.is_dir())
    notes = list(rep.notes) + [f"{m.name}: {m.algo} -> LoRA rank {m.rank}, Frobenius norm kept {m.fro_kept:.4f}"
                               for m in rep.lycoris]
    details: dict[str, object] = {"to": rep.to, "family": rep.family, "split": rep.split, "fused": rep.fused}
    if s.gguf is not None:
        from lorafuse.formats.gguf import _info_of, gguf_module

        gguf = gguf_module()
        dtypes: Counter[str] = Counter()
        size = 0
        modules = []
        for m in s.gguf.modules:
            for t in (m.a, m.b):
                dtypes[t.qtype] += 1
                size += _info_of(gguf, t)[2]
            u = s.result.updates[m.module]
            modules.append(ModulePlan(m.base, tuple(u.delta_shape), (u.rank,), u.rank))
        details.update({"arch": rep.arch, "gguf_type": rep.gguf_type, "alpha": rep.alpha, "folded": rep.folded})
        notes.append("the GGUF header and metadata (a few KiB) are not counted in the bytes written")
        return Plan("convert", s.out, "gguf file", dict(dtypes), size, size, read, modules,
                    [FilePlan(s.out.name, sum(dtypes.values()), size)], notes, s.replaces, False, details)
    modules = [ModulePlan(n, tuple(u.delta_shape), (u.rank,), u.rank) for n, u in s.result.updates.items()]
    return _adapter_plan("convert", s.out, "diffusers" if to == "peft" else "kohya", s.result, modules, read, notes,
                         s.replaces, True, details)

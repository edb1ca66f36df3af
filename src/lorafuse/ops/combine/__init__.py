"""combine: many adapters -> one adapter (PEFT's add_weighted_adapter, method for method; one adapter goes
through the method asked, with an AdapterNote: PEFT takes 'linear' for a single adapter).

Notation: adapter i has stored factors B_i (out x r_i), A_i (r_i x in), scale s_i and user
weight w_i; c_i = w_i * s_i. Modules missing from some adapters combine from the ones
that have them. Every output has scale 1 (r = lora_alpha per module).

- cat:    B' = [B_1 ... B_n], A' = [c_1 A_1; ...; c_n A_n]  (exact, rank sum r_i)
- svd:    the best rank-k approximation of D = sum_i c_i B_i A_i, computed from the
          stacked factors (QR of each stack, SVD of the small core), never forming D.
          With many adapters (stacked rank R in the hundreds) that costs O(R^2) per
          module, so unless exact=True a module switches to a randomized SVD taken
          through the factors (O(R), a constant time per adapter) where the cost model
          finds it 1.5x cheaper; those modules are listed in Adapter.randomized. A module
          whose stacked rank reaches min(out, in) and whose stack would exceed a group's
          memory forms D instead, a few adapters at a time (see svd.py)
- linear, ties, dare_linear, dare_ties, magnitude_prune: PEFT's factor-wise merge: the
          A stack with weights sign(c_i) sqrt|c_i| and the B stack with sqrt|c_i| are
          merged separately (equal ranks required)
- *_svd:  PEFT's merge of the dense deltas s_i B_i A_i with weights w_i, then rank k by
          (randomized) SVD

The output's factors are rounded once, to nearest even, to `dtype` (CombineOptions.dtype): by default the
inputs' factor dtype when they all share one of F32, F16, BF16 (an F16 kohya file combines into F16
factors, as kohya's scripts with --save_precision fp16), else F32, with an AdapterNote saying so. Every
method computes in float32 / float64 whatever the dtype.

Each method is an entry of `REGISTRY` (registry.py); options travel as one `CombineOptions`.
Modules flow through the method in groups sized by bytes (groups.py), and the pages of a
group's inputs leave the resident set once it is done: peak memory is bounded by a group,
not by the number of adapters.

Many adapters (more than many.memory_max_adapters(), an iterable that is not a sequence, a list file's
Sources, or `passes` / engine='stream' given) go through many.py first: a pass over the headers checks
every adapter before any work, then svd and linear stream (each adapter read once per pass, memory
independent of n) unless the case is small enough for the in-memory path above (many.choose_engine).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from lorafuse._validate import (
    MAX_OVERSAMPLE,
    check_bool,
    check_float,
    check_int,
    check_optional_bool,
    check_optional_rank,
    check_path,
    check_seed,
    check_text,
    check_threads,
    check_weights,
    weight_list,
)
from lorafuse.backends import backend_for_device, check_device
from lorafuse.backends.native import resolve_threads
from lorafuse.errors import (
    AdapterNote,
    LorafuseValueError,
    NonFiniteError,
    UnsharedModulesError,
    UnsupportedError,
    warn,
)
from lorafuse.formats.streaming import open_stream
from lorafuse.io.dtypes import dtype_spelling
from lorafuse.io.provenance import Provenance, Recording, adapter_input
from lorafuse.io.safetensors import raise_if_inputs_changed
from lorafuse.model import Adapter, LoraUpdate
from lorafuse.model.adapter import refuse_one
from lorafuse.model.arithmetic import check_linear, check_shared, check_split, float32_coefficient, result
from lorafuse.model.layout import AdapterLayout, ModuleLayout, check_dtype, output_dtype, rounded
from lorafuse.model.update import holds_nonfinite, nonfinite_words
from lorafuse.ops.combine import many, ray_engine, taskmerge
from lorafuse.ops.combine.context import Context, Output
from lorafuse.ops.combine.groups import stream
from lorafuse.ops.combine.identity import Identities
from lorafuse.ops.combine.options import GROUP_BYTES, CombineOptions
from lorafuse.ops.combine.registry import METHODS, OPTION_FLAGS, REGISTRY, Method, methods_help, methods_with
from lorafuse.ops.combine.terms import Terms, as_adapters, output_ranks, terms_by_module
from lorafuse.ops.outputs import python_output

EXACT = tuple(n for n, m in REGISTRY.items() if m.exact)
STRUCTURED_ABOVE = 1 << 24  # stacked exact factorizations (elements) above which LyCORIS terms go structured

__all__ = ["CombineOptions", "CombineReport", "CombineSetup", "EXACT", "GROUP_BYTES", "METHODS", "Method", "REGISTRY",
           "combine", "combine_to", "combine_with", "check_options", "methods_help", "prepare_to"]


def check_options(options: CombineOptions) -> CombineOptions:
    """The options with checked values, or the error of the first that its method does not take (an option
    at its default value is never refused: see _check_used)."""
    method = REGISTRY.get(options.method) if isinstance(options.method, str) else None
    if method is None:
        raise LorafuseValueError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    o = dataclasses.replace(
        options, threads=check_threads(options.threads), seed=check_seed(options.seed),
        rank=check_optional_rank(options.rank, "rank"), conv_rank=check_optional_rank(options.conv_rank, "conv_rank"),
        density=None if options.density is None else check_float(options.density, "density", 0.0, 1.0,
                                                                  lo_open=True),
        exact=check_bool(options.exact, "exact"), progress=check_optional_bool(options.progress, "progress"),
        passes=None if options.passes is None else check_int(options.passes, "passes", 1, many.MAX_PASSES),
        oversample=None if options.oversample is None else check_int(options.oversample, "oversample", 0,
                                                                     MAX_OVERSAMPLE))
    check_split(o.split)
    if check_text(o.majority_sign, "majority_sign", ("total", "frequency")) not in ("total", "frequency"):
        raise LorafuseValueError(f"majority_sign must be 'total' or 'frequency', got {o.majority_sign!r}")
    if method.takes_density and o.density is None:
        raise LorafuseValueError(f"method {o.method!r} needs a density: the fraction of entries it keeps, between 0 "
                                 "and 1 (e.g. --density 0.5 on the command line, density=0.5 in Python)")
    _check_used(o, method)
    if o.exact and o.seed != _DEFAULTS["seed"]:  # (exact is svd's alone: _check_used)
        raise LorafuseValueError(f"seed={o.seed} (--seed) seeds the randomized SVD's sketches, and exact (--exact) "
                                 "takes the exact SVD for every module, which draws no sketch: leave seed out, or "
                                 "exact, for a randomized SVD where it is cheaper")
    if isinstance(o.group_bytes, bool) or not isinstance(o.group_bytes, int) or o.group_bytes < 1:
        raise LorafuseValueError(f"group_bytes must be a positive integer, got {o.group_bytes!r}")
    many.check_stream_options(o)
    if o.engine == "memory" and o.passes is not None:
        raise LorafuseValueError(f"passes={o.passes} applies to the streamed engine (engine 'stream', or 'auto', "
                                 "which passes selects), not to engine 'memory', which reads every adapter once: "
                                 "leave passes out or choose engine 'stream'")
    if o.oversample is not None and (o.engine == "memory" or o.method != "svd"):
        raise LorafuseValueError(f"oversample={o.oversample} sets the streamed svd's sketch width (method 'svd', "
                                 "engine 'stream', 'ray', or 'auto', which oversample selects), not "
                                 f"{'engine memory' if o.method == 'svd' else f'method {o.method!r}'}: leave "
                                 "oversample out" + (" or choose engine 'stream'" if o.method == "svd" else ""))
    if o.engine == "ray":
        ray_engine.require_ray()  # before any work: without ray, say how to install it
    return dataclasses.replace(o, dtype=check_dtype(o.dtype), device=check_device(o.device))


# The defaults, which lorafuse.combine and the CLI pass whatever the method: never refused.
_DEFAULTS: dict[str, object] = {"rank": None, "conv_rank": None, "density": None, "split": "B",
                                "majority_sign": "total", "seed": 0, "exact": False}


def _check_used(o: CombineOptions, method: Method) -> None:
    """Refuse an option given (not at its default) that `method` does not use, naming the option and the methods
    that take it (the registry's flags): one rule for every option, instead of some refused, some ignored."""
    for option, flag, why in OPTION_FLAGS:  # (registry: what a method that does not use an option says)
        if getattr(o, option) == _DEFAULTS[option] or getattr(method, flag):
            continue
        takers = methods_with(flag)
        names = ", ".join(repr(n) for n in takers)
        head = f"{option}: " if option == "conv_rank" else ""
        flag_name = "--" + option.replace("_", "-")  # the same option on the command line
        raise LorafuseValueError(f"{head}method {o.method!r} {why}: {option} ({flag_name}) applies to "
                                 f"{'method' if len(takers) == 1 else 'methods'} {names}")


def combine(
    adapters: Iterable[str | os.PathLike[str] | Adapter],
    weights: Iterable[float] | None = None,
    *,
    method: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    split: str = "B",
    threads: int = 0,
    exact: bool = False,
    conv_rank: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    engine: str = "auto",
    passes: int | None = None,
    progress: bool | None = False,
    oversample: int | None = None,
) -> Adapter:
    """Combine adapters into one (see the module docstring for each method's formula).

    `rank` is the output rank of the svd methods (default: the largest input rank, as PEFT);
    `conv_rank` that of kxk convolutions with k > 1 (kohya's `--new_conv_rank`; default: `rank`; refused when no
    module is one). LoHa / LoKr inputs enter through an exact
    factorization of their delta (Khatri-Rao / Kronecker factors), so svd gives the best rank-k
    approximation of the summed deltas; they need `rank` when no plain LoRA sets the default.
    `exact=True` keeps method svd on the exact path for every module, however many adapters
    are stacked (by default modules with a large stacked rank use a randomized SVD through
    the factors; they are listed in the result's `randomized`).
    `density` (0 < density <= 1) is required by the ties / dare / magnitude_prune methods; DARE's random
    masks come from `seed` and the module name, so results do not depend on thread count. An option the
    method does not use (`split` with linear, `seed` with ties, `passes` with engine='memory', ...) is
    refused naming the methods that take it; at its default value it is accepted by every method.
    `dtype` ('fp32', 'fp16', 'bf16'; kohya's --save_precision) is the dtype of the result's factors; by
    default the inputs' factor dtype when they all share one of F32 / F16 / BF16, else F32 (with an
    AdapterNote). The math is float32 / float64 either way: only the result is rounded, once.
    `device` 'cuda' runs the SVDs' products on the GPU (DeviceError when this build or machine cannot).
    `adapters` (and `weights`) may be any iterable, a generator too (not one path: [path]); `weights` also a
    1-D array or tensor. Many adapters (or `passes`, or
    engine='stream') take the streamed engine of ops.combine.many: each adapter is read once per pass and
    memory does not grow with their number; `passes` (default 3: one power iteration; 2: range and projection;
    1: single-pass sketch) applies to svd, as `oversample` (the sketch's columns beyond the rank, default 10:
    more brings 2 passes closer to the optimum); `progress` draws a bar over the adapters read.
    """
    options = CombineOptions(method=method, rank=rank, conv_rank=conv_rank, density=density,
                             majority_sign=majority_sign, seed=seed, split=split, threads=threads, exact=exact,
                             dtype=dtype, device=device, engine=engine, passes=passes, progress=progress,
                             oversample=oversample)
    return combine_with(adapters, weights, options)


@dataclasses.dataclass
class _Prepared:
    loaded: list[Adapter]
    method: Method
    by_module: Terms
    ctx: Context
    dtype: str  # of the output's factors
    weights: list[float] = dataclasses.field(default_factory=list)  # one per adapter (the provenance's)
    wheres: list[str] = dataclasses.field(default_factory=list)  # one per adapter: where it was named (messages)


def _prepare(adapters: Sequence[str | os.PathLike[str] | Adapter | many.Source], weights: Sequence[float] | None,
             o: CombineOptions) -> _Prepared:
    """Everything checked and laid out before any module is computed (`o`: options check_options returned;
    a Source's `where`, a list file's line, names its adapter in the messages of the work)."""
    method = REGISTRY[o.method]
    if not adapters:
        raise LorafuseValueError("combine needs at least one adapter")
    backend = backend_for_device(o.device)  # before any work: a device that cannot run says so first
    loaded = as_adapters([a.item if isinstance(a, many.Source) else a for a in adapters])
    wheres = [_where(i, a, given) for i, (a, given) in enumerate(zip(loaded, adapters), 1)]
    ws = [1.0] * len(loaded) if weights is None else check_weights(weights, len(loaded))
    if not method.accepts_lycoris:
        lycoris = [(a.label, n) for a in loaded for n, u in a.updates.items() if not isinstance(u, LoraUpdate)]
        if lycoris:
            label, name = lycoris[0]
            raise UnsupportedError(f"{label}: module {name!r} is a LoHa / LoKr update; method {o.method!r} merges "
                                   "LoRA factors element by element, which a LoHa / LoKr does not have (use svd, cat "
                                   "or a *_svd method)")
    check_linear(loaded, f"combine --method {o.method}")
    if o.method != "cat":  # cat keeps disjoint modules side by side on purpose
        check_shared(loaded, f"combine --method {o.method}", wheres)
    by_module = terms_by_module(loaded, ws)
    if not by_module:
        raise _no_module([a.label for a in loaded])
    _note_unknown_kernels(loaded, by_module)
    if o.method != "linear":  # linear takes sqrt(w * scale) in float64; the others multiply factors in float32
        _check_coefficients(loaded, ws, wheres)
    if method.check is not None:
        method.check(o.method, by_module)
    ctx = Context(o, backend, output_ranks(by_module, o.rank, o.conv_rank) if method.takes_rank else {},
                  structured_above=STRUCTURED_ABOVE)
    dtype = output_dtype(loaded, o.dtype, "combine")
    _note_one_adapter(len(loaded), loaded[0].label, method)  # once everything is checked
    identities = Identities()
    for a in loaded:
        identities.see(a.config, a.label)
    identities.note()
    return _Prepared(loaded, method, by_module, ctx, dtype, [float(w) for w in ws], wheres)


def _where(i: int, a: Adapter, given: object) -> str:
    """How messages name the i-th adapter: `adapter i (label)`, or its Source's where (a list file's line) with
    its label."""
    if not isinstance(given, many.Source):
        return f"adapter {i} ({a.label})"
    return given.where if a.label in given.where else f"{given.where} ({a.label})"


def _note_one_adapter(count: int, label: str, method: Method) -> None:
    """An AdapterNote when one adapter goes through a method that changes it (all but linear and cat): PEFT's
    add_weighted_adapter takes 'linear' for a single adapter whatever the method asked (peft/tuners/lora/model.py,
    _check_add_weighted_adapter: `combination_type = "linear" if len(adapters) == 1 else combination_type`), and
    gives back the adapter's delta times its weight; lorafuse runs the method asked (pruning or cutting one adapter
    is a use of its own)."""
    if count != 1 or method.name in ("linear", "cat"):
        return
    done = ("its delta pruned to --density, then cut to rank k" if method.takes_density and method.takes_rank
            else "its factors pruned to --density" if method.takes_density
            else "its delta as the best rank-k approximation (the same delta when k is at least its rank)")
    warn(f"{label}: one adapter, combined by method {method.name!r} as asked: {done}; PEFT's "
         "add_weighted_adapter would take method 'linear' for one adapter and return it unchanged (times "
         "its weight): --method cat does that", AdapterNote)


def _note_unknown_kernels(loaded: Sequence[Adapter], by_module: Terms) -> None:
    """An AdapterNote per input for its generic LoHa / LoKr modules that stay 2-D (no other input gives them a 4-D
    shape): written as 2-D LoRA factors, a convolution's kernel unknown (formats.sd_keys.kernel_unknown)."""
    from lorafuse.formats.sd_keys import kernel_unknown, note_unknown_kernels

    for a in {a.label: a for a in loaded}.values():  # an input given twice: one note
        note_unknown_kernels(a.label, [n for n, u in a.updates.items() if not isinstance(u, LoraUpdate)
                                       and kernel_unknown(n, tuple(by_module[n][0].update.delta_shape))])


def _check_coefficients(loaded: Sequence[Adapter], ws: Sequence[float], wheres: Sequence[str]) -> None:
    """Each term's coefficient w_i * s_i must be a float32 (the factors are scaled by it in float32)."""
    for a, w, where in zip(loaded, ws, wheres):
        for name, u in a.updates.items():
            float32_coefficient(float(w), u.scale, f"{where}: module {name!r}")


def _no_module(labels: Sequence[str]) -> UnsupportedError:
    """The refusal of a combination whose inputs hold no module at all."""
    shown = ", ".join(labels[:3]) + (", ..." if len(labels) > 3 else "")
    return UnsupportedError(f"combine: the adapters ({shown}) hold no module: the result would target no module, "
                            "which PEFT refuses to load; nothing is combined")


def _spelled(options: CombineOptions) -> CombineOptions:
    """`options` with a torch / numpy dtype given as its name ('torch.float16'): the provenance records the options
    as text (check_options checks the value)."""
    if not isinstance(options, CombineOptions):
        raise LorafuseValueError(f"options must be a CombineOptions, got {type(options).__name__} (lorafuse.combine "
                                 "takes the options as keyword arguments)")
    return dataclasses.replace(options, dtype=dtype_spelling(options.dtype))


def _outputs(p: _Prepared) -> Iterator[Output]:
    """Every module's output, its float32 factors rounded once to the output dtype."""
    spread = max(1, p.method.per_thread * resolve_threads(p.ctx.options.threads))
    modules = stream(p.by_module, p.method.run, p.method.working_bytes, p.ctx, spread)
    while True:
        try:  # a NaN or Inf in the float32 sums: say which input holds it, or that the weights overflow
            name, update, was_randomized = next(modules)
        except StopIteration:
            return
        except NonFiniteError as e:
            raise _named_input(p, e) from None
        yield name, rounded(update, p.dtype, p.ctx.options.threads), was_randomized  # its own message


def _named_input(p: _Prepared, e: NonFiniteError) -> NonFiniteError:
    """The core's NonFiniteError names the module; say which input holds the NaN or Inf, or that none does (the
    weights or scales overflow float32). Only on the error path: every input's factors are looked at."""
    for a, where in zip(p.loaded, p.wheres):
        for name, u in a.updates.items():
            if holds_nonfinite(u):
                return NonFiniteError(f"{e}: {where}, module {name!r}, {nonfinite_words(u)}")
    if p.method.run is taskmerge.run_dense_svd:  # each dense delta is formed before its weight applies
        for a, where in zip(p.loaded, p.wheres):
            for name, u in a.updates.items():
                if own := taskmerge.dense_overflow(u, p.method.name):
                    return NonFiniteError(f"{e}: {where}, module {name!r}: {own}")
    summed = f"every input is finite, so the weighted sum overflows float32 (weights " \
        f"{', '.join(f'{w:g}' for w in p.weights)})"
    for a, where, w in zip(p.loaded, p.wheres, p.weights):
        for name, u in a.updates.items():
            if own := many.own_overflow(u, w):
                return NonFiniteError(f"{e}: {'' if w == 1 else summed + ': '}{where}, module {name!r}: {own}")
    return NonFiniteError(f"{e}: {summed}: use smaller weights")


AnyAdapters = Iterable[str | os.PathLike[str] | Adapter] | Iterable[many.Source]


def _route(adapters: AnyAdapters, weights: Iterable[float] | None, options: CombineOptions
           ) -> tuple[Sequence[str | os.PathLike[str] | Adapter | many.Source], Sequence[float] | None,
                      many.Plan | None, CombineOptions]:
    """The inputs for the in-memory path (and None), or the header pass's Plan for the streamed engine, with
    the checked options. A short sequence of adapters with no streaming option goes the in-memory path
    untouched, and so does a sequence of Adapters already loaded, however long: they are open already, and
    the in-memory path drops each group's mapped input pages once it is done (streaming them would keep every
    page they touch resident)."""
    refuse_one(adapters, "combine")
    many.refuse_list_pair(adapters)
    if weights is not None:  # checked (and a generator read) once here; their count once the adapters are known
        weights = weight_list(weights)
    o = check_options(options)
    if (o.engine == "auto" and not many.stream_asked(o) and isinstance(adapters, Sequence)
            and (len(adapters) <= many.memory_max_adapters() or all(isinstance(a, Adapter) for a in adapters))
            and not any(isinstance(a, many.Source) for a in adapters)
            and (weights is None or isinstance(weights, Sequence))):
        return adapters, weights, None, o  # (no Source among them)
    sources, ws = many.gather(adapters, weights)
    _recording(sources, ws, options, hashing=False).close()  # a record too large for the output: refused now
    if o.engine == "memory":  # asked for: every adapter loaded as the in-memory path loads them (LoHa too), once
        # the header pass has checked them as for the other engines (a bad adapter named by its list line)
        _header_pass(sources, ws, o, structured=True)
        return sources, ws, None, o
    if o.engine == "ray":
        ray_engine.check_paths(sources)  # before the header pass: Ray tasks open adapters by path
    plan = _header_pass(sources, ws, o, structured=o.engine == "auto" and not many.stream_asked(o))
    if plan is None:  # cat of adapters that share nothing: the in-memory path, which checks them all again
        return sources, ws, None, o
    if plan.structured is not None:  # a LoHa / LoKr: the in-memory path takes it, when the list is short enough
        if len(sources) > many.memory_max_adapters():
            raise many.structured_refusal(plan.structured)
        return sources, ws, None, o
    if not plan.modules:
        raise _no_module([str(x.path) if x.path is not None else x.where for x in plan.sources])
    if many.choose_engine(plan, o, backend_for_device(o.device)) == "memory":
        return sources, ws, None, o
    _note_one_adapter(len(sources), sources[0].where, REGISTRY[o.method])  # (the in-memory path: in _prepare)
    plan.identities.note()
    return [], None, plan, o


def _header_pass(sources: list[many.Source], ws: list[float], o: CombineOptions, structured: bool) -> many.Plan | None:
    """many.check_sources (every adapter checked before any work), or None for method 'cat' of adapters that share
    no module and no root: cat puts disjoint modules side by side on purpose (as _prepare and the CLI let it),
    and never streams."""
    try:
        return many.check_sources(sources, ws, o.method, structured=structured, progress=o.progress)
    except UnsharedModulesError:
        if o.method != "cat":
            raise
        return None


def _run_streamed(plan: many.Plan, o: CombineOptions,
                  on_module: Callable[[str, LoraUpdate], None]) -> many.StreamSummary:
    """The streamed engine the options name: Ray's (engine 'ray') or the local one."""
    if o.engine == "ray":
        return ray_engine.run_ray(plan, o, on_module)
    return many.run_stream(plan, o, on_module)


def _recording(items: Sequence[Adapter | many.Source], weights: Sequence[float], options: CombineOptions,
               hashing: bool = True) -> Recording:
    """The provenance of this combination (io.provenance), its inputs' sha256 computed on background threads
    meanwhile (`hashing`; without it, only the record's size is checked): each adapter with its weight, the
    method, the options as given (how the run goes left out)."""
    specs = [adapter_input(i.item if isinstance(i, many.Source) else i, float(w)) for i, w in zip(items, weights)]
    return Recording("combine", specs, dataclasses.asdict(options), method=options.method,
                     workers=resolve_threads(options.threads), hashing=hashing)


def combine_with(adapters: AnyAdapters, weights: Iterable[float] | None, options: CombineOptions) -> Adapter:
    """combine() with its options as one CombineOptions. The result's `provenance` records the inputs (their
    sha256), the method and the options (io.provenance); its save() writes them."""
    options = _spelled(options)
    items, weights, plan, o = _route(adapters, weights, options)
    if plan is not None:
        plan.output_dtype(o.dtype)  # its note where the inputs' dtypes differ
        computed: dict[str, LoraUpdate] = {}
        with _recording(plan.sources, plan.weights, options) as rec:
            _run_streamed(plan, o, computed.__setitem__)
            streamed = many.template_of(plan, computed)
            streamed.randomized = many.randomized_modules(plan, o)
            streamed.provenance = rec.result()
            many.raise_if_changed(plan)  # (see _unchanged)
        return streamed
    p = _prepare(items, weights, o)
    updates: dict[str, LoraUpdate] = {}
    randomized: list[str] = []
    with _recording(p.loaded, p.weights, options) as rec:
        for name, update, was_randomized in _outputs(p):
            updates[name] = update
            if was_randomized:
                randomized.append(name)
        # An input file truncated or rewritten while it was read leaves zeros in what was read: refuse the result.
        raise_if_inputs_changed([s for a in p.loaded for s in a.sources()])
        combined = result(p.loaded[0], updates, p.loaded)
        combined.randomized = randomized
        combined.provenance = rec.result()
    return combined


@dataclasses.dataclass(frozen=True)
class CombineReport:
    """What combine_to wrote (an AdapterReport): the output, its modules' ranks (in file order), the
    modules that took a randomized SVD, the dtype of its factors ('F32', 'F16' or 'BF16'), the wall time
    and the notes (what the output's name decided; combine's other notes are warnings)."""

    out: Path
    ranks: dict[str, int]
    randomized: list[str]
    dtype: str = "F32"
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    engine: str = "memory"  # 'memory' (every adapter mapped at once), 'stream' (ops.combine.many) or 'ray'
    summary: many.StreamSummary | None = None  # the streamed engine's: adapters, passes, bytes, time, memory

    def __len__(self) -> int:
        return len(self.ranks)


def combine_to(adapters: AnyAdapters, weights: Iterable[float] | None,
               options: CombineOptions, out: str | os.PathLike[str], format: str | None = None, *,
               overwrite: bool = False) -> CombineReport:
    """combine_with(...).save(out, format), streamed: each group of modules is written to the output as
    soon as it is computed and then dropped, so memory is bounded by a group, not by the output's size.
    The output is the same file save() would write, committed atomically once every module is in it
    (an error or an input changed while read leaves `out` as it was). `format` defaults to the first
    adapter's; `out` means what the CLI's `combine -o` makes of it, checked before any module is computed
    (ops.outputs.python_output, the rules of Adapter.save: a `.safetensors` name is one file, a folder name
    given a one-file format gets the file inside it; what the name decided is in the report's notes), and
    may not replace an input."""
    start = time.perf_counter()
    out = check_path(out, "out")
    overwrite = check_bool(overwrite, "overwrite")
    options = _spelled(options)
    s = prepare_to(adapters, weights, options)
    o, layout, template, inputs = s.options, s.layout, s.template, s.inputs
    # what the name means, as for the CLI (the template holds the output's modules and names its first input; the
    # inputs, in memory, name the one whose modules a format cannot hold)
    target = python_output(out, format, s.prepared.loaded if s.prepared is not None else [template], inputs,
                           overwrite=overwrite)
    notes = [target.note] if target.note else []
    # The header, written first, holds the inputs' sha256: as placeholders while the background threads hash
    # them (meanwhile the modules are computed); the commit waits for the hashes and writes them in place.
    if s.stream is not None:
        with _recording(s.stream.sources, s.stream.weights, options) as rec:
            template.provenance = rec.draft()
            report = _stream_to(s.stream, o, layout, template, s.dtype, target.path, target.format, overwrite, start,
                                rec.result)
            return dataclasses.replace(report, notes=notes)
    p = s.prepared
    assert p is not None
    randomized: list[str] = []
    with _recording(p.loaded, p.weights, options) as rec:
        template.provenance = rec.draft()
        with open_stream(target.format, target.path, layout, template, overwrite=overwrite, inputs=inputs,
                         final_provenance=rec.result) as w:
            for name, update, was_randomized in _outputs(p):
                w.put(name, update)
                if was_randomized:
                    randomized.append(name)
            raise_if_inputs_changed(inputs)  # before the commit: a changed input never reaches the output
    return CombineReport(w.out, {n: m.rank for n, m in layout.items()}, randomized, p.dtype,
                         time.perf_counter() - start, notes)


@dataclasses.dataclass
class CombineSetup:
    """What combine_to knows before it opens the output (prepare_to): the checked options, the output's
    layout (every module's rank, shape, dtype) and template adapter (config, state), the dtype of its
    factors, the input files, and the engine's own state: `prepared` (in memory) or `stream` (the header
    pass's plan, ops.combine.many)."""

    options: CombineOptions
    layout: AdapterLayout
    template: Adapter
    dtype: str
    inputs: list[Path]
    prepared: _Prepared | None = None
    stream: many.Plan | None = None

    @property
    def engine(self) -> str:
        """'memory', 'stream', or 'ray' (the streamed passes as Ray tasks)."""
        if self.stream is None:
            return "memory"
        return "ray" if self.options.engine == "ray" else "stream"


def prepare_to(adapters: AnyAdapters, weights: Iterable[float] | None, options: CombineOptions) -> CombineSetup:
    """Everything combine_to does before it opens the output (its arguments' meaning: combine_to): the
    options checked, the adapters read (headers; the in-memory engine maps them), the engine chosen, every
    rule of the method checked and each module's output rank decided. Writes nothing."""
    items, weights, plan, o = _route(adapters, weights, _spelled(options))
    if plan is not None:
        dtype = plan.output_dtype(o.dtype)
        layout = AdapterLayout(many.layout_of(plan, o, dtype))
        return CombineSetup(o, layout, many.template_of(plan, layout.placeholders()), dtype, plan.paths, stream=plan)
    p = _prepare(items, weights, o)
    layout = AdapterLayout(dataclasses.replace(ModuleLayout.like(ts[0].update, p.method.rank_of(n, ts, p.ctx),
                                                                 dtype=p.dtype), name=n)
                           for n, ts in p.by_module.items())
    template = result(p.loaded[0], layout.placeholders(), p.loaded)
    return CombineSetup(o, layout, template, p.dtype, [s for a in p.loaded for s in a.sources()], prepared=p)


def _unchanged(plan: many.Plan, final: Callable[[], Provenance]) -> Callable[[], Provenance]:
    """`final` (the record, once the inputs' hashes are done), then a check that every adapter is still the
    one the header pass read: the passes check each adapter as they read it, but the hashes run on their own
    threads, and one that reached a file replaced after the last pass would record bytes no pass read."""

    def checked() -> Provenance:
        record = final()
        many.raise_if_changed(plan)
        return record

    return checked


def _stream_to(plan: many.Plan, o: CombineOptions, layout: AdapterLayout, template: Adapter, dtype: str,
               out: str | os.PathLike[str], format: str | None, overwrite: bool, start: float,
               final: Callable[[], Provenance]) -> CombineReport:
    """combine_to by the streamed engine: the output is opened (and checked) before the first pass, each
    module is put once the passes are done, and the provenance (`final`: the inputs' sha256, hashed during
    the passes) is written at the commit."""
    with open_stream(format, out, layout, template, overwrite=overwrite, inputs=plan.paths,
                     final_provenance=_unchanged(plan, final)) as w:
        summary = _run_streamed(plan, o, w.put)
        raise_if_inputs_changed(plan.paths)
    return CombineReport(w.out, {n: m.rank for n, m in layout.items()},
                         many.randomized_modules(plan, o), dtype, time.perf_counter() - start,
                         engine=summary.engine, summary=summary)

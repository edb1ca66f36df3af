"""The layout of an adapter that is written while it is computed (a streamed output): for every module
what its update will be like (kind, delta shape, rank, dtype, scale, layout), known before any of its
values. A format computes from it everything that depends on all modules (configs, metadata, the
safetensors header); the updates then arrive one by one (`AdapterWriter.put`), each checked against
its entry. The writers are the formats' (lorafuse.formats.streaming); the registry's `open_stream`
entry opens one.

Which dtype the factors an operation recomputes get (output_dtype: the one asked for, else the inputs'),
and their rounding to it (rounded), are here too: a streamed output's layout and the saved adapter
must agree on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lorafuse.errors import AdapterNote, LorafuseValueError, NonFiniteError, ShapeMismatchError, UnsupportedError, warn
from lorafuse.io.dtypes import DTYPES, WRITABLE_FLOATS, parse_output_dtype
from lorafuse.io.tensor import Tensor
from lorafuse.model.lora import LoraUpdate
from lorafuse.model.names import Kind
from lorafuse.model.tucker import TuckerFactor
from lorafuse.model.update import Update

if TYPE_CHECKING:
    from lorafuse.model.adapter import Adapter

_KINDS = ("linear", "conv", "embedding")


@dataclass(frozen=True)
class ModuleLayout:
    """What one module's update will be: a LoraUpdate of `rank` whose stored factors have `dtype`, adding to
    a base weight of `delta_shape` (conv: (out, in, *kernel), Conv1d to Conv3d) with `scale`. `transposed` as in
    LoraUpdate (PEFT embeddings, fan_in_fan_out). No DoRA magnitude and no bias: a streamed output is plain LoRA."""

    name: str
    kind: Kind
    delta_shape: tuple[int, ...]
    rank: int
    dtype: str = "F32"
    scale: float = 1.0
    transposed: bool = False

    def __post_init__(self) -> None:
        where = f"layout of module {self.name!r}"
        if self.kind not in _KINDS:
            raise LorafuseValueError(f"{where}: kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        shape = tuple(self.delta_shape)
        if len(shape) < 2 or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
            raise LorafuseValueError(f"{where}: delta shape {shape} is not (out, in) or (out, in, *kernel) of "
                                     "positive sizes")
        if (len(shape) > 2) != (self.kind == "conv") or (self.transposed and len(shape) != 2):
            raise LorafuseValueError(f"{where}: a {self.kind}{' transposed' if self.transposed else ''} update "
                                     f"cannot have the delta shape {shape}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int | np.integer) or self.rank < 1:
            raise LorafuseValueError(f"{where}: rank must be a positive integer, got {self.rank!r}")
        if self.dtype not in DTYPES or not DTYPES[self.dtype].is_float:
            raise LorafuseValueError(f"{where}: dtype must be a float dtype (F32, F16, BF16, ...), got {self.dtype!r}")
        if not np.isfinite(self.scale):
            raise LorafuseValueError(f"{where}: scale {self.scale} is not finite")
        object.__setattr__(self, "delta_shape", tuple(int(d) for d in shape))
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def a_shape(self) -> tuple[int, ...]:
        """Shape of the stored A (lora_A / lora_down / lora_embedding_A)."""
        if self.transposed:
            return (self.rank, self.delta_shape[0])
        return (self.rank, *self.delta_shape[1:])

    @property
    def b_shape(self) -> tuple[int, ...]:
        """Shape of the stored B (lora_B / lora_up / lora_embedding_B)."""
        if self.transposed:
            return (self.delta_shape[1], self.rank)
        return (self.delta_shape[0], self.rank, *(1,) * (len(self.delta_shape) - 2))

    @classmethod
    def of(cls, update: Update) -> ModuleLayout:
        """The layout of an existing update (a plain LoraUpdate with factors of one dtype)."""
        u = _plain(update, "its layout")
        if u.A.dtype != u.B.dtype:
            raise UnsupportedError(f"module {u.name!r}: A is {u.A.dtype} and B is {u.B.dtype}; a layout has one "
                                   "dtype for both")
        return cls(u.name, u.kind, tuple(u.delta_shape), u.rank, u.A.dtype, u.scale, u.transposed)

    @classmethod
    def like(cls, update: Update, rank: int, scale: float = 1.0, dtype: str = "F32") -> ModuleLayout:
        """The layout of `update.with_factors(b, a, scale)` with factors of `rank` (float32 by default):
        what an operation that recomputes a module's factors (combine, resize) will put."""
        transposed = isinstance(update, LoraUpdate) and update.transposed
        return cls(update.name, update.kind, tuple(update.delta_shape), rank, dtype, scale, transposed)

    def placeholder(self) -> LoraUpdate:
        """A LoraUpdate of this layout whose factors are zeros that take no memory (broadcast views): for
        computing a format's config, metadata and header before any factor exists."""
        raw = DTYPES[self.dtype].raw
        a = Tensor(np.broadcast_to(np.zeros((), dtype=raw), self.a_shape), self.dtype)
        b = Tensor(np.broadcast_to(np.zeros((), dtype=raw), self.b_shape), self.dtype)
        return LoraUpdate(self.name, a, b, self.scale, self.kind, self.transposed)

    def check(self, update: Update, where: str) -> LoraUpdate:
        """`update` when it is what this entry says; else ShapeMismatchError (LorafuseValueError for the
        scale, UnsupportedError for what a streamed output cannot hold) naming the module and both."""
        u = _plain(update, f"{where}: module {self.name!r}")
        given = f"rank {u.rank}, A {u.A.shape} {u.A.dtype}, B {u.B.shape} {u.B.dtype}, {u.kind}" + \
            (" transposed" if u.transposed else "")
        wanted = f"rank {self.rank}, A {self.a_shape} {self.dtype}, B {self.b_shape} {self.dtype}, {self.kind}" + \
            (" transposed" if self.transposed else "")
        if (u.kind, u.transposed, u.A.shape, u.B.shape, u.A.dtype, u.B.dtype) != \
                (self.kind, self.transposed, self.a_shape, self.b_shape, self.dtype, self.dtype):
            raise ShapeMismatchError(f"{where}: module {self.name!r}: the update has {given} but the layout says "
                                     f"{wanted}")
        if u.scale != self.scale:
            raise LorafuseValueError(f"{where}: module {self.name!r}: the update has scale {u.scale!r} but the layout "
                                     f"says {self.scale!r} (the output's configs and metadata hold the layout's)")
        return u


def _plain(update: object, where: str) -> LoraUpdate:
    if not isinstance(update, LoraUpdate):
        raise UnsupportedError(f"{where}: {type(update).__name__} is not a LoRA update; a streamed output holds "
                               "LoRA factors only")
    if not update.is_plain():
        raise UnsupportedError(f"{where}: a DoRA magnitude or a bias cannot be streamed; a streamed output holds "
                               "plain LoRA factors")
    return update


class AdapterLayout(Mapping[str, ModuleLayout]):
    """The modules of a streamed output, in the order they are written into configs and headers
    (the order `Adapter.updates` would have)."""

    def __init__(self, modules: Iterable[ModuleLayout]) -> None:
        self._modules: dict[str, ModuleLayout] = {}
        for m in modules:
            if not isinstance(m, ModuleLayout):
                raise LorafuseValueError(f"a layout holds ModuleLayout entries, got {type(m).__name__}")
            if m.name in self._modules:
                raise LorafuseValueError(f"module {m.name!r} is twice in the layout")
            self._modules[m.name] = m

    @classmethod
    def of(cls, updates: Mapping[str, Update]) -> AdapterLayout:
        """The layout of existing updates (plain LoRA), in their order."""
        return cls(ModuleLayout.of(u) if u.name == n else dataclasses.replace(ModuleLayout.of(u), name=n)
                   for n, u in updates.items())

    def __getitem__(self, name: str) -> ModuleLayout:
        return self._modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def placeholders(self) -> dict[str, LoraUpdate]:
        """Every module's placeholder update (ModuleLayout.placeholder), in order."""
        return {n: m.placeholder() for n, m in self._modules.items()}


def factor_dtypes(updates: Iterable[Update]) -> list[str]:
    """The dtypes the updates' factors are stored in (lora_A / lora_B, lora_down / lora_up, lora_mid, the
    LoHa / LoKr pieces; not a DoRA magnitude or a lora_B bias), sorted."""
    found: set[str] = set()
    for u in updates:
        if isinstance(u, LoraUpdate):
            found.update(t.dtype for t in ((u.A.mid, u.A.down) if isinstance(u.A, TuckerFactor) else (u.A,)))
            found.add(u.B.dtype)
        else:
            found.update(t.dtype for t in u.tensors.values())
    return sorted(found)


def factors_dtype(dtypes: Iterable[str]) -> str:
    """The dtype of the factors an operation recomputes from inputs whose factors have `dtypes`
    (factor_dtypes): their one dtype when it is F32, F16 or BF16, else F32 (mixed dtypes, F64, F8)."""
    found = set(dtypes)
    return found.pop() if len(found) == 1 and found <= set(WRITABLE_FLOATS) else "F32"


def check_dtype(dtype: object) -> str | None:
    """None, or the safetensors name ('F32', 'F16', 'BF16') of an output dtype given as 'fp32', 'fp16',
    'bf16', an alias io.dtypes accepts ('float', 'half', 'bfloat16', 'torch.float16', ...) or a torch / numpy
    dtype (torch.bfloat16, np.float16)."""
    if dtype is None:
        return None
    return parse_output_dtype(dtype)


def output_dtype(adapters: Sequence[Adapter], dtype: object, what: str) -> str:
    """The dtype of the factors `what` (combine, resize) recomputes from `adapters`: `dtype` (check_dtype)
    when given, else the inputs' factor dtype (factors_dtype); inputs whose factors differ (or are F64 / F8)
    get F32, said in an AdapterNote that names them."""
    chosen = check_dtype(dtype)
    if chosen is not None:
        return chosen
    per_input = [(a.label, factor_dtypes(a.updates.values())) for a in adapters]
    found = sorted({d for _, ds in per_input for d in ds})
    out = factors_dtype(found)
    if found and found != [out]:
        shown = "; ".join(f"{label}: {'/'.join(ds)}" for label, ds in per_input[:4] if ds)
        more = "; ..." if len(per_input) > 4 else ""
        warn(f"{what}: the inputs' factors are {' and '.join(found)} ({shown}{more}), so the result's "
             f"are {out} (--dtype, dtype=, chooses fp32, fp16 or bf16)", AdapterNote)
    return out


_LARGEST = {"F16": "65504", "BF16": "3.39e38"}
# Twice the unit roundoff of each writable dtype: a factor whose rounding costs more (relative Frobenius error)
# has lost values to the dtype's subnormal range.
_LOSS = {"F32": 2.0 ** -23, "F16": 2.0 ** -10, "BF16": 2.0 ** -7}
_SMALLEST = {"F32": "1.4e-45", "F16": "6e-08", "BF16": "9.2e-41"}
# A factor that loses more than this (relative Frobenius error), even balanced, has lost its values to the dtype's
# subnormal range or to zero: the delta written would not be the module's (refused, never written).
_UNDERFLOW = 2.0 ** -4


def is_kxk(shape: Sequence[int]) -> bool:
    """Whether a delta of `shape` is a kxk convolution's (k > 1): what --conv-rank / kohya's conv_dim rank."""
    return len(shape) == 4 and shape[2] * shape[3] > 1


def _relative_loss(before: np.ndarray, after: np.ndarray) -> float:
    """||after - before||_F / ||before||_F in float64 (inf when `after` is not finite, 0 for a zero factor)."""
    if not np.isfinite(after).all():
        return math.inf
    x = before.astype(np.float64)
    norm = float(np.linalg.norm(x))
    return float(np.linalg.norm(after.astype(np.float64) - x)) / norm if norm > 0 else 0.0


def largest_exponent(x: np.ndarray) -> int:
    """The binary exponent of x's largest magnitude (frexp's: 2^(e-1) <= m < 2^e); 0 for an empty or zero x, or
    one holding NaN or Inf."""
    m = float(np.max(np.abs(x))) if x.size else 0.0
    return math.frexp(m)[1] if m > 0 else 0


FP32_ADVICE = "write the factors as float32 (--dtype fp32, dtype='fp32')"


def _balanced_per_rank(a32: np.ndarray, b32: np.ndarray, a: Tensor, b: Tensor, dtype: str,
                       threads: int) -> tuple[np.ndarray, np.ndarray, Tensor, Tensor]:
    """(A, B) float32 and rounded to `dtype`, balanced per rank direction where one power of two for all of them
    still loses (the rank directions of a concatenation, B_j 1e15 and A_j 1e-15 beside B_i and A_i of 1): row j of
    A times 2^k_j and column j of B times 2^-k_j (exact), each balancing that direction's largest values."""
    loss = max(_relative_loss(a32, a.f32(threads)), _relative_loss(b32, b.f32(threads)))
    r = a32.shape[0]
    if loss <= _LOSS[dtype] or a32.size == 0 or b32.ndim < 2 or b32.shape[1] != r or b32.size == 0:
        return a32, b32, a, b
    with np.errstate(divide="ignore"):
        ea = np.frexp(np.abs(a32.reshape(r, -1)).max(axis=1))[1]
        eb = np.frexp(np.abs(np.moveaxis(b32, 1, 0).reshape(r, -1)).max(axis=1))[1]
    k = (eb.astype(np.int64) - ea.astype(np.int64)) // 2
    if not k.any():
        return a32, b32, a, b
    a2 = np.ldexp(a32, k.reshape((r,) + (1,) * (a32.ndim - 1))).astype(np.float32)
    b2 = np.ldexp(b32, -k.reshape((1, r) + (1,) * (b32.ndim - 2))).astype(np.float32)
    a_k, b_k = Tensor.from_array(a2).to(dtype, threads), Tensor.from_array(b2).to(dtype, threads)
    if max(_relative_loss(a2, a_k.f32(threads)), _relative_loss(b2, b_k.f32(threads))) < loss:
        return a2, b2, a_k, b_k
    return a32, b32, a, b


def rounded(update: LoraUpdate, dtype: str, threads: int = 0, refuse_underflow: bool = False,
            advice: str = FP32_ADVICE) -> LoraUpdate:
    """`update` with its factors rounded once, to nearest even, to `dtype` (F32, F16 or BF16); the update
    itself when they already are. B A is what counts, not how it is split: where rounding either factor would
    lose it (F16 factors of 1e-5 fall into the subnormals, 1e5 beyond the largest finite value), B is
    multiplied by 2^-k and A by 2^k (exact), k balancing their largest values, and rounded again. A finite
    value that is still beyond the dtype's largest finite value is refused with NonFiniteError naming the
    module: the float32 factors had it. `refuse_underflow`: factors of a delta known to be nonzero (extract,
    resize; not a sum that may cancel to float32's rounding noise) that lose most of their norm below the dtype's
    smallest value are refused too (UnsupportedError naming the module), never written as zeros. `advice`: what
    both refusals tell the user to do (the caller's own option; by default --dtype fp32)."""
    if update.A.dtype == dtype and update.B.dtype == dtype:
        return update
    if dtype not in WRITABLE_FLOATS:
        raise LorafuseValueError(f"module {update.name!r}: factors can be written as {', '.join(WRITABLE_FLOATS)}, "
                                 f"not {dtype!r}")
    a32, b32 = update.A.f32(threads), update.B.f32(threads)
    a, b = update.A.to(dtype, threads), update.B.to(dtype, threads)
    loss = max(_relative_loss(a32, a.f32(threads)), _relative_loss(b32, b.f32(threads)))
    if loss > _LOSS[dtype] and np.isfinite(a32).all() and np.isfinite(b32).all():
        k = (largest_exponent(b32) - largest_exponent(a32)) // 2  # max|B 2^-k| ~ max|A 2^k|
        if k:
            a2, b2 = np.ldexp(a32, k).astype(np.float32), np.ldexp(b32, -k).astype(np.float32)
            a_k, b_k = Tensor.from_array(a2).to(dtype, threads), Tensor.from_array(b2).to(dtype, threads)
            if max(_relative_loss(a2, a_k.f32(threads)), _relative_loss(b2, b_k.f32(threads))) < loss:
                a32, b32, a, b = a2, b2, a_k, b_k
        a32, b32, a, b = _balanced_per_rank(a32, b32, a, b, dtype, threads)
    for wide, narrow in ((a32, a), (b32, b)):
        if not np.isfinite(narrow.f32(threads)).all() and np.isfinite(wide).all():
            raise NonFiniteError(f"module {update.name!r}: a factor value ({float(np.abs(wide).max()):.4g}) is "
                                 f"beyond the largest finite {dtype} ({_LARGEST.get(dtype, '?')}), even balanced "
                                 f"between B and A by a power of two; {advice}")
    for label, wide, narrow in (("A", a32, a), ("B", b32, b)) if refuse_underflow and loss > _UNDERFLOW else ():
        lost = _relative_loss(wide, narrow.f32(threads))
        if lost > _UNDERFLOW and np.isfinite(wide).all():
            raise UnsupportedError(f"module {update.name!r}: its factor {label} {tuple(wide.shape)} (largest value "
                                   f"{float(np.abs(wide).max()):.4g}) rounded to {dtype} loses {min(lost, 1.0):.0%} "
                                   f"of its norm to values below the smallest {dtype} ({_SMALLEST.get(dtype, '?')}), "
                                   "even balanced between B and A by a power of two: the delta written would not be "
                                   f"the module's; {advice}")
    return dataclasses.replace(update, A=a, B=b)


def refuse_lost_directions(where: str, b: np.ndarray, a: np.ndarray, s: np.ndarray, split: str) -> None:
    """Refuse (UnsupportedError naming `where`, the module) new float32 factors of an SVD whose kept singular
    values `s` fell below float32's range (values under ~1e-38 with them on B): they would write a delta of zeros
    or a fraction of the module's. Each kept direction j holds ||B_j|| ||A_j|| = s_j."""
    n = min(len(s), b.shape[1], a.shape[0])
    kept = np.asarray(s[:n], dtype=np.float64)
    total = float(np.sqrt(np.sum(kept**2)))
    if not n or not total > 0 or kept[-1] > 2.0**-100:  # (all of float32's normal range: nothing to lose)
        return
    held = np.linalg.norm(b[:, :n].astype(np.float64), axis=0) * np.linalg.norm(a[:n].astype(np.float64), axis=1)
    lost = float(np.sqrt(np.sum((kept - held) ** 2))) / total
    if lost <= 2.0**-4:
        return
    how = ("even as their square roots on both factors" if split == "sqrt" else
           "with them on B (--split sqrt, split='sqrt', puts their square roots on both factors)")
    raise UnsupportedError(f"{where}: its kept singular values ({float(kept[0]):.3g} .. {float(kept[-1]):.3g}) are "
                           f"below float32's range {how}: the factors (B {tuple(b.shape)}, A {tuple(a.shape)}) would "
                           f"lose {min(lost, 1.0):.0%} of the delta")


class AdapterWriter(Protocol):
    """A streamed output being written: `put` each module's update (any order, each once), then `close`
    (commits the output atomically) or `abort` (removes what was written). As a context manager it
    closes on success and aborts on an exception."""

    def put(self, name: str, update: Update) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def __enter__(self) -> AdapterWriter: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


__all__ = ["AdapterLayout", "AdapterWriter", "ModuleLayout", "check_dtype", "factor_dtypes", "factors_dtype",
           "output_dtype", "rounded"]

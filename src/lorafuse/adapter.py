"""The data model: an adapter maps module names to low-rank updates.

A module name is canonical: the base model's weight key without `.weight`
(`model.layers.0.self_attn.q_proj`). Each update holds its factors as stored by
its format (memory-mapped until used) and knows how they map onto the base
weight's layout: delta = scale * B_c @ A_c, with B_c (rows x r) and A_c
(r x cols) where the base weight, flattened to 2-D, is (rows x cols).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

from lorafuse.errors import FormatError, LorafuseValueError
from lorafuse.io.tensor import Tensor

if TYPE_CHECKING:
    from lorafuse.formats.lycoris import LycorisUpdate

Kind = Literal["linear", "conv", "embedding"]
MAX_NAME_LENGTH = 1024  # real module names are under 200 characters


def check_module_name(name: str, where: str, what: str = "module") -> None:
    """Refuse a module (or tensor) name read from a file that no model can have and that could
    do harm on its way to messages, terminals or other tools: empty, very long, with control or
    other non-printable characters (NUL, newlines, escapes, bidi overrides), with a path
    separator, or with an empty dotted component ('a..b', '.a', 'a.')."""
    problem = None
    if not name:
        problem = "is empty"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"has {len(name)} characters (at most {MAX_NAME_LENGTH})"
    elif not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        problem = f"holds the non-printable character U+{ord(bad):04X}"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator ('/' or '\\')"
    elif "" in name.split("."):
        problem = "has an empty component (a leading, trailing or doubled '.')"
    if problem is not None:
        shown = repr(name) if len(name) <= 200 else repr(name[:200]) + "..."
        raise FormatError(f"{where}: {what} name {shown} {problem}")


@dataclass
class LoraUpdate:
    """One module's low-rank update.

    `A` (r x in, or r x in x kh x kw for conv) and `B` (out x r [x 1 x 1]) are as the
    format stores them. When `transposed` is set (PEFT embeddings, `fan_in_fan_out`
    layers) the base weight holds (B @ A)^T, so B_c = A^T and A_c = B^T.
    """

    name: str
    A: Tensor
    B: Tensor
    scale: float
    kind: Kind = "linear"
    transposed: bool = False
    magnitude: Tensor | None = None  # DoRA: one value per output feature (a row, or a column if transposed)
    bias: Tensor | None = None  # lora_B bias, added to the base bias times scale
    # DoRA that normalizes the base weight's columns (LyCORIS `wd_on_out=False` on a Linear) although
    # the update is not transposed: magnitude then has one value per column of the 2-D base weight.
    magnitude_on_columns: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this update adds to."""
        if self.transposed:
            return (self.A.shape[1], self.B.shape[0])
        return (self.B.shape[0], *self.A.shape[1:])

    def stored_factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(B, A) as float32, unscaled, in the format's own orientation, flattened to 2-D:
        B (out x r) and A (r x in, or r x in*kh*kw for conv)."""
        a = self.A.f32(threads).reshape(self.rank, -1)
        b = self.B.f32(threads).reshape(self.B.shape[0], self.rank)
        return b, a

    def factors(self, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(B_c, A_c) as C-contiguous float32, unscaled, in the base weight's 2-D layout."""
        b, a = self.stored_factors(threads)
        if self.transposed:
            return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
        return np.ascontiguousarray(b), np.ascontiguousarray(a)

    def with_factors(self, b: np.ndarray, a: np.ndarray, scale: float = 1.0) -> LoraUpdate:
        """The update of the same module and layout with new stored factors B (out x k), A (k x ...) and
        `scale`. What travels with the factors is kept, never dropped: the DoRA magnitude (and which
        side it normalizes) as it is, the lora_B bias rescaled so that scale * bias, what a merge adds,
        stays the same. (Operations that cannot honour them, such as combining, refuse them first.)"""
        k = a.shape[0]
        a_t = Tensor.from_array(np.ascontiguousarray(a, dtype=np.float32).reshape((k, *self.A.shape[1:])))
        b_t = Tensor.from_array(np.ascontiguousarray(b, dtype=np.float32).reshape(
            (self.B.shape[0], k, *self.B.shape[2:])))
        bias = self.bias
        if bias is not None and scale != self.scale:
            if scale == 0 or not np.isfinite(scale):
                raise LorafuseValueError(f"module {self.name!r}: its lora_B bias (added times scale {self.scale}) "
                                         f"cannot be kept by an update of scale {scale}")
            rescaled = bias.f32().astype(np.float64) * (self.scale / scale)
            bias = Tensor.from_array(rescaled.astype(np.float32))
        return LoraUpdate(self.name, a_t, b_t, scale, self.kind, self.transposed, self.magnitude, bias,
                          self.magnitude_on_columns)

    def is_plain(self) -> bool:
        """A pure low-rank delta: no DoRA magnitude, no bias (those do not add linearly)."""
        return self.magnitude is None and self.bias is None

    def delta(self) -> np.ndarray:
        """The dense delta in float64 (for small modules, reports and tests)."""
        b, a = self.factors()
        return (self.scale * (b.astype(np.float64) @ a.astype(np.float64))).reshape(self.delta_shape)


# A module's update: low-rank factors, or a LyCORIS LoHa / LoKr (formats.lycoris) that offers the
# same interface (scale, delta_shape, rank and stored_factors of an exact factorization, delta()).
Update = Union[LoraUpdate, "LycorisUpdate"]


def stored_tensors(u: Update) -> list[Tensor]:
    """The tensors an update keeps from its file: factors, LyCORIS pieces, DoRA magnitude, bias."""
    own = [u.A, u.B] if isinstance(u, LoraUpdate) else list(u.tensors.values())
    return own + [t for t in (u.magnitude, u.bias) if t is not None]


@dataclass
class Adapter:
    """A set of low-rank updates plus the full tensors that travel with them."""

    updates: dict[str, Update]
    full: dict[str, Tensor] = field(default_factory=dict)  # base key -> replacement (modules_to_save, base_layer)
    config: dict[str, object] = field(default_factory=dict)
    format: str = "peft"
    path: Path | None = None
    full_origin: dict[str, str] = field(default_factory=dict)  # full-tensor key -> name it was saved under
    # Modules whose factors came from a randomized SVD (near-optimal, not the exact optimum).
    randomized: list[str] = field(default_factory=list)
    # The files an adapter computed from others (combine, resize, arithmetic) was read from: like
    # `path`, `save` never writes over them.
    derived_from: list[Path] = field(default_factory=list)
    # What reading the file left out or decided, for the user (e.g. tensors PEFT ignores): apply reports them.
    notes: list[str] = field(default_factory=list)

    def sources(self) -> list[Path]:
        """The files this adapter's tensors come from: its own path and those it was derived from."""
        return ([self.path] if self.path is not None else []) + list(self.derived_from)

    def __len__(self) -> int:
        return len(self.updates)

    def __iter__(self) -> Iterator[str]:
        return iter(self.updates)

    def __getitem__(self, name: str) -> Update:
        return self.updates[name]

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory adapter>"

    def norms(self, threads: int = 0) -> dict[str, float]:
        """Exact ||delta||_F of every module, from the factors alone (no dense matrix): stored LoRA factors
        through the core in batches (Ctrl-C and SIGTERM act between them), LoHa / LoKr / Tucker modules
        through their structure (formats.lycoris: ||w1 (x) w2|| = ||w1|| ||w2||, ...)."""
        from lorafuse.formats.lycoris import frobenius_norms

        return frobenius_norms(self.updates, threads)

    def num_parameters(self) -> int:
        n = sum(int(np.prod(t.shape)) for u in self.updates.values() for t in stored_tensors(u))
        return n + sum(int(np.prod(t.shape)) for t in self.full.values())

    # ---- files and in-memory state dicts --------------------------------------------------

    def save(self, out: str | os.PathLike[str], format: str | None = None, overwrite: bool = False) -> Path:
        """Write this adapter (atomically): 'peft' (a folder), 'kohya' (one .safetensors file) or
        'diffusers' (one .safetensors file as diffusers' save_lora_weights writes it); the default is the
        adapter's own format. An output that would replace one of `sources()` is refused. `out` may be
        new, an empty folder / file, or an earlier lorafuse output; anything else is refused unless
        `overwrite=True`, which replaces it with an OverwriteWarning saying what was there."""
        fmt = self.format if format is None else format
        inputs = self.sources()
        if fmt == "peft":
            from lorafuse.formats.peft import save_peft

            return save_peft(self, out, inputs, overwrite=overwrite)
        if fmt == "kohya":
            from lorafuse.formats.kohya import save_kohya

            return save_kohya(self, out, inputs, overwrite=overwrite)
        if fmt == "diffusers":
            from lorafuse.formats.diffusers import save_diffusers

            return save_diffusers(self, out, inputs, overwrite=overwrite)
        raise LorafuseValueError(f"unknown adapter format {fmt!r} (lorafuse writes 'peft', 'kohya' and 'diffusers')")

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], config: Any = None) -> Adapter:
        """An adapter from PEFT-named tensors (numpy arrays, or torch CPU tensors) and a LoRA config
        (a dict like adapter_config.json, or a peft LoraConfig). Without a config every module's
        scale is 1."""
        from lorafuse.formats.peft import build_adapter, check_config

        tensors = {k: _tensor_from_any(v) for k, v in state_dict.items()}
        if config is None:
            ranks = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]: t.shape[0] if t.shape else 0
                     for k, t in tensors.items() if k.endswith((".lora_A.weight", ".lora_embedding_A"))}
            first = next(iter(ranks.values()), 8)
            cfg: dict[str, object] = {
                "peft_type": "LORA", "r": first, "lora_alpha": first,
                "rank_pattern": {re.escape(n): r for n, r in ranks.items()},
                "alpha_pattern": {re.escape(n): r for n, r in ranks.items()},
            }
        else:
            cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            cfg = {k: (sorted(v) if isinstance(v, set) else getattr(v, "value", v)) for k, v in cfg.items()}
        return build_adapter(tensors, check_config(cfg, "<state dict config>"), "<state dict>")

    def state_dict(self, framework: str = "numpy") -> dict[str, Any]:
        """PEFT-named tensors: float arrays for numpy (BF16 and F8 widened to float32: numpy has no such
        types), or torch tensors of the stored dtype (BF16 as torch.bfloat16, F8_E4M3 / F8_E5M2 as
        torch.float8_e4m3fn / torch.float8_e5m2), never their raw bytes as integers."""
        from lorafuse.formats.peft import peft_tensors

        tensors = peft_tensors(self)
        if framework == "numpy":
            return {k: (t.f32() if t.dtype == "BF16" or t.dtype.startswith("F8") else t.raw.copy())
                    for k, t in tensors.items()}
        if framework == "torch":
            import torch

            out = {}
            for k, t in tensors.items():
                x = torch.from_numpy(t.raw.copy())
                view = _TORCH_VIEWS.get(t.dtype)
                out[k] = x.view(getattr(torch, view)) if view else x
            return out
        raise LorafuseValueError(f"framework must be 'numpy' or 'torch', got {framework!r}")

    # ---- exact arithmetic (factored: ranks add up until to_rank) ------------------------

    def __add__(self, other: Adapter) -> Adapter:
        from lorafuse.ops.combine import weighted_cat

        return weighted_cat([(1.0, self), (1.0, other)])

    def __sub__(self, other: Adapter) -> Adapter:
        from lorafuse.ops.combine import weighted_cat

        return weighted_cat([(1.0, self), (-1.0, other)])

    def __neg__(self) -> Adapter:
        return self * -1.0

    def __mul__(self, c: float) -> Adapter:
        from lorafuse.ops.combine import scaled

        if isinstance(c, bool) or not isinstance(c, (int, float, np.floating, np.integer)):
            return NotImplemented
        return scaled(self, float(c))

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> Adapter:
        return self * (1.0 / float(c))

    def to_rank(self, rank: int, split: str = "B", threads: int = 0) -> Adapter:
        """The best rank-`rank` approximation of every module (Eckart-Young, from the factors)."""
        from lorafuse.ops.combine import truncate

        return truncate(self, rank, split, threads)

    svd = to_rank

    def norm(self, threads: int = 0) -> float:
        """Exact Frobenius norm of all deltas together, from the factors."""
        return float(np.sqrt(sum(n * n for n in self.norms(threads).values())))


# safetensors dtypes numpy holds as raw integers, and the torch dtype that views those bytes.
_TORCH_VIEWS = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _tensor_from_any(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return Tensor.from_array(value)
    module = type(value).__module__
    if module.startswith("torch"):
        import torch

        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return Tensor(t.view(torch.int16).numpy().view(np.uint16).copy(), "BF16")
        f8 = next((k for k, v in _TORCH_VIEWS.items() if k != "BF16" and getattr(torch, v, None) == t.dtype), None)
        if f8 is not None:  # what state_dict("torch") gives for F8 tensors: their bytes, as stored
            return Tensor(t.view(torch.uint8).numpy().copy(), f8)
        return Tensor.from_array(t.numpy().copy())
    raise LorafuseValueError(f"state dict values must be numpy arrays or torch tensors, got {type(value).__name__}")

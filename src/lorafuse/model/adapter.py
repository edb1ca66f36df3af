"""The adapter: a mapping from module names to updates, plus the full tensors that travel with them.

A module name is canonical: the base model's weight key without `.weight`
(`model.layers.0.self_attn.q_proj`). Saving goes through the format registry (model.registry, which
the format modules fill in), arithmetic through model.arithmetic, norms through model.spectral:
this module imports no format and no operation.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorafuse._validate import check_bool, check_path, check_text, real_number, unordered
from lorafuse.errors import LorafuseValueError, UnsupportedError
from lorafuse.io.provenance import Provenance
from lorafuse.io.tensor import Tensor
from lorafuse.model.arithmetic import norm, scaled, truncate, weighted_cat
from lorafuse.model.lora import LoraUpdate
from lorafuse.model.lycoris import LycorisUpdate
from lorafuse.model.registry import FormatSpec, get_format, output_rule
from lorafuse.model.spectral import frobenius_norms
from lorafuse.model.state import FormatState, PeftState
from lorafuse.model.update import Update, refuse_dora


@dataclass(eq=False)  # compared by identity: field-wise == would compare numpy arrays (ambiguous truth value)
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
    # What the adapter's format keeps beside its config (kohya: metadata and alpha dtypes; diffusers:
    # metadata, component configs, kohya record), typed (model.state); operations carry it along.
    state: FormatState = field(default_factory=PeftState)
    # How this adapter was made (io.provenance: the operation, its inputs' sha256, ...): written into its
    # files' metadata and a folder's model card. Each operation sets its own; None for arithmetic results.
    provenance: Provenance | None = None

    def __setattr__(self, name: str, value: object) -> None:
        # A field the caller assigns (`adapter.config = None`, `adapter.updates = [...]`) is checked here, so that
        # every later operation reads what it expects or the assignment is refused naming the field.
        expected = _FIELD_TYPES.get(name)
        if name == "path" and isinstance(value, (str, bytes, os.PathLike)) and not isinstance(value, Path):
            value = Path(check_path(value, "Adapter.path"))
        elif expected is not None and not isinstance(value, expected[0]):
            raise LorafuseValueError(f"Adapter.{name} must be {expected[1]}, got {type(value).__name__} "
                                     f"({value!r:.80})")
        if name == "updates":
            bad = next(((k, u) for k, u in value.items()  # type: ignore[attr-defined]
                        if not isinstance(k, str) or not isinstance(u, (LoraUpdate, LycorisUpdate))), None)
            if bad is not None:
                raise LorafuseValueError(f"Adapter.updates must map module names (str) to updates (LoraUpdate, "
                                         f"LoHa / LoKr updates), got {bad[0]!r}: {type(bad[1]).__name__}")
        object.__setattr__(self, name, value)

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
        through their structure (model.spectral: ||w1 (x) w2|| = ||w1|| ||w2||, ...).

        Parameters
        ----------
        threads : int, default 0
            Worker threads of the core; 0 uses every core.

        A DoRA module is refused (UnsupportedError): its delta depends on the base weight."""
        refuse_dora(self.label, self.updates, "its delta norm")
        return frobenius_norms(self.updates, threads)

    def num_parameters(self) -> int:
        n = sum(int(np.prod(t.shape)) for u in self.updates.values() for t in u.stored_tensors())
        return n + sum(int(np.prod(t.shape)) for t in self.full.values())

    # ---- files and in-memory state dicts --------------------------------------------------

    def save(self, out: str | bytes | os.PathLike[str] | os.PathLike[bytes], format: str | None = None,
             overwrite: bool = False) -> Path:
        """Write this adapter (atomically): 'peft' (a folder), 'kohya' (one .safetensors file) or
        'diffusers' (one .safetensors file as diffusers' save_lora_weights writes it); the default is the
        adapter's own format. `out` means what the CLI's `-o` means (formats.outputs, checked before anything is
        written): a name ending in `.safetensors` is one file (a PEFT adapter saved without `format` is then
        written as a diffusers or kohya file if one of them can name its modules, with a UserWarning saying
        so, else refused; `format='peft'` with such a name is refused); a name ending in a path separator, or
        an existing folder, given a one-file format gets the file inside it (diffusers:
        pytorch_lora_weights.safetensors; kohya: the name of the first file the adapter comes from). An output
        that would replace one of `sources()` is refused. `out` may be new, an empty folder / file, or an
        earlier lorafuse output; anything else is refused unless `overwrite=True`, which replaces it with an
        OverwriteWarning saying what was there. Returns the path written."""
        overwrite = check_bool(overwrite, "overwrite")
        out = check_path(out, "out")
        spec = get_format(self.format if format is None else format)
        if not self.updates and not self.full:
            where = self.label if self.path is not None or not self.derived_from else \
                f"the adapter computed from {self.derived_from[0]}"
            raise UnsupportedError(f"{where}: the adapter has no module, and an adapter that targets no module "
                                   "cannot be loaded (PEFT refuses it): nothing is written")
        # the CLI's rules for output names (formats.outputs, reached through the registry: formats import the model)
        target = output_rule()(out, None if format is None else spec.name, [self], self.sources(), overwrite=overwrite)
        if target.note:
            warnings.warn(target.note, UserWarning, stacklevel=2)
        return get_format(target.format).save(self, target.path, overwrite)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], config: Any = None) -> Adapter:
        """An adapter from PEFT-named tensors (numpy arrays, or torch CPU tensors) and a LoRA config
        (a dict like adapter_config.json, or a peft LoraConfig). Without a config every module's
        scale is 1.

        Parameters
        ----------
        state_dict : mapping of str to array
            PEFT-named tensors (`base_model.model.<module>.lora_A.weight`, ...): numpy arrays or torch CPU
            tensors, as `get_peft_model_state_dict` gives them.
        config : dict or peft.LoraConfig, default None
            The adapter's LoRA config (r, lora_alpha, use_rslora, rank_pattern, ...)."""
        if not isinstance(state_dict, Mapping):
            raise LorafuseValueError(f"state_dict must be a mapping of tensor names to arrays (a dict), got "
                                     f"{type(state_dict).__name__}")
        bad = next((k for k in state_dict if not isinstance(k, str)), None)
        if bad is not None:
            raise LorafuseValueError(f"state_dict: tensor names must be strings, got {type(bad).__name__} "
                                     f"{bad!r}"[:200])
        if config is not None and not isinstance(config, Mapping) and not hasattr(config, "to_dict"):
            raise LorafuseValueError(f"config must be a dict like adapter_config.json or a peft LoraConfig, got "
                                     f"{type(config).__name__}")
        tensors = {k: _tensor_from_any(k, v) for k, v in state_dict.items()}
        adapter: Adapter = _tensor_format("peft").from_tensors(tensors, config)  # type: ignore[misc]
        from lorafuse.model.f64 import narrowable_updates  # (here: model.f64 imports the model package)

        narrowable_updates(adapter.updates)  # F64 factors beyond float32's range: balanced (model.f64)
        return adapter

    def state_dict(self, framework: str = "numpy") -> dict[str, Any]:
        """PEFT-named tensors: float arrays for numpy (BF16 and F8 widened to float32: numpy has no such
        types), or torch tensors of the stored dtype (BF16 as torch.bfloat16, F8_E4M3 / F8_E5M2 as
        torch.float8_e4m3fn / torch.float8_e5m2), never their raw bytes as integers.

        Parameters
        ----------
        framework : str, default 'numpy'
            'numpy' (numpy arrays) or 'torch' (torch CPU tensors; needs torch installed)."""
        check_text(framework, "framework", ("numpy", "torch"))
        tensors = _tensor_format("peft").to_tensors(self)  # type: ignore[misc]
        if framework == "numpy":
            return {k: (t.f32() if t.dtype == "BF16" or t.dtype.startswith("F8") else t.copy())
                    for k, t in tensors.items()}
        if framework == "torch":
            import torch

            out = {}
            for k, t in tensors.items():
                x = torch.from_numpy(t.copy())
                view = _TORCH_VIEWS.get(t.dtype)
                out[k] = x.view(getattr(torch, view)) if view else x
            return out
        raise LorafuseValueError(f"framework must be 'numpy' or 'torch', got {framework!r}")

    # ---- exact arithmetic (factored: ranks add up until to_rank) ------------------------

    # numpy defers to Adapter's operators (np.float64(0.5) * adapter calls __rmul__) instead of broadcasting
    __array_ufunc__ = None

    def __add__(self, other: object) -> Adapter:
        if not isinstance(other, Adapter):
            return NotImplemented
        return weighted_cat([(1.0, self), (1.0, other)])

    def __radd__(self, other: object) -> Adapter:
        """0 + adapter is the adapter (a copy), so that sum([a, b, c]) works."""
        x = real_number(other)
        if x is None or x != 0:
            return NotImplemented
        return self * 1.0

    def __sub__(self, other: object) -> Adapter:
        if not isinstance(other, Adapter):
            return NotImplemented
        return weighted_cat([(1.0, self), (-1.0, other)])

    def __neg__(self) -> Adapter:
        return self * -1.0

    def __mul__(self, c: object) -> Adapter:
        """adapter * c (and c * adapter): c a real number, a numpy scalar or a 0-d array / tensor; a NaN or
        infinite c, or a result whose scale float32 cannot hold, is refused (LorafuseValueError)."""
        x = real_number(c)
        if x is None:
            return NotImplemented
        if not math.isfinite(x):
            raise LorafuseValueError(f"adapter * {x}: the factor must be a finite number")
        return scaled(self, x, f"adapter * {x:g}")

    __rmul__ = __mul__

    def __truediv__(self, c: object) -> Adapter:
        x = real_number(c)
        if x is None:
            return NotImplemented
        if x == 0:
            raise LorafuseValueError("adapter / 0: division by zero")
        if not math.isfinite(x):
            raise LorafuseValueError(f"adapter / {x}: the divisor must be a finite number")
        return scaled(self, 1.0 / x, f"adapter / {x:g}")

    def __repr__(self) -> str:
        """One line: format, modules, ranks, factor dtypes and where it comes from (never the arrays)."""
        ranks = sorted({u.rank for u in self.updates.values()})
        shown = "/".join(map(str, ranks[:4])) + ("/..." if len(ranks) > 4 else "")
        dtypes = sorted({t.dtype for u in self.updates.values() for t in u.stored_tensors()})
        where = repr(str(self.path)) if self.path is not None else "in memory"
        extra = f", full tensors={len(self.full)}" if self.full else ""
        return (f"Adapter(format={self.format!r}, modules={len(self.updates)}, rank={shown or '-'}, "
                f"dtype={'/'.join(dtypes) or '-'}{extra}, source={where})")

    def to_rank(self, rank: int, split: str = "B", threads: int = 0) -> Adapter:
        """The best rank-`rank` approximation of every module (Eckart-Young, from the factors).

        Parameters
        ----------
        rank : int
            The rank of every module afterwards (at most its delta's rank; modules of lower rank are kept).
        split : str, default 'B'
            Where the singular values go: 'B' (on B, as PEFT's svd does) or 'sqrt' (their square roots on both).
        threads : int, default 0
            Worker threads of the core; 0 uses every core."""
        return truncate(self, rank, split, threads)

    svd = to_rank

    def norm(self, threads: int = 0) -> float:
        """Exact Frobenius norm of all deltas together, from the factors.

        Parameters
        ----------
        threads : int, default 0
            Worker threads of the core; 0 uses every core.

        A DoRA module is refused (UnsupportedError): its delta depends on the base weight."""
        return norm(self, threads)




# The fields a caller may assign, with what they must hold (Adapter.__setattr__).
_FIELD_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "updates": (dict, "a dict of module names to updates"),
    "full": (dict, "a dict of tensor names to full tensors"),
    "config": (dict, "a dict (adapter_config.json's fields)"),
    "format": (str, "a format name (str)"),
    "path": ((Path, type(None)), "a path or None"),
    "full_origin": (dict, "a dict"),
    "randomized": (list, "a list of module names"),
    "derived_from": (list, "a list of paths"),
    "notes": (list, "a list of str"),
}


def refuse_one(adapters: object, what: str) -> None:
    """Refuse one path (or one Adapter) where `what` takes several: iterated, a path would be read character
    by character ('/: not a recognised adapter'), an Adapter module name by module name. A mapping and a set
    are refused too: the one would give its keys, the other its elements in hash order (_validate.unordered),
    each pairing the adapters with the wrong weights."""
    if isinstance(adapters, (str, bytes, os.PathLike, Adapter)):
        raise LorafuseValueError(
            f"{what}: adapters must be a sequence or iterable of adapters (paths or Adapters), not one "
            f"{type(adapters).__name__}: for one adapter, give a list of one ([adapter])")
    if isinstance(adapters, Mapping):  # iterated, a {path: weight} mapping gives its keys: the weights lost
        raise LorafuseValueError(
            f"{what}: adapters must be a sequence or iterable of adapters (paths or Adapters), not a "
            f"{type(adapters).__name__}: give the paths as a list and the weights apart (weights=[...]), e.g. "
            "adapters=list(d), weights=list(d.values())")
    if unordered(adapters):  # hash order: paths (str) in a different order in every process
        raise LorafuseValueError(
            f"{what}: adapters must be an ordered sequence or iterable of adapters (a list, a tuple, a generator), "
            f"not a {type(adapters).__name__}: a set has no order (its elements come in hash order, for paths a "
            "different one in every process), so the weights and the results would pair with the wrong adapters; "
            "give a list")
    if not hasattr(adapters, "__iter__"):
        raise LorafuseValueError(f"{what}: adapters must be a sequence or iterable of adapters (paths or Adapters), "
                                 f"got {type(adapters).__name__}")


def adapter_list(adapters: object, what: str) -> list[Any]:
    """The adapters `what` takes as a list: any iterable (a generator is read once, here), never one path or
    one Adapter (refuse_one)."""
    refuse_one(adapters, what)
    return list(adapters)  # type: ignore[call-overload]


def _tensor_format(name: str) -> FormatSpec:
    spec = get_format(name)
    if spec.from_tensors is None or spec.to_tensors is None:
        raise LorafuseValueError(f"adapter format {name!r} has no in-memory state dict form")
    return spec


# safetensors dtypes numpy holds as raw integers, and the torch dtype that views those bytes.
_TORCH_VIEWS = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


# The numpy dtypes a state dict's arrays may hold (either byte order): safetensors' F16, F32, F64.
_NUMPY_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _tensor_from_any(key: str, value: Any) -> Tensor:
    """A tensor holding a copy of `value` (the caller's array or tensor may change later; the adapter does not);
    LorafuseValueError naming `key` for anything but a dense float array or tensor."""
    where = f"state_dict[{key!r}]"
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return _from_numpy(where, value)
    module = type(value).__module__
    if module.startswith("torch"):
        import torch

        if not isinstance(value, torch.Tensor):  # a torch.nn.Linear, a torch.Size: not a tensor of torch's own
            raise LorafuseValueError(f"{where}: state dict values must be numpy arrays or torch tensors, got "
                                     f"{module}.{type(value).__name__}")
        if value.is_sparse or value.layout != torch.strided or value.device.type == "meta":
            raise LorafuseValueError(f"{where}: state dict values must be dense tensors with data, got a "
                                     f"{value.layout} tensor on {value.device}")
        # torch's lazy negation / conjugation bits (a `.conj().imag`, a `_neg_view()`) resolved into the values: a
        # contiguous tensor may carry them, and numpy() refuses such a tensor
        t = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
        if t.dtype == torch.bfloat16:
            return Tensor(t.view(torch.int16).numpy().view(np.uint16).copy(), "BF16")
        f8 = next((k for k, v in _TORCH_VIEWS.items() if k != "BF16" and getattr(torch, v, None) == t.dtype), None)
        if f8 is not None:  # what state_dict("torch") gives for F8 tensors: their bytes, as stored
            return Tensor(t.view(torch.uint8).numpy().copy(), f8)
        try:
            array = t.numpy()  # shares the caller's memory: _from_numpy copies it
        except (TypeError, RuntimeError):  # a dtype numpy has no type for (float8 fnuz, complex32, ...)
            raise LorafuseValueError(f"{where}: state dict tensors must be float32, float16, bfloat16, float8_e4m3fn "
                                     f"or float8_e5m2, got {t.dtype}") from None
        return _from_numpy(where, array, f"torch.{str(t.dtype).removeprefix('torch.')}")
    raise LorafuseValueError(f"{where}: state dict values must be numpy arrays or torch tensors, got "
                             f"{type(value).__name__}")


def _from_numpy(where: str, array: np.ndarray, shown: str | None = None) -> Tensor:
    """A tensor of a copy of a float16/32/64 array in native byte order (a big-endian one converted)."""
    native = array.dtype.newbyteorder("=")
    if native not in _NUMPY_FLOATS:
        raise LorafuseValueError(f"{where}: state dict tensors must be floating point (numpy float32, float16 or "
                                 f"float64; torch also bfloat16, float8_e4m3fn, float8_e5m2), got "
                                 f"{shown or f'numpy {array.dtype}'}")
    return Tensor.from_array(np.array(array, dtype=native, order="C"))  # np.array copies

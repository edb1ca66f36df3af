"""kohya LoRA / LoCon files (sd-scripts' `networks/lora.py`): one `.safetensors` file.

Keys are `<module>.lora_down.weight` (r x in, or r x in x kh x kw for conv),
`<module>.lora_up.weight` (out x r [x 1 x 1]) and `<module>.alpha` (a scalar of any
float dtype; missing means alpha = r), with module names such as
`lora_unet_down_blocks_0_attentions_0_proj_in` or `lora_te1_text_model_...`; the scale
is alpha / r. The file's `__metadata__` (`ss_*` training metadata and anything else)
is kept in `Adapter.config["metadata"]` and written back. LyCORIS tensors are refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lorafuse.adapter import Adapter, Kind, LoraUpdate, check_module_name
from lorafuse.errors import FormatError, ShapeMismatchError, UnsupportedError
from lorafuse.io.atomic import atomic_file
from lorafuse.io.safetensors import SafetensorsFile, TensorSpec, encode_header, read_header, save_file
from lorafuse.io.tensor import Tensor

_ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
# LyCORIS (LoHa, LoKr, Tucker LoCon, DoRA, full / norm diffs, OFT, IA3): a later reader.
_LYCORIS = re.compile(r"\.(hada_\w+|lokr_\w+|lora_mid\.weight|dora_scale|diff|diff_b|w_norm|b_norm|oft_\w+|"
                      r"on_input)$")
# safetensors' own writer orders tensors by dtype (widest first), then name; kohya's hashes assume it.
_DTYPE_ORDER = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3, "F8_E4M3": 4, "F8_E5M2": 5}


def is_kohya(path: str | os.PathLike[str]) -> bool:
    """A `.safetensors` file with kohya (or LyCORIS) LoRA keys. Reads the header only."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return False
    try:
        tensors, _, _ = read_header(p)
    except FormatError:
        return False
    return any(k.endswith((".lora_down.weight", ".lora_up.weight")) or _LYCORIS.search(k) for k in tensors)


def load_kohya(path: str | os.PathLike[str]) -> Adapter:
    p = Path(path)
    with SafetensorsFile(p) as f:  # views handed out keep the mapping alive
        tensors = {key: Tensor(f.raw(key), f.info(key).dtype) for key in f.keys()}
        metadata = dict(f.metadata)
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if _LYCORIS.search(key):
            raise UnsupportedError(f"{p}: module {key.split('.', 1)[0]!r} has the LyCORIS tensor {key!r}; "
                                   "LyCORIS (LoHa, LoKr, Tucker, DoRA) adapters are not supported yet")
        suffix = next((s for s in _ROLES if key.endswith(s)), None)
        module = key[: -len(suffix)] if suffix else ""
        if suffix is None or not module.startswith("lora_") or "." in module:
            raise FormatError(f"{p}: tensor {key!r} is not a kohya LoRA tensor "
                              "(lora_<module>.lora_down.weight / .lora_up.weight / .alpha)")
        check_module_name(module, f"{p}: tensor {key!r}")
        parts.setdefault(module, {})[_ROLES[suffix]] = t
    updates = {m: _update(p, m, d) for m, d in parts.items()}
    return Adapter(updates=updates, config={"metadata": metadata}, format="kohya", path=p)


def _update(path: Path, module: str, p: dict[str, Tensor]) -> LoraUpdate:
    where = f"{path}: module {module!r}"
    down, up, alpha = p.get("down"), p.get("up"), p.get("alpha")
    if down is None or up is None:
        have = ", ".join(f"{n} {t.shape}" for n, t in (("lora_down.weight", down), ("lora_up.weight", up),
                                                         ("alpha", alpha)) if t is not None)
        raise FormatError(f"{where} has no {'lora_down.weight' if down is None else 'lora_up.weight'} "
                          f"(only {have})")
    for t, n in ((down, "lora_down.weight"), (up, "lora_up.weight")):
        if not t.is_float:
            raise FormatError(f"{where}: {n} has non-float dtype {t.dtype}")
    rank = down.shape[0] if down.shape else 0
    if len(down.shape) in (2, 4) and len(up.shape) == len(down.shape) and rank == 0:
        raise ShapeMismatchError(f"{where}: lora_down {down.shape} has rank 0 (a zero-rank adapter)")
    ok = (len(down.shape) in (2, 4) and len(up.shape) == len(down.shape) and rank > 0
          and up.shape[1] == rank and all(d == 1 for d in up.shape[2:]))
    if not ok:
        raise ShapeMismatchError(f"{where}: lora_down {down.shape} and lora_up {up.shape} are not LoRA factors "
                                 "of one rank")
    if alpha is None:
        value = float(rank)
    else:
        if int(np.prod(alpha.shape)) != 1 or any(d != 1 for d in alpha.shape):
            raise FormatError(f"{where}: alpha must be a scalar, got shape {alpha.shape}")
        if alpha.dtype == "BOOL":
            raise FormatError(f"{where}: alpha has dtype BOOL")
        exact = alpha.dtype in ("F64", "F32", "F16") or not alpha.is_float  # numpy holds these as numbers
        value = float((alpha.raw if exact else alpha.f32()).reshape(-1)[0])
        if not np.isfinite(value):
            raise FormatError(f"{where}: alpha is {value}")
    kind: Kind = "conv" if len(down.shape) == 4 else "linear"
    return LoraUpdate(module, down, up, value / rank, kind)


def _most_common(values: list[float]) -> float:
    """The most frequent value; ties go to the first seen."""
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def _same_number(text: str, value: float) -> bool:
    try:
        return float(text) == value
    except ValueError:
        return False


def kohya_metadata(adapter: Adapter) -> dict[str, str]:
    """The input's metadata with ss_network_dim / ss_network_alpha (when present) set from the updates:
    the most common rank and alpha, written as kohya's resize_lora.py writes them (str(int), str(float)).
    A value that already says the same number, or "Dynamic" over mixed ranks / alphas, is kept."""
    meta = dict(adapter.config.get("metadata") or {})  # type: ignore[call-overload]
    updates = list(adapter.updates.values())
    if not updates:
        return meta
    ranks = [float(u.rank) for u in updates]
    alphas = [float(np.float32(u.scale * u.rank)) for u in updates]  # as the F32 .alpha tensors will hold them
    for key, values, text in (("ss_network_dim", ranks, str(int(_most_common(ranks)))),
                              ("ss_network_alpha", alphas, str(_most_common(alphas)))):
        old = meta.get(key)
        if old is None or _same_number(old, _most_common(values)) or (old == "Dynamic" and len(set(values)) > 1):
            continue
        meta[key] = text
    return meta


def kohya_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """The file's tensors, in the order safetensors' writer uses (dtype widest first, then name)."""
    out: dict[str, Tensor] = {}
    for name, u in adapter.updates.items():
        where = f"{adapter.label}: module {name!r}"
        if not u.is_plain():
            raise UnsupportedError(f"{where} has a DoRA magnitude or a bias; the kohya format cannot store them")
        if u.transposed or u.kind == "embedding":
            raise UnsupportedError(f"{where} is a transposed ({u.kind}) update; the kohya format stores "
                                   "lora_down (r x in) and lora_up (out x r) only")
        if not name.startswith("lora_") or "." in name:
            raise UnsupportedError(f"{where}: not a kohya module name (lora_unet_..., lora_te_...); "
                                   "the kohya format cannot name it")
        out[name + ".lora_down.weight"] = u.A
        out[name + ".lora_up.weight"] = u.B
        out[name + ".alpha"] = Tensor(np.array(u.scale * u.rank, dtype=np.float32), "F32")
    if adapter.full:
        raise UnsupportedError(f"{adapter.label}: full tensors ({', '.join(sorted(adapter.full)[:3])}) "
                               "cannot be stored in a kohya LoRA file")
    return dict(sorted(out.items(), key=lambda kv: (_DTYPE_ORDER.get(kv[1].dtype, 9), kv[0])))


def _byte_window(chunks: Iterable[bytes | memoryview], start: int, length: int) -> bytes:
    """Bytes [start, start + length) of the concatenation of chunks (fewer at the end)."""
    out, pos = bytearray(), 0
    for c in chunks:
        n = len(c)
        lo, hi = max(start - pos, 0), min(start + length - pos, n)
        if lo < hi:
            out += bytes(c[lo:hi])
        pos += n
        if pos >= start + length:
            break
    return bytes(out)


def kohya_hashes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' (sshs_model_hash, sshs_legacy_hash): the sha256 of the data buffer, and the first
    8 hex digits of the sha256 of bytes 0x100000..0x110000 of the file written with only ss_* metadata."""
    data = [np.ascontiguousarray(t.raw).data.cast("B") for t in tensors.values()]
    model = hashlib.sha256()
    for c in data:
        model.update(c)
    specs = [TensorSpec(k, t.dtype, t.shape) for k, t in tensors.items()]
    header, _ = encode_header(specs, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(_byte_window([header, *data], 0x100000, 0x10000)).hexdigest()[:8]
    return model.hexdigest(), legacy


def save_kohya(adapter: Adapter, out: str | os.PathLike[str], inputs: Sequence[Path] = ()) -> Path:
    """Write `adapter` as one kohya `.safetensors` file, atomically. Factors keep their stored dtype;
    `.alpha` is an F32 scalar equal to scale * rank, so each module's scale is kept. sd-scripts' model
    hashes in the metadata, when present, are recomputed for the tensors written."""
    tensors = kohya_tensors(adapter)
    meta = kohya_metadata(adapter)
    if "sshs_model_hash" in meta or "sshs_legacy_hash" in meta:
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
    with atomic_file(out, inputs) as tmp:
        save_file({k: (t.dtype, t.raw) for k, t in tensors.items()}, tmp, meta)
    return Path(out)

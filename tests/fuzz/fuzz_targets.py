#!/usr/bin/env python3
"""Coverage-guided fuzz targets (atheris / libFuzzer), one per parser.

    python3 tests/fuzz/fuzz_targets.py TARGET [libFuzzer flags] [CORPUS_DIR ...]

Usually started by tests/fuzz/run_fuzz.py, which builds the seed corpus and reads the stats.
A target passes an input if lorafuse either accepts it or raises a lorafuse.errors.LorafuseError;
any other exception (or a crash, a timeout, running out of memory) is a finding that libFuzzer
saves as crash-*/timeout-*/oom-* under -artifact_prefix.

Targets and their input encodings (run_fuzz.py's seeds follow them):
    safetensors  the bytes of a .safetensors file: open, validate, read every tensor (floats converted)
    checkpoint   the bytes of a single-file checkpoint: Checkpoint(file), then read every tensor
    peft         u32le n, n bytes of adapter_config.json, the rest adapter_model.safetensors:
                 load the folder, then use every factor (float32 conversion, norms in the core)
    kohya        the bytes of a kohya .safetensors file: load it, use every factor
    detect       u8 layout, u32le n, n bytes A, the rest B, laid out as files (see t_detect):
                 detect_format then load
A structure-aware custom mutator (see `mutate`) makes 85% of the inputs: it edits the JSON
header or the config as JSON (or builds a fresh adapter-like file) and then, usually, repairs
the offsets and the length prefix, so inputs get past the first checks and reach the format
loaders and the core; the rest are libFuzzer's own byte-level mutations.
Coverage: lorafuse's functions are instrumented in place (instrument_lorafuse), which works
for every kind of install, editable ones included.
The files are written to a scratch folder on a tmpfs ($LORAFUSE_FUZZ_WORKDIR, else a new
folder under /dev/shm when it exists, left behind: run_fuzz.py sets and removes its own):
the readers take paths and memory-map them, and that is what is fuzzed.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import random
import struct
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import atheris

from lorafuse.adapter import Adapter
from lorafuse.errors import LorafuseError
from lorafuse.formats import detect_format, load
from lorafuse.formats.kohya import load_kohya
from lorafuse.formats.peft import CONFIG_NAME, WEIGHTS_NAME, load_peft
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.io.dtypes import DTYPES
from lorafuse.io.safetensors import SafetensorsFile
from lorafuse.io.tensor import Tensor


def instrument_lorafuse() -> int:
    """Coverage instrumentation of every Python function of lorafuse (nested ones included).

    atheris.instrument_imports() cannot instrument modules that come through a custom loader,
    such as an editable (scikit-build-core) install, so the functions are patched in place,
    whatever loaded them. Returns how many were instrumented (0 means blind fuzzing)."""
    count = 0
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and str(getattr(obj, "__module__", "")).split(".")[0] == "lorafuse":
            atheris.instrument_func(obj)
            count += 1
    return count


def _scratch() -> Path:
    base = os.environ.get("LORAFUSE_FUZZ_WORKDIR")
    if base:
        path = Path(base)
        path.mkdir(parents=True, exist_ok=True)
        return path
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="lorafuse-fuzz-", dir=shm))


WORK = _scratch()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _clear(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink()


def split(data: bytes) -> tuple[bytes, bytes]:
    """u32le n, n bytes, the rest (a short input is all first part)."""
    if len(data) < 4:
        return data, b""
    (n,) = struct.unpack("<I", data[:4])
    return data[4 : 4 + n], data[4 + n :]


def use_file(f: SafetensorsFile) -> None:
    for name in f.keys():
        info = f.info(name)
        raw = f.raw(name)
        assert raw.shape == info.shape and raw.nbytes == info.nbytes, (name, raw.shape, info)
        if DTYPES[info.dtype].is_float:
            Tensor(raw, info.dtype).f32()


def use_adapter(adapter: Adapter) -> None:
    for u in adapter.updates.values():
        assert u.rank > 0
        u.delta_shape  # noqa: B018
        if u.magnitude is not None:
            u.magnitude.f32()
        if u.bias is not None:
            u.bias.f32()
    adapter.norms()  # every factor to float32, then the core's factored norms
    for t in adapter.full.values():
        if t.is_float:
            t.f32()


# ----------------------------------------------------------------------------- structure-aware mutation

_INTS: list[object] = [0, 1, 2, 3, 4, 5, 8, 16, -1, -2, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
                       2**64 - 1, 2**64, 10**30]
_VALUES: list[object] = [*_INTS, 0.5, 2.0, -0.0, 1e308, "1", "", True, False, None, [], {}, [1, 2], {"a": 1},
                         "F32", "x" * 64]
_DTYPES = [*DTYPES, "F7", "f32", "", "BF16 ", "F8_E4M3FN"]
_PARTS = [".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha",
          ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector", ".lora_B.bias", ".base_layer.weight",
          ".weight", ".hada_w1_a", ".lora_mid.weight", "base_model.model.", "lora_unet_", "lora_te1_", "model.layers.0",
          "/", "..", ".", "\x00", "\x1b[0m", "\u202e", "\ud800", "\n", " ", "q_proj", "lora_", ""]
_PATTERNS = ["q_proj", "model\\.layers\\.0\\.q_proj", ".*", "(a+)+", "(", "a{99999999999}", "(?i)Q_PROJ", "^$",
             "(q|k)_proj", "(?:x|x)*", "\\1", ".*.*.*", "[", "q_proj$", "(?P<n>q)"]
_CONFIG_KEYS = ["r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "peft_type",
                "target_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "target_parameters",
                "exclude_modules"]
_MAX_FIXED_DATA = 1 << 16


def _pick(rnd: random.Random, values: list[object]) -> object:
    return copy.deepcopy(rnd.choice(values))  # never share (and later mutate) the tables' lists


def _itemsize(dtype: object) -> int | None:
    return DTYPES[dtype].itemsize if isinstance(dtype, str) and dtype in DTYPES else None


def _fix_offsets(header: dict[str, object], data: bytes, rnd: random.Random) -> bytes:
    """Make the offsets tile a data buffer of exactly the declared sizes (when they are sane)."""
    cursor = 0
    for name, e in header.items():
        if name == "__metadata__" or not isinstance(e, dict):
            continue
        size, shape = _itemsize(e.get("dtype")), e.get("shape")
        if size is None or not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 2**20
                                                                   for d in shape):
            continue
        for d in shape:
            size *= d
        if cursor + size > _MAX_FIXED_DATA:
            continue
        e["data_offsets"] = [cursor, cursor + size]
        cursor += size
    if len(data) >= cursor:
        return data[:cursor]
    return data + bytes(rnd.getrandbits(8) for _ in range(cursor - len(data)))


def _mutate_entry(header: dict[str, object], rnd: random.Random) -> None:
    names = [k for k in header if k != "__metadata__"]
    op = rnd.randrange(12)
    if not names or op == 0:  # a new tensor
        name = "".join(rnd.choice(_PARTS) for _ in range(rnd.randrange(1, 4)))
        header[name] = {"dtype": rnd.choice(["F32", "F16", "BF16", "F32", "I32"]),
                        "shape": [rnd.randrange(5) for _ in range(rnd.choice([0, 1, 2, 2, 2, 4]))],
                        "data_offsets": [0, 0]}
        return
    name = rnd.choice(names)
    entry = header[name]
    if not isinstance(entry, dict):
        header[name] = entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    shape = entry.get("shape")
    if op == 1 and isinstance(shape, list):  # one dimension
        if shape and rnd.random() < 0.7:
            shape[rnd.randrange(len(shape))] = _pick(rnd, _INTS if rnd.random() < 0.7 else _VALUES)
        elif rnd.random() < 0.5:
            shape.append(rnd.choice(_INTS[:8]))
        elif shape:
            shape.pop()
    elif op == 2 and isinstance(shape, list) and shape:  # small sane dims
        entry["shape"] = [rnd.randrange(0, 6) for _ in shape]
    elif op == 3:
        entry["dtype"] = rnd.choice(_DTYPES)
    elif op == 4:
        entry["data_offsets"] = [rnd.choice(_INTS), rnd.choice(_INTS)] if rnd.random() < 0.8 else _pick(rnd, _VALUES)
    elif op == 5:  # rename: add or swap a part
        new = rnd.choice([name + rnd.choice(_PARTS), rnd.choice(_PARTS) + name,
                          name.rsplit(".", 1)[0] + rnd.choice(_PARTS), name.replace("A", "B", 1)])
        header[new] = header.pop(name)
    elif op == 6:
        del header[name]
    elif op == 7:  # a twin under another name (same offsets)
        header[name + rnd.choice(_PARTS)] = json.loads(json.dumps(entry))
    elif op == 8:
        meta = header.setdefault("__metadata__", {})
        if isinstance(meta, dict):
            meta[rnd.choice(["format", "ss_network_dim", "k", ""])] = _pick(rnd, ["pt", "", "x" * 10, *_VALUES])
        else:
            header["__metadata__"] = _pick(rnd, _VALUES)
    elif op == 9:
        entry[rnd.choice(["dtype", "shape", "data_offsets", "extra"])] = _pick(rnd, _VALUES)
    elif op == 10:  # the partner factor gets the same rank, or not
        for other in names:
            e2 = header.get(other)
            if other != name and isinstance(e2, dict) and isinstance(e2.get("shape"), list) and isinstance(shape, list):
                e2["shape"] = list(reversed(shape)) if rnd.random() < 0.5 else list(shape)
                break
    else:
        header[name] = _pick(rnd, _VALUES)


def _encode(header: dict[str, object], body: bytes, rnd: random.Random) -> bytes:
    try:
        text = json.dumps(header, ensure_ascii=rnd.random() < 0.5)
    except ValueError:
        text = "{}"
    raw = text.encode("utf-8", "surrogatepass")
    if rnd.random() < 0.7:
        raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def synthesize(rnd: random.Random, flavor: str) -> tuple[dict[str, object], bytes]:
    """A fresh, valid file of adapter-like tensors (kohya or PEFT names), small dims, random bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}} if rnd.random() < 0.7 else {}
    floats = ["F32", "F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2"]

    def add(name: str, shape: list[int], dtype: str | None = None) -> None:
        header[name] = {"dtype": dtype or rnd.choice(floats), "shape": shape, "data_offsets": [0, 0]}

    for i in range(rnd.randrange(1, 4)):
        r, fan_in, fan_out = rnd.randrange(1, 4), rnd.randrange(1, 6), rnd.randrange(1, 6)
        conv = rnd.random() < 0.2
        a_shape = [r, fan_in, 3, 3] if conv else [r, fan_in]
        b_shape = [fan_out, r, 1, 1] if conv else [fan_out, r]
        if flavor == "kohya":
            m = f"lora_{rnd.choice(['unet', 'te', 'te1', 'te2'])}_block_{i}_proj"
            add(f"{m}.lora_down.weight", a_shape)
            add(f"{m}.lora_up.weight", b_shape)
            if rnd.random() < 0.8:
                add(f"{m}.alpha", [] if rnd.random() < 0.9 else [1], rnd.choice(floats + ["I64"]))
        else:
            m = f"base_model.model.model.layers.{i}.{rnd.choice(['self_attn.q_proj', 'mlp.up_proj', 'embed_tokens'])}"
            if rnd.random() < 0.15:
                add(f"{m}.lora_embedding_A", [r, fan_in])
                add(f"{m}.lora_embedding_B", [fan_out, r])
            else:
                add(f"{m}.lora_A.weight", a_shape)
                add(f"{m}.lora_B.weight", b_shape)
            if rnd.random() < 0.2:
                add(f"{m}.lora_magnitude_vector", [fan_out] if rnd.random() < 0.7 else [1, fan_out, 1, 1])
            if rnd.random() < 0.1:
                add(f"{m}.lora_B.bias", [fan_out])
            if rnd.random() < 0.1:
                add(f"base_model.model.lm_head.{'base_layer.' if rnd.random() < 0.5 else ''}weight", [fan_out, 2])
    body = _fix_offsets(header, b"", rnd)
    return header, body


def mutate_safetensors(data: bytes, max_size: int, rnd: random.Random, flavor: str = "kohya") -> bytes:
    header: object = None
    body = b""
    if len(data) >= 8:
        (n,) = struct.unpack("<Q", data[:8])
        if n <= len(data) - 8:
            raw, body = data[8 : 8 + n], data[8 + n :]
            try:
                header = json.loads(raw)
            except (ValueError, RecursionError):
                if rnd.random() < 0.5:  # not JSON: mutate its bytes but keep the length prefix right
                    raw = atheris.Mutate(raw, max(len(raw) * 2, 64))
                    out = struct.pack("<Q", len(raw)) + raw + body
                    return out if len(out) <= max_size else atheris.Mutate(data, max_size)
    if not isinstance(header, dict) or rnd.random() < 0.1:
        header, body = synthesize(rnd, flavor)
        if rnd.random() < 0.3:  # some stay valid as made
            out = _encode(header, body, rnd)
            return out if len(out) <= max_size else atheris.Mutate(data, max_size)
    for _ in range(rnd.randrange(1, 4)):
        _mutate_entry(header, rnd)
    if rnd.random() < 0.85:
        body = _fix_offsets(header, body, rnd)
    elif rnd.random() < 0.5:
        body = body[: rnd.randrange(len(body) + 1)]
    elif body:  # a value in the data: NaN, Inf, anything
        pos = rnd.randrange(len(body))
        body = body[:pos] + bytes([rnd.getrandbits(8)]) + body[pos + 1 :]
    out = _encode(header, body, rnd)
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


def mutate_config(raw: bytes, rnd: random.Random) -> bytes:
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError):
        cfg = None
    if not isinstance(cfg, dict):
        if rnd.random() < 0.5:
            return atheris.Mutate(raw, max(len(raw) * 2, 64))
        cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    key = rnd.choice(_CONFIG_KEYS)
    op = rnd.randrange(4)
    if op == 0:
        cfg.pop(key, None)
    elif key in ("rank_pattern", "alpha_pattern") and op < 3:
        pats = cfg.get(key) if isinstance(cfg.get(key), dict) else {}
        pats[rnd.choice(_PATTERNS)] = _pick(rnd, _INTS[:8] if rnd.random() < 0.7 else _VALUES)
        cfg[key] = pats
    elif key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias") and op < 3:
        cfg[key] = not cfg.get(key, False)
    elif key in ("r", "lora_alpha") and op < 3:
        cfg[key] = rnd.choice(_INTS[:8])
    else:
        cfg[key] = _pick(rnd, _VALUES)
    return json.dumps(cfg).encode()


def _peft_rank(weights: bytes) -> int | None:
    """The rank of the first lora_A (or embedding A) in a weights file, to keep configs consistent."""
    try:
        (n,) = struct.unpack("<Q", weights[:8])
        header = json.loads(weights[8 : 8 + n])
        for k, e in header.items():
            if k.endswith(("lora_A.weight", "lora_embedding_A")) and e["shape"] and isinstance(e["shape"][0], int):
                return int(e["shape"][0])
    except Exception:  # noqa: BLE001 - only a hint
        pass
    return None


def mutate_pair(data: bytes, max_size: int, rnd: random.Random) -> bytes:
    a, b = split(data)
    if rnd.random() < 0.4:
        a = mutate_config(a, rnd)
    else:
        b = mutate_safetensors(b, max(max_size - len(a) - 4, 16), rnd, "peft")
        r = _peft_rank(b)
        if r is not None and rnd.random() < 0.7:
            try:
                cfg = json.loads(a)
            except (ValueError, RecursionError):
                cfg = None
            if not isinstance(cfg, dict):
                cfg = {"peft_type": "LORA", "lora_alpha": rnd.choice([1, 2, 4, 8])}
            cfg["r"] = r
            a = json.dumps(cfg).encode()
    return (struct.pack("<I", len(a)) + a + b)[:max_size]


def mutate(target: str) -> Callable[[bytes, int, int], bytes]:
    def run(data: bytes, max_size: int, seed: int) -> bytes:
        try:
            return structured(data, max_size, seed)
        except Exception:  # noqa: BLE001 - a mutator bug must not end the campaign
            return atheris.Mutate(data, max_size)

    def structured(data: bytes, max_size: int, seed: int) -> bytes:
        rnd = random.Random(seed)
        if rnd.random() < 0.15:
            return atheris.Mutate(data, max_size)
        if target in ("safetensors", "checkpoint"):
            return mutate_safetensors(data, max_size, rnd, rnd.choice(["kohya", "peft"]))
        if target == "kohya":
            return mutate_safetensors(data, max_size, rnd, "kohya")
        if target == "peft":
            return mutate_pair(data, max_size, rnd)
        # detect: keep or change the layout byte; a single file holds kohya-like data
        layout = data[0] if data else 0
        if rnd.random() < 0.2:
            layout = rnd.randrange(64)
        if layout & 1:
            return bytes([layout]) + mutate_pair(data[1:], max_size - 1, rnd)
        a, b = split(data[1:])
        a = mutate_safetensors(a + b, max_size - 5, rnd, "kohya")
        return bytes([layout]) + struct.pack("<I", len(a)) + a

    return run


# ----------------------------------------------------------------------------- targets


def t_safetensors(data: bytes) -> None:
    path = WORK / "x.safetensors"
    _write(path, data)
    with SafetensorsFile(path) as f:
        use_file(f)


def t_checkpoint(data: bytes) -> None:
    path = WORK / "model.safetensors"
    _write(path, data)
    ckpt = Checkpoint(path)
    assert ckpt.total_bytes() <= len(data)
    for name in ckpt.keys():
        ckpt.info(name)
    for shard in ckpt.shards:
        with ckpt.open(shard) as f:
            use_file(f)


_PEFT = WORK / "peft"
_PEFT.mkdir(exist_ok=True)


def t_peft(data: bytes) -> None:
    config, weights = split(data)
    _write(_PEFT / CONFIG_NAME, config)
    _write(_PEFT / WEIGHTS_NAME, weights)
    use_adapter(load_peft(_PEFT))


def t_kohya(data: bytes) -> None:
    path = WORK / "k.safetensors"
    _write(path, data)
    use_adapter(load_kohya(path))


_DETECT = WORK / "detect"
_DETECT.mkdir(exist_ok=True)
_SUFFIXES = (".safetensors", ".bin", ".json", "")


def t_detect(data: bytes) -> None:
    """layout bit 0 set: a folder holding, per bits 1-4, adapter_config.json (A), adapter_model.safetensors (B),
    adapter_model.bin, other.safetensors (B); bit 5 names adapter_model.safetensors instead of the folder.
    Bit 0 clear: one file holding A + B, its suffix chosen by bits 1-2."""
    layout = data[0] if data else 0
    a, b = split(data[1:])
    _clear(_DETECT)
    if layout & 1:
        if layout & 2:
            _write(_DETECT / CONFIG_NAME, a)
        if layout & 4:
            _write(_DETECT / WEIGHTS_NAME, b)
        if layout & 8:
            _write(_DETECT / "adapter_model.bin", b"\x80\x04.")
        if layout & 16:
            _write(_DETECT / "other.safetensors", b)
        target = _DETECT / WEIGHTS_NAME if layout & 32 else _DETECT
    else:
        target = _DETECT / ("adapter" + _SUFFIXES[(layout >> 1) & 3])
        _write(target, a + b)
    fmt = detect_format(target)
    assert fmt in ("peft", "kohya"), fmt
    use_adapter(load(target))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "safetensors": t_safetensors,
    "checkpoint": t_checkpoint,
    "peft": t_peft,
    "kohya": t_kohya,
    "detect": t_detect,
}


def one_input(target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        try:
            target(data)
        except LorafuseError:
            pass  # a clear refusal is the expected outcome for most inputs

    return run


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dirs]")
    name = sys.argv.pop(1)
    count = instrument_lorafuse()
    print(f"INFO: instrumented {count} lorafuse functions", file=sys.stderr)
    if count < 50:
        sys.exit("lorafuse was not instrumented: the fuzzer would run blind")
    atheris.Setup(sys.argv, one_input(TARGETS[name]), custom_mutator=mutate(name))
    atheris.Fuzz()


if __name__ == "__main__":
    main()

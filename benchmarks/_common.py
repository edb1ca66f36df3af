"""Helpers shared by the lorafuse benchmark scripts.

* measuring a child process: wall time, CPU time, peak RSS (``ru_maxrss`` from ``os.wait4``)
  and a sampled peak of anonymous memory (``RssAnon``), so that file pages a tool maps are
  told apart from memory it allocates;
* warming the page cache and describing the machine;
* writing synthetic inputs in the Hugging Face layout without materialising a model:
  a Llama checkpoint (``config.json`` + ``model.safetensors`` or HF-style shards with
  ``model.safetensors.index.json``) and a PEFT LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``). Names and shapes come from a model built on the ``meta``
  device; tensors are generated and streamed to disk one at a time;
* reading single tensors back from a (possibly sharded) checkpoint directory.

torch / transformers / peft are imported lazily so that importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig

KiB = 1024
MiB = 1024 * 1024

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"

#: TinyLlama-1.1B dimensions (everything except the number of layers).
TINYLLAMA_DIMS: dict[str, object] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

#: Every linear module of a Llama decoder layer.
LLAMA_LINEAR_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


# --------------------------------------------------------------------------------------
# Formatting and machine description
# --------------------------------------------------------------------------------------


def fmt_mib(nbytes: float) -> str:
    return f"{nbytes / MiB:,.1f}"


def parse_size(text: str) -> int:
    """Parse ``"1GB"``, ``"500MB"``, ``"2GiB"`` or a plain byte count.

    KB/MB/GB/TB are decimal, as in ``save_pretrained(max_shard_size=...)``; KiB/MiB/GiB/TiB are binary.
    """
    s = text.strip()
    if s.isdigit():
        return int(s)
    units = {
        "KIB": 1024,
        "MIB": 1024**2,
        "GIB": 1024**3,
        "TIB": 1024**4,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
    }
    for unit, factor in units.items():  # binary units first: "MIB" also ends in "IB"
        if s.upper().endswith(unit):
            return int(float(s[: -len(unit)].strip()) * factor)
    raise ValueError(f"cannot parse size {text!r}; use e.g. 2GB, 500MB, 1GiB or a byte count")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> list[tuple[str, str]]:
    """(label, value) rows describing the machine and the relevant library versions."""
    import psutil
    import torch

    rows: list[tuple[str, str]] = []
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows.append(("cpus", f"{os.cpu_count()} ({usable} usable), {_cpu_model()}"))
    rows.append(("memory", f"{psutil.virtual_memory().total / 1024**3:.1f} GiB"))
    rows.append(("os", f"{platform.system()} {platform.release()}"))
    rows.append(("python", f"{platform.python_version()} ({sys.executable})"))
    rows.append(("torch", f"{torch.__version__} (intra-op threads {torch.get_num_threads()})"))
    for name in ("transformers", "peft", "safetensors"):
        try:
            module = __import__(name)
            rows.append((name, str(getattr(module, "__version__", "?"))))
        except ImportError:
            rows.append((name, "not installed"))
    return rows


# --------------------------------------------------------------------------------------
# Process measurement
# --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """Resource usage of one measured command."""

    cmd: list[str]
    returncode: int
    wall_s: float
    cpu_s: float  # user + system time of the command and its descendants
    peak_rss_bytes: int  # ru_maxrss of the command: largest RSS (anon + mapped file pages) it reached
    peak_anon_bytes: int | None  # sampled peak of RssAnon summed over the process tree; None if unavailable
    log_path: Path
    rss_source: str  # how peak_rss_bytes was obtained

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _rss_anon_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError):
        return None
    return None


class _AnonMemorySampler(threading.Thread):
    """Polls RssAnon of a process tree and keeps the maximum of the sum.

    ``ru_maxrss`` also counts file pages the process has mapped (e.g. an mmap'ed safetensors
    file that has been read), which are page cache rather than memory the tool allocated;
    this sampler shows the anonymous part separately. Being a sampler it can miss spikes
    shorter than ``interval_s``.
    """

    def __init__(self, pid: int, interval_s: float = 0.02, children_every: int = 25) -> None:
        super().__init__(daemon=True)
        self._pid = pid
        self._interval_s = interval_s
        self._children_every = children_every
        self._stop_event = threading.Event()
        self.peak_bytes: int | None = None

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self._pid)
        except psutil.Error:
            return
        children: list[int] = []
        tick = 0
        while not self._stop_event.is_set():
            # Look for the (grand)children on every tick until there are some, then now and then.
            if not children or tick % self._children_every == 0:
                try:
                    children = [c.pid for c in root.children(recursive=True)]
                except psutil.Error:
                    children = []
            values = [_rss_anon_bytes(pid) for pid in (self._pid, *children)]
            known = [v for v in values if v is not None]
            if known:
                total = sum(known)
                self.peak_bytes = total if self.peak_bytes is None else max(self.peak_bytes, total)
            tick += 1
            self._stop_event.wait(self._interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# Used when GNU time is missing: fork/exec the command from a small process, wait4 it, and
# write "maxrss_kib utime stime" to the file named by argv[1]. Exits with the command's status.
_WAIT4_WRAPPER = """\
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss} {ru.ru_utime} {ru.ru_stime}\\n")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def gnu_time_path() -> str | None:
    """Path of GNU time (``/usr/bin/time``), or None if there is no GNU time."""
    for candidate in ("/usr/bin/time", shutil.which("gtime")):
        if not candidate or not os.access(candidate, os.X_OK):
            continue
        try:
            probe = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "GNU" in probe.stdout + probe.stderr:
            return candidate
    return None


def run_measured(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> RunResult:
    """Run ``cmd`` with stdout+stderr going to ``log_path``; return its wall time and peak memory.

    Peak RSS is the command's own ``ru_maxrss``, read through GNU ``time`` (``%M``, the
    "Maximum resident set size" of ``time -v``) or, without it, through a small fork/exec +
    ``wait4`` wrapper. The command is not spawned directly from this process: Linux carries
    the high-water RSS of the pre-exec image into ``ru_maxrss``, and with vfork/posix_spawn
    that image is this (large) benchmark process. ``getrusage(RUSAGE_CHILDREN)`` would mix
    every child the benchmark has run, so it is not used either.
    """
    cmd_list = [str(c) for c in cmd]
    rusage_file = log_path.with_suffix(".rusage")
    gnu_time = gnu_time_path()
    if gnu_time:
        wrapped = [gnu_time, "-f", "%M %U %S", "-o", str(rusage_file), "--", *cmd_list]
        rss_source = f"{gnu_time} %M"
    else:
        wrapped = [sys.executable, "-c", _WAIT4_WRAPPER, str(rusage_file), *cmd_list]
        rss_source = "wait4 wrapper (may add ~10 MiB of the wrapper's own image)"
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = _AnonMemorySampler(proc.pid)
        sampler.start()
        try:
            returncode = proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            sampler.stop()
        wall_s = time.perf_counter() - start
    try:
        # GNU time puts "Command exited with non-zero status N" before the format line.
        maxrss_kib, utime, stime = rusage_file.read_text().strip().splitlines()[-1].split()
        peak_rss = int(maxrss_kib) * KiB
        cpu_s = float(utime) + float(stime)
    except (OSError, ValueError, IndexError):
        peak_rss, cpu_s = 0, float("nan")
        returncode = returncode or 1
    return RunResult(
        cmd=cmd_list,
        returncode=returncode,
        wall_s=wall_s,
        cpu_s=cpu_s,
        peak_rss_bytes=peak_rss,
        peak_anon_bytes=sampler.peak_bytes,
        log_path=log_path,
        rss_source=rss_source,
    )


UNAVAILABLE_EXIT = 42  # a child's exit status for "lorafuse.combine is not there"


def time_lorafuse_combine(paths: Sequence[str], weights: Sequence[float], rank: int, threads: int,
                          repeat: int, dtype: str | None = None) -> tuple[list, object, float, list[float]] | None:
    """In this process: lorafuse.load of `paths`, one warm-up lorafuse.combine (method svd; `dtype`: the
    output factors' dtype, None for the inputs'), then `repeat` timed calls. Returns (adapters, result, load seconds, call seconds), or None after saying
    why when lorafuse.combine cannot be imported (the child then exits with UNAVAILABLE_EXIT)."""
    try:
        import lorafuse

        combine, load = lorafuse.combine, lorafuse.load
    except (ImportError, AttributeError) as exc:
        print(f"lorafuse.combine is not available: {type(exc).__name__}: {exc}", flush=True)
        return None
    t0 = time.perf_counter()
    adapters = [load(p) for p in paths]
    load_s = time.perf_counter() - t0
    times: list[float] = []
    result = None
    for i in range(1 + repeat):
        t = time.perf_counter()
        kwargs = {} if dtype is None else {"dtype": dtype}
        result = combine(adapters, weights=list(weights), method="svd", rank=rank, threads=threads, **kwargs)
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - t)
    return adapters, result, load_s, times


def print_run_header(title: str, argv: Sequence[str], extra: Sequence[tuple[str, str]] = ()) -> None:
    """The first lines of a benchmark's output: what it compares, the machine and the command."""
    import shlex

    print(title)
    for label, value in [*machine_info(), ("command", shlex.join([Path(sys.argv[0]).name, *argv])), *extra]:
        print(f"  {label:<13}{value}")


def make_workdir(workdir: str | None, prefix: str) -> tuple[Path, Path, bool]:
    """(work directory, its logs/ folder, whether it was made fresh under /tmp): --workdir or a new temp dir."""
    own = workdir is None
    if own:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    else:
        path = Path(workdir).resolve()
        path.mkdir(parents=True, exist_ok=True)
    log_dir = path / "logs"
    log_dir.mkdir(exist_ok=True)
    print(f"  {'workdir':<13}{path}")
    return path, log_dir, own


def finish_workdir(workdir: Path, keep: bool, own: bool, outputs: Iterable[Path] = ()) -> None:
    """The end of a run (make_workdir's other half): --keep keeps everything; a temp dir of its own is removed;
    a --workdir keeps its inputs for reuse, the `outputs` removed."""
    if keep:
        print(f"\nkept {workdir}")
    elif own:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        outputs = list(outputs)
        for out in outputs:
            shutil.rmtree(out, ignore_errors=True)
        print(f"\n{'removed the outputs; ' if outputs else ''}inputs kept in {workdir} for reuse")


def warm_page_cache(paths: Iterable[Path], chunk_bytes: int = 16 * MiB) -> int:
    """Read every regular file under ``paths`` once (like ``cat files > /dev/null``)."""
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    total = 0
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    total += n
    return total


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under ``path``."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------
# Streaming safetensors writer and reader helpers
# --------------------------------------------------------------------------------------

_DTYPE_ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "BF16", "F32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_ITEMSIZE[self.dtype]


def torch_dtype_code(dtype: torch.dtype) -> str:
    import torch

    codes = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
    return codes[dtype]


def write_safetensors(
    path: Path,
    specs: Sequence[TensorSpec],
    make_tensor: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a .safetensors file, producing and writing one tensor at a time.

    The layout matches ``safetensors.torch.save_file`` (header JSON without spaces, padded
    with spaces to a multiple of 8, tensors sorted by decreasing element size then by name),
    so for single-dtype files the bytes are identical. Returns the size of the data section.
    """
    import torch

    ordered = sorted(specs, key=lambda s: (-_DTYPE_ITEMSIZE[s.dtype], s.name))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for spec in ordered:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in ordered:
            tensor = make_tensor(spec)
            if tuple(tensor.shape) != spec.shape or torch_dtype_code(tensor.dtype) != spec.dtype:
                raise ValueError(f"{spec.name}: produced {tuple(tensor.shape)} {tensor.dtype}, expected {spec}")
            f.write(tensor.contiguous().view(torch.uint8).numpy().data)
    return offset


def checkpoint_weight_map(ckpt_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, for a single-file or sharded (index.json) safetensors directory."""
    index = ckpt_dir / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {name: ckpt_dir / fname for name, fname in weight_map.items()}
    from safetensors import safe_open

    result: dict[str, Path] = {}
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                result[name] = path
    return result


def checkpoint_specs(ckpt_dir: Path) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of every tensor of a checkpoint directory (headers only)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in checkpoint_weight_map(ckpt_dir).items():
        by_file.setdefault(path, []).append(name)
    specs: dict[str, TensorSpec] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                sl = f.get_slice(name)
                specs[name] = TensorSpec(name, tuple(sl.get_shape()), sl.get_dtype())
    return specs


def load_tensor(path_or_dir: Path, name: str) -> torch.Tensor:
    """Load one tensor from a .safetensors file or a checkpoint directory."""
    from safetensors import safe_open

    path = path_or_dir if path_or_dir.is_file() else checkpoint_weight_map(path_or_dir)[name]
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


# --------------------------------------------------------------------------------------
# Synthetic Llama checkpoint
# --------------------------------------------------------------------------------------


def llama_config(num_layers: int, **overrides: object) -> LlamaConfig:
    """A ``LlamaConfig`` with TinyLlama-1.1B dimensions and ``num_layers`` decoder layers."""
    from transformers import LlamaConfig

    kwargs: dict[str, object] = {**TINYLLAMA_DIMS, "num_hidden_layers": num_layers, **overrides}
    return LlamaConfig(**kwargs)


@dataclass
class CheckpointInfo:
    path: Path
    files: list[Path]  # the .safetensors files
    num_tensors: int
    num_params: int
    data_bytes: int  # tensor bytes, without headers

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _shard_plan(specs: Sequence[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    """Group tensors into shards the way ``save_pretrained(max_shard_size=...)`` does:
    walk the state dict in order, start a new shard when the next tensor would overflow the
    current one, and give a tensor larger than the limit a shard of its own."""
    if max_shard_bytes is None:
        return [list(specs)]
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        if spec.nbytes > max_shard_bytes:
            shards.append([spec])
            continue
        if current and current_bytes + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += spec.nbytes
    if current:
        shards.append(current)
    return shards


def build_llama_checkpoint(
    out_dir: Path,
    config: LlamaConfig,
    *,
    dtype: torch.dtype | None = None,
    std: float = 0.02,
    max_shard_bytes: int | None = None,
    seed: int = 0,
) -> CheckpointInfo:
    """Write a random-weight ``LlamaForCausalLM`` checkpoint as ``save_pretrained`` lays it out.

    Tensor names, shapes, ``config.json`` and ``generation_config.json`` come from a model built
    on the meta device, so nothing of model size is allocated besides the tensor being written.
    Linear and embedding weights are N(0, std); RMSNorm weights are ones (their usual init).
    """
    import torch
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if dtype is None else dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state_specs = [
        TensorSpec(name, tuple(t.shape), torch_dtype_code(dtype)) for name, t in model.state_dict().items()
    ]
    seeds = {spec.name: seed * 1_000_003 + i for i, spec in enumerate(state_specs)}

    def make_tensor(spec: TensorSpec) -> torch.Tensor:
        if len(spec.shape) == 1 and spec.name.endswith("norm.weight"):
            return torch.ones(spec.shape, dtype=dtype)
        gen = torch.Generator().manual_seed(seeds[spec.name])
        return torch.empty(spec.shape, dtype=dtype).normal_(0.0, std, generator=gen)

    shards = _shard_plan(state_specs, max_shard_bytes)
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = SAFE_WEIGHTS_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / fname, shard, make_tensor, metadata={"format": "pt"})
        files.append(out_dir / fname)
        weight_map.update({spec.name: fname for spec in shard})

    num_params = sum(s.numel for s in state_specs)
    data_bytes = sum(s.nbytes for s in state_specs)
    if len(shards) > 1:
        index = {
            "metadata": {"total_parameters": num_params, "total_size": data_bytes},
            "weight_map": weight_map,
        }
        (out_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # What save_pretrained records before writing config.json / generation_config.json.
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    return CheckpointInfo(out_dir, files, len(state_specs), num_params, data_bytes)


def build_derived_checkpoint(
    src_dir: Path,
    out_dir: Path,
    transform: Callable[[TensorSpec, torch.Tensor], torch.Tensor | None],
) -> CheckpointInfo:
    """Write a copy of the safetensors checkpoint ``src_dir`` in which each tensor is
    ``transform(spec, tensor)`` (``None``: copied unchanged), e.g. a "fine-tuned" model made
    from a base. Same files, tensor names, shapes, dtypes and index; the other regular files
    (``config.json``, ...) are copied. One tensor is held in memory at a time."""
    from safetensors import safe_open

    out_dir.mkdir(parents=True, exist_ok=True)
    by_file: dict[Path, list[TensorSpec]] = {}
    specs = checkpoint_specs(src_dir)
    for name, path in checkpoint_weight_map(src_dir).items():
        by_file.setdefault(path, []).append(specs[name])
    files: list[Path] = []
    for path, file_specs in sorted(by_file.items()):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()

            def make_tensor(spec: TensorSpec) -> torch.Tensor:
                tensor = f.get_tensor(spec.name)
                new = transform(spec, tensor)
                return tensor if new is None else new

            write_safetensors(out_dir / path.name, file_specs, make_tensor, metadata=metadata)
        files.append(out_dir / path.name)
    for extra in src_dir.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors":
            shutil.copy2(extra, out_dir / extra.name)
    return CheckpointInfo(
        out_dir, files, len(specs), sum(s.numel for s in specs.values()), sum(s.nbytes for s in specs.values())
    )


# --------------------------------------------------------------------------------------
# Synthetic PEFT LoRA adapter
# --------------------------------------------------------------------------------------


@dataclass
class AdapterInfo:
    path: Path
    rank: int
    alpha: float
    num_modules: int
    num_params: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _peft_adapter_config(
    rank: int, alpha: float, target_modules: Sequence[str], base_model_name_or_path: str | None
) -> tuple[dict[str, object], dict[str, bytes]]:
    """adapter_config.json (and the other small files, i.e. the model card) that
    ``PeftModel.save_pretrained`` writes for a LoRA on a Llama causal LM, taken from a real
    save of a tiny model with the same module names. Cached: writing many adapters with the
    same settings saves the tiny model once."""
    config, extras = _peft_adapter_config_cached(rank, alpha, tuple(target_modules), base_model_name_or_path)
    return json.loads(json.dumps(config)), dict(extras)


@lru_cache(maxsize=16)
def _peft_adapter_config_cached(
    rank: int, alpha: float, target_modules: tuple[str, ...], base_model_name_or_path: str | None
) -> tuple[dict[str, object], dict[str, bytes]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    tiny_model = LlamaForCausalLM(tiny)
    # PEFT records these as the base model (as for a model that came from from_pretrained).
    tiny_model.name_or_path = base_model_name_or_path or ""
    tiny_model.config._name_or_path = base_model_name_or_path or ""
    peft_model = get_peft_model(
        tiny_model,
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), task_type="CAUSAL_LM"),
    )
    with tempfile.TemporaryDirectory(prefix="lorafuse-bench-peft-") as tmp:
        peft_model.save_pretrained(tmp)
        config = json.loads((Path(tmp) / ADAPTER_CONFIG_NAME).read_text())
        extras = {
            p.name: p.read_bytes()
            for p in Path(tmp).iterdir()
            if p.is_file() and p.name not in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
        }
    return config, extras


def build_lora_adapter(
    out_dir: Path,
    config: LlamaConfig,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] = LLAMA_LINEAR_MODULES,
    base_model_name_or_path: str | None = None,
    b_std: float = 0.01,
    a_std: float | None = None,
    seed: int = 1,
) -> AdapterInfo:
    """Write a PEFT LoRA adapter for ``LlamaForCausalLM(config)`` in the ``save_pretrained`` layout.

    Keys are ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r],
    float32. A ~ N(0, a_std^2) (default a_std = 1/sqrt(in)) and B ~ N(0, b_std^2), so B is
    non-zero (unlike a fresh PEFT init) and the merged delta is a visible but modest change
    of the base weights. The tensors of layer l do not depend on the number of layers.
    """
    import torch
    from torch import nn
    from transformers import LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_config, extras = _peft_adapter_config(rank, alpha, target_modules, base_model_name_or_path)
    adapter_config["base_model_name_or_path"] = base_model_name_or_path
    if isinstance(adapter_config.get("target_modules"), list):
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])  # PEFT writes a set
    (out_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    for name, data in extras.items():
        (out_dir / name).write_bytes(data)

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    targets = set(target_modules)
    specs: list[TensorSpec] = []
    fan_in: dict[str, int] = {}
    num_modules = 0
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module_name.rsplit(".", 1)[-1] not in targets:
            continue
        prefix = f"base_model.model.{module_name}"
        specs.append(TensorSpec(f"{prefix}.lora_A.weight", (rank, module.in_features), "F32"))
        specs.append(TensorSpec(f"{prefix}.lora_B.weight", (module.out_features, rank), "F32"))
        fan_in[f"{prefix}.lora_A.weight"] = module.in_features
        num_modules += 1
    seeds = {spec.name: seed * 1_000_003 + i for i, spec in enumerate(specs)}

    def make_tensor(spec: TensorSpec) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seeds[spec.name])
        if spec.name in fan_in:
            std = fan_in[spec.name] ** -0.5 if a_std is None else a_std
        else:
            std = b_std
        return torch.empty(spec.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)

    write_safetensors(out_dir / ADAPTER_WEIGHTS_NAME, specs, make_tensor, metadata={"format": "pt"})
    return AdapterInfo(out_dir, rank, float(alpha), num_modules, sum(s.numel for s in specs))


# --------------------------------------------------------------------------------------
# Reading PEFT LoRA adapters back
# --------------------------------------------------------------------------------------


def _pattern_value(patterns: dict[str, object] | None, module: str) -> object | None:
    """The value of the first key of PEFT's ``rank_pattern`` / ``alpha_pattern`` (in file order)
    that matches ``module`` as ``(.*\\.)?(KEY)$``, or None."""
    import re

    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return None


def peft_lora_scale(adapter_config: dict[str, object], module: str) -> tuple[int, float]:
    """(r, scale) of ``module`` under a PEFT LoRA ``adapter_config.json``: scale = alpha / r,
    or alpha / sqrt(r) with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` override r / alpha."""
    r = _pattern_value(adapter_config.get("rank_pattern"), module)  # type: ignore[arg-type]
    alpha = _pattern_value(adapter_config.get("alpha_pattern"), module)  # type: ignore[arg-type]
    r = int(adapter_config["r"] if r is None else r)  # type: ignore[arg-type]
    alpha = float(adapter_config["lora_alpha"] if alpha is None else alpha)  # type: ignore[arg-type]
    scale = alpha / (r**0.5) if adapter_config.get("use_rslora") else alpha / r
    return r, scale


def find_peft_adapter_dir(path: Path) -> Path:
    """``path`` if it holds ``adapter_config.json``, else its only sub-folder that does
    (``PeftModel.save_pretrained`` writes an adapter not named "default" to ``OUT/<name>/``)."""
    if (path / ADAPTER_CONFIG_NAME).exists():
        return path
    found = sorted(p.parent for p in path.glob(f"*/{ADAPTER_CONFIG_NAME}"))
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected one PEFT adapter folder, found {[str(f) for f in found]}")
    return found[0]


def peft_lora_factors(adapter_dir: Path, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B [out, r], A [r, in], scale) of a Linear LoRA ``module`` (e.g.
    ``model.layers.0.self_attn.q_proj``) of a PEFT adapter folder, as stored (float32 etc.).
    The key is looked up by suffix, so any ``base_model.model.`` prefix is accepted."""
    from safetensors import safe_open

    adapter_dir = find_peft_adapter_dir(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    _, scale = peft_lora_scale(config, module)
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
        factors = []
        for which in ("lora_B", "lora_A"):
            suffix = f"{module}.{which}.weight"
            matches = [k for k in keys if k == suffix or k.endswith("." + suffix)]
            if len(matches) != 1:
                raise KeyError(f"{adapter_dir}: {len(matches)} tensors named *{suffix}")
            factors.append(f.get_tensor(matches[0]))
    return factors[0], factors[1], scale


def peft_lora_delta64(adapter_dir: Path, module: str) -> torch.Tensor:
    """scale * B @ A of a Linear LoRA module of a PEFT adapter folder, in float64."""
    import torch

    b, a, scale = peft_lora_factors(adapter_dir, module)
    return scale * (b.to(torch.float64) @ a.to(torch.float64))


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of a non-empty sequence."""
    ordered = sorted(values)
    n = len(ordered)
    mid = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return mid, ordered[0], ordered[-1]


def fmt_spread(values: Sequence[float], digits: int = 2) -> str:
    """'median (min..max)' of a sequence of seconds."""
    mid, lo, hi = median_spread(values)
    return f"{mid:.{digits}f} ({lo:.{digits}f}..{hi:.{digits}f})"


def fmt_runs(values: Sequence[float], digits: int = 2) -> str:
    """'median (min..max) xN' of a sequence of seconds (one value: 'value x1'), the wall-time cell of the
    benchmark tables."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f} x1"
    return f"{fmt_spread(values, digits)} x{len(values)}"

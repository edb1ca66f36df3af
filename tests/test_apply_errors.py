"""apply on bad input: a clear error that names the file and the module, and no partial output.

Every failing call is made twice: once with no output yet (afterwards the output
path must not exist), and once over the output of an earlier good run (afterwards
it must be byte-identical, the very same folder or file). Neither may leave a
`.NAME.tmp-*` (or `.NAME.old-*`) entry beside the output. Inputs are hashed before
and after and must be untouched.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from peft_fixtures import Case, gpt2_case, llama_case
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorafuse
from lorafuse import (
    FormatError,
    LorafuseError,
    LorafuseValueError,
    MissingModuleError,
    NonFiniteError,
    OutputError,
    ShapeMismatchError,
    UnsupportedError,
)
from lorafuse.ops import apply as apply_mod

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


# ----------------------------------------------------------------------------- helpers


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (or of `root` itself when it is a file)."""
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leftovers(out: Path) -> list[str]:
    """Temporary entries an interrupted write could leave beside `out`."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder's model.safetensors (or of one file), via the safetensors package."""
    return load_file(str(path / "model.safetensors" if path.is_dir() else path))


def modules_of(adapter_dir: Path) -> set[str]:
    keys = load_file(str(adapter_dir / ADAPTER_FILE)).keys()
    return {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys}


def rewrite_adapter(adapter_dir: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Load the adapter's tensors with the safetensors package, edit them in place, save them back."""
    path = adapter_dir / ADAPTER_FILE
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(adapter_dir: Path, **changes: object) -> None:
    path = adapter_dir / ADAPTER_CONFIG
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))


def check_failure(
    call: Callable[[Path], object],
    out: Path,
    exc: type[LorafuseError] | type[BaseException],
    *parts: str | Path,
    make_prior: Callable[[Path], object],
    watched: list[Path] = (),  # type: ignore[assignment]
) -> str:
    """Run `call(out)` with no output yet, then over a good earlier output; both fail alike and write nothing.

    Returns the message of the first failure.
    """
    before = {str(w): file_hashes(w) for w in watched}

    # 1. No output before: none after, and no temporary leftovers.
    assert not out.exists()
    with pytest.raises(exc) as info:
        call(out)
    assert type(info.value) is exc, f"raised {type(info.value).__name__}, expected {exc.__name__}: {info.value}"
    message = str(info.value)
    for part in parts:
        assert str(part) in message, f"{str(part)!r} not in the message: {message}"
    assert not out.exists(), "a failed apply left its output"
    assert leftovers(out) == [], f"temporary files left: {leftovers(out)}"

    # 2. A good output from an earlier run: left exactly as it was (same inode, same bytes).
    make_prior(out)
    assert out.exists()
    prior, inode = file_hashes(out), out.stat().st_ino
    with pytest.raises(exc) as again:
        call(out)
    assert type(again.value) is exc
    assert file_hashes(out) == prior, "a failed apply changed the previous output"
    assert out.stat().st_ino == inode, "a failed apply replaced the previous output"
    assert leftovers(out) == [], f"temporary files left: {leftovers(out)}"

    for w in watched:
        assert file_hashes(w) == before[str(w)], f"a failed apply changed the input {w}"
    return message


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return llama_case(tmp_path_factory.mktemp("llama"), seed=1)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return gpt2_case(tmp_path_factory.mktemp("gpt2"), seed=2)


@pytest.fixture(scope="module")
def dora(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return llama_case(tmp_path_factory.mktemp("dora"), seed=3, use_dora=True,
                      target_modules=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def narrow_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama base with hidden size 32 (the llama adapters are made for hidden size 64)."""
    torch.manual_seed(4)
    config = LlamaConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("narrow") / "base"
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


@pytest.fixture
def work(tmp_path: Path, llama: Case) -> tuple[Path, Path]:
    """Private, editable copies of the llama base and adapter: (base, adapter)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(llama.base_dir, base)
    shutil.copytree(llama.adapter_dir, adapter)
    return base, adapter


@pytest.fixture
def good_output(llama: Case) -> Callable[[Path], object]:
    """Writes a good merged folder at the given path (the 'previous state' of an output)."""
    return lambda out: lorafuse.apply(llama.base_dir, [llama.adapter_dir], out=out, progress=False)


@pytest.fixture
def good_file_output(llama: Case) -> Callable[[Path], object]:
    return lambda out: lorafuse.apply(llama.base_dir / "model.safetensors", [llama.adapter_dir], out=out,
                                      progress=False)


# ----------------------------------------------------------------------------- broken base files


@pytest.mark.parametrize(
    "keep, expected",
    [
        (lambda size, hdr: size // 2, "truncated?"),  # cut inside the tensor data
        (lambda size, hdr: size - 1, "truncated?"),  # one byte short
        (lambda size, hdr: 8 + hdr // 2, "runs past the end"),  # cut inside the JSON header
        (lambda size, hdr: 5, "too small"),  # cut inside the length prefix
    ],
    ids=["half", "one-byte", "in-header", "in-prefix"],
)
def test_truncated_base(work, tmp_path, good_output, keep, expected):
    base, adapter = work
    model = base / "model.safetensors"
    data = model.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    model.write_bytes(data[: keep(len(data), header_len)])
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  FormatError, model, expected, make_prior=good_output, watched=[base, adapter])


def _garbage_file(data: bytes, n: int) -> bytes:
    return np.random.default_rng(7).bytes(4096)


def _garbage_header_bytes(data: bytes, n: int) -> bytes:  # valid length, the JSON replaced by non-UTF-8 bytes
    return data[:8] + b"\xff" * n + data[8 + n:]


def _header_not_object(data: bytes, n: int) -> bytes:
    return data[:8] + b"[" + b" " * (n - 1) + data[8 + n:]


def _header_bad_json(data: bytes, n: int) -> bytes:
    return data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:]


def _header_wrong_size(data: bytes, n: int) -> bytes:
    # A shape that no longer matches its byte range: valid JSON, wrong content.
    header = data[8:8 + n].replace(b'"shape":[128,64]', b'"shape":[128,65]', 1)
    assert header != data[8:8 + n]
    return data[:8] + header + data[8 + n:]


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (_garbage_file, "header length"),
        (_garbage_header_bytes, "not valid UTF-8"),
        (_header_not_object, "does not start with '{'"),
        (_header_bad_json, "not valid JSON"),
        (_header_wrong_size, "[128, 65]"),
    ],
    ids=["garbage-file", "non-utf8", "not-object", "bad-json", "shape-vs-offsets"],
)
def test_corrupt_base_header(work, tmp_path, good_output, corrupt, expected):
    base, adapter = work
    model = base / "model.safetensors"
    data = model.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    model.write_bytes(corrupt(data, n))
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  FormatError, model, expected, make_prior=good_output, watched=[base, adapter])


def test_corrupt_adapter_file(work, tmp_path, good_output):
    base, adapter = work
    weights = adapter / ADAPTER_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  FormatError, weights, "truncated?", make_prior=good_output, watched=[base, adapter])


def test_truncated_single_file_base(work, tmp_path, good_file_output):
    base, adapter = work
    model = base / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-4])
    check_failure(lambda out: lorafuse.apply(model, [adapter], out=out, progress=False),
                  tmp_path / "merged.safetensors", FormatError, model, "truncated?",
                  make_prior=good_file_output, watched=[base, adapter])


# ----------------------------------------------------------------------------- adapter vs base


def test_adapter_for_another_hidden_size(llama, narrow_base, tmp_path, good_output):
    message = check_failure(
        lambda out: lorafuse.apply(narrow_base, [llama.adapter_dir], out=out, progress=False),
        tmp_path / "out", ShapeMismatchError, llama.adapter_dir,
        make_prior=good_output, watched=[narrow_base, llama.adapter_dir],
    )
    # The message names one adapter module, its update's shape and the base weight's shape.
    found = re.search(r"module '([^']+)'", message)
    assert found, message
    module = found.group(1)
    assert module in modules_of(llama.adapter_dir)
    adapter_tensors = load_file(str(llama.adapter_dir / ADAPTER_FILE))
    a = adapter_tensors[f"base_model.model.{module}.lora_A.weight"]
    b = adapter_tensors[f"base_model.model.{module}.lora_B.weight"]
    base_shape = tensors_of(narrow_base)[f"{module}.weight"].shape
    assert str((b.shape[0], a.shape[1])) in message
    assert str(tuple(base_shape)) in message
    assert base_shape != (b.shape[0], a.shape[1])


def test_adapter_tensor_reshaped(work, tmp_path, good_output):
    base, adapter = work
    module = "model.layers.1.self_attn.o_proj"

    def narrow(t: dict[str, np.ndarray]) -> None:
        key = f"base_model.model.{module}.lora_A.weight"
        t[key] = np.ascontiguousarray(t[key][:, :48])

    rewrite_adapter(adapter, narrow)
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  ShapeMismatchError, adapter, f"'{module}'", "(64, 48)", "(64, 64)",
                  make_prior=good_output, watched=[base, adapter])


def test_factors_of_different_ranks(work, tmp_path, good_output):
    base, adapter = work
    module = "model.layers.0.mlp.up_proj"

    def cut(t: dict[str, np.ndarray]) -> None:
        key = f"base_model.model.{module}.lora_B.weight"
        t[key] = np.ascontiguousarray(t[key][:, :3])

    rewrite_adapter(adapter, cut)
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  ShapeMismatchError, adapter / ADAPTER_FILE, f"'{module}'", "(4, 64)", "(128, 3)",
                  make_prior=good_output, watched=[base, adapter])


def test_llama_adapter_on_gpt2_base(llama, gpt2, tmp_path, good_output):
    n = len(modules_of(llama.adapter_dir))
    check_failure(
        lambda out: lorafuse.apply(gpt2.base_dir, [llama.adapter_dir], out=out, progress=False),
        tmp_path / "out", MissingModuleError, gpt2.base_dir, llama.adapter_dir,
        "'model.layers.0.mlp.down_proj'", f"{n} adapter module" + ("" if n == 1 else "s"),
        make_prior=good_output, watched=[gpt2.base_dir, llama.adapter_dir],
    )


def test_gpt2_adapter_on_llama_base(llama, gpt2, tmp_path, good_output):
    check_failure(
        lambda out: lorafuse.apply(llama.base_dir, [gpt2.adapter_dir], out=out, progress=False),
        tmp_path / "out", MissingModuleError, llama.base_dir, gpt2.adapter_dir, "transformer.h.0.",
        make_prior=good_output, watched=[llama.base_dir, gpt2.adapter_dir],
    )


def test_one_module_missing(work, tmp_path, good_output):
    """One stray module among good ones: still refused, and the stray one is named."""
    base, adapter = work

    def add_stray(t: dict[str, np.ndarray]) -> None:
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = np.ones((4, 64), np.float32)
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = np.ones((64, 4), np.float32)

    rewrite_adapter(adapter, add_stray)
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  MissingModuleError, "1 adapter module found", "'model.layers.7.self_attn.q_proj'",
                  make_prior=good_output, watched=[base, adapter])


# ----------------------------------------------------------------------------- unknown / pickle formats


def test_folder_with_a_random_file(llama, tmp_path, good_output):
    folder = tmp_path / "not_an_adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    check_failure(lambda out: lorafuse.apply(llama.base_dir, [folder], out=out, progress=False),
                  tmp_path / "out", FormatError, folder, "not a recognised adapter", make_prior=good_output)


def test_safetensors_without_config(llama, tmp_path, good_output):
    folder = tmp_path / "stray"
    folder.mkdir()
    stray = folder / "weights.safetensors"
    save_file({"encoder.weight": np.ones((4, 4), np.float32), "encoder.bias": np.zeros(4, np.float32)}, str(stray))
    for target in (stray, folder):
        check_failure(lambda out, target=target: lorafuse.apply(llama.base_dir, [target], out=out,
                                                               progress=False),
                      tmp_path / f"out_{target.name}", FormatError, target, "not a recognised adapter",
                      make_prior=good_output, watched=[folder])


def test_adapter_path_does_not_exist(llama, tmp_path, good_output):
    missing = tmp_path / "nowhere"
    check_failure(lambda out: lorafuse.apply(llama.base_dir, [missing], out=out, progress=False),
                  tmp_path / "out", FormatError, missing, "no such file", make_prior=good_output)


def test_pickle_adapter(llama, tmp_path, good_output):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(llama.adapter_dir / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    state = {k: torch.from_numpy(v) for k, v in load_file(str(llama.adapter_dir / ADAPTER_FILE)).items()}
    torch.save(state, folder / "adapter_model.bin")
    for target in (folder, folder / "adapter_model.bin"):
        check_failure(lambda out, target=target: lorafuse.apply(llama.base_dir, [target], out=out,
                                                               progress=False),
                      tmp_path / f"out_{target.stem}", FormatError, folder / "adapter_model.bin", "pickle",
                      make_prior=good_output, watched=[folder])


def test_pickle_adapter_without_config(llama, tmp_path, good_output):
    """A folder holding only a pickle gets the pickle explanation, not 'unknown format'."""
    folder = tmp_path / "pickled_only"
    folder.mkdir()
    state = {k: torch.from_numpy(v) for k, v in load_file(str(llama.adapter_dir / ADAPTER_FILE)).items()}
    torch.save(state, folder / "adapter_model.bin")
    check_failure(lambda out: lorafuse.apply(llama.base_dir, [folder], out=out, progress=False),
                  tmp_path / "out", FormatError, folder / "adapter_model.bin", "pickle",
                  make_prior=good_output, watched=[folder])


def test_pickle_base(llama, tmp_path, good_output):
    base = tmp_path / "pickled_base"
    base.mkdir()
    shutil.copy(llama.base_dir / "config.json", base / "config.json")
    torch.save({k: torch.from_numpy(v) for k, v in tensors_of(llama.base_dir).items()}, base / "pytorch_model.bin")
    for target in (base, base / "pytorch_model.bin"):
        check_failure(lambda out, target=target: lorafuse.apply(target, [llama.adapter_dir], out=out,
                                                               progress=False),
                      tmp_path / f"out_{target.stem}", FormatError, base / "pytorch_model.bin", "pickle",
                      make_prior=good_output, watched=[base])


def test_base_path_does_not_exist(llama, tmp_path, good_output):
    missing = tmp_path / "no_base"
    check_failure(lambda out: lorafuse.apply(missing, [llama.adapter_dir], out=out, progress=False),
                  tmp_path / "out", FormatError, missing, "no such file", make_prior=good_output)


# ----------------------------------------------------------------------------- adapter_config.json


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"r": "eight"}, "'r'"),
        ({"r": 0}, "'r'"),
        ({"r": -4}, "'r'"),
        ({"r": True}, "'r'"),
        ({"lora_alpha": None}, "'lora_alpha'"),
        ({"lora_alpha": "8"}, "'lora_alpha'"),
        ({"use_rslora": "yes"}, "'use_rslora'"),
        ({"rank_pattern": ["q_proj"]}, "'rank_pattern'"),
        ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ],
    ids=["r-string", "r-zero", "r-negative", "r-bool", "alpha-null", "alpha-string", "rslora-string",
         "rank-pattern-list", "alpha-pattern-string", "rank-pattern-zero"],
)
def test_config_with_wrong_types(work, tmp_path, good_output, changes, key):
    base, adapter = work
    edit_config(adapter, **changes)
    value = repr(next(iter(changes.values())))
    parts = [adapter / ADAPTER_CONFIG, key] + ([value] if "pattern" not in key else [])
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  FormatError, *parts, make_prior=good_output, watched=[base, adapter])


def test_config_not_json(work, tmp_path, good_output):
    base, adapter = work
    (adapter / ADAPTER_CONFIG).write_text('{"r": 4, ')
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  FormatError, adapter / ADAPTER_CONFIG, make_prior=good_output, watched=[base, adapter])


def test_config_rank_disagrees_with_tensors(work, tmp_path, good_output):
    base, adapter = work
    edit_config(adapter, r=8)
    message = check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                            ShapeMismatchError, adapter / ADAPTER_FILE, "r=8", "rank 4",
                            make_prior=good_output, watched=[base, adapter])
    found = re.search(r"module '([^']+)'", message)
    assert found and found.group(1) in modules_of(adapter), message


def test_rank_pattern_disagrees_with_tensors(work, tmp_path, good_output):
    base, adapter = work
    edit_config(adapter, rank_pattern={"v_proj": 2})
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  ShapeMismatchError, "v_proj'", "r=2", "rank 4", make_prior=good_output, watched=[base, adapter])


@pytest.mark.parametrize("peft_type", ["LOHA", "IA3", "PROMPT_TUNING"])
def test_not_a_lora_adapter(work, tmp_path, good_output, peft_type):
    base, adapter = work
    edit_config(adapter, peft_type=peft_type)
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  UnsupportedError, adapter / ADAPTER_CONFIG, repr(peft_type),
                  make_prior=good_output, watched=[base, adapter])


# ----------------------------------------------------------------------------- output paths


def _refused_output(base_arg: Path, adapter: Path, out: Path, root: Path) -> None:
    before = file_hashes(root)
    entries = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(OutputError) as info:
        lorafuse.apply(base_arg, [adapter], out=out, progress=False)
    assert type(info.value) is OutputError
    assert str(out) in str(info.value)
    assert file_hashes(root) == before, "a refused output changed the inputs"
    assert sorted(p.name for p in out.parent.iterdir()) == entries, "a refused output left files behind"


@pytest.mark.parametrize("which", ["base", "adapter", "parent-of-base", "base-weights-file"])
def test_output_is_an_input_folder(work, tmp_path, which):
    base, adapter = work
    out = {"base": base, "adapter": adapter, "parent-of-base": base.parent,
           "base-weights-file": base / "model.safetensors"}[which]
    _refused_output(base, adapter, out, tmp_path)


@pytest.mark.parametrize("which", ["base-file", "base-folder", "adapter-weights", "adapter-config", "adapter"])
def test_output_is_an_input_with_a_single_file_base(work, tmp_path, which):
    base, adapter = work
    out = {"base-file": base / "model.safetensors", "base-folder": base, "adapter-weights": adapter / ADAPTER_FILE,
           "adapter-config": adapter / ADAPTER_CONFIG, "adapter": adapter}[which]
    _refused_output(base / "model.safetensors", adapter, out, tmp_path)


def test_output_is_an_existing_file_for_a_folder_base(work, tmp_path):
    base, adapter = work
    out = tmp_path / "some_file.txt"
    out.write_text("keep me")
    with pytest.raises(OutputError) as info:
        lorafuse.apply(base, [adapter], out=out, progress=False)
    assert str(out) in str(info.value)
    assert out.read_text() == "keep me"
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "adapters, weights, expected",
    [
        (1, [1.0, 0.5], "2 weights given for 1 adapter"),
        (2, [1.0], "1 weight given for 2 adapters"),
        (1, [], "0 weights given for 1 adapter"),
        (1, [float("nan")], "finite"),
        (1, [float("inf")], "finite"),
    ],
    ids=["two-for-one", "one-for-two", "none-for-one", "nan", "inf"],
)
def test_wrong_weights(llama, tmp_path, good_output, adapters, weights, expected):
    check_failure(
        lambda out: lorafuse.apply(llama.base_dir, [llama.adapter_dir] * adapters, weights, out=out, progress=False),
        tmp_path / "out", LorafuseValueError, expected, make_prior=good_output,
    )
    assert issubclass(LorafuseValueError, ValueError)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"dtype": "int8"}, "'int8'"),
        ({"max_shard_size": "lots"}, "'lots'"),
        ({"max_shard_size": "0GB"}, "'0GB'"),
        ({"threads": -1}, "threads"),
    ],
    ids=["dtype", "shard-size", "shard-size-zero", "threads"],
)
def test_bad_options(llama, tmp_path, good_output, kwargs, expected):
    check_failure(lambda out: lorafuse.apply(llama.base_dir, [llama.adapter_dir], out=out, progress=False, **kwargs),
                  tmp_path / "out", LorafuseValueError, expected, make_prior=good_output)


def test_no_adapters(llama, tmp_path, good_output):
    check_failure(lambda out: lorafuse.apply(llama.base_dir, [], out=out, progress=False), tmp_path / "out",
                  LorafuseValueError, "at least one adapter", make_prior=good_output)


# ----------------------------------------------------------------------------- non-finite values


NAN_MODULE = "model.layers.1.self_attn.v_proj"


def test_nan_in_adapter_factor(work, tmp_path, good_output, llama):
    base, adapter = work

    def poison(t: dict[str, np.ndarray]) -> None:
        t[f"base_model.model.{NAN_MODULE}.lora_A.weight"][2, 5] = np.nan

    rewrite_adapter(adapter, poison)
    message = check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                            NonFiniteError, NAN_MODULE, "allow-nonfinite", make_prior=good_output,
                            watched=[base, adapter])
    # Only the poisoned module is named.
    named = set(re.findall(r"model\.layers\.\d+\.[a-z_]+\.[a-z_]+", message))
    assert named == {NAN_MODULE}, message

    # allow_nonfinite writes it: column 5 of that weight is NaN, everything else is as in a clean merge.
    out = tmp_path / "allowed"
    lorafuse.apply(base, [adapter], out=out, progress=False, allow_nonfinite=True)
    clean = tmp_path / "clean"
    good_output(clean)
    got, ref = tensors_of(out), tensors_of(clean)
    assert got.keys() == ref.keys()
    w = got[f"{NAN_MODULE}.weight"]
    assert np.isnan(w[:, 5]).all()  # NaN times anything is NaN: the whole column
    assert np.isfinite(np.delete(w, 5, axis=1)).all()
    np.testing.assert_array_equal(np.delete(w, 5, axis=1), np.delete(ref[f"{NAN_MODULE}.weight"], 5, axis=1))
    for key in ref:
        if key != f"{NAN_MODULE}.weight":
            np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_inf_in_adapter_factor_b(work, tmp_path, good_output):
    base, adapter = work
    module = "model.layers.0.mlp.gate_proj"

    def poison(t: dict[str, np.ndarray]) -> None:
        t[f"base_model.model.{module}.lora_B.weight"][7, 0] = np.inf

    rewrite_adapter(adapter, poison)
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  NonFiniteError, module, make_prior=good_output, watched=[base, adapter])


def test_nan_in_targeted_base_weight(work, tmp_path, good_output):
    base, adapter = work
    module = "model.layers.0.self_attn.k_proj"
    t = tensors_of(base)
    t[f"{module}.weight"][3, 3] = np.nan
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    check_failure(lambda out: lorafuse.apply(base, [adapter], out=out, progress=False), tmp_path / "out",
                  NonFiniteError, module, make_prior=good_output, watched=[base, adapter])


# ----------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("weight", [0.5, -1.0, 2.0])
def test_dora_with_a_weight_other_than_one(dora, tmp_path, good_output, weight):
    message = check_failure(
        lambda out: lorafuse.apply(dora.base_dir, [dora.adapter_dir], [weight], out=out, progress=False),
        tmp_path / "out", UnsupportedError, dora.adapter_dir, "DoRA", make_prior=good_output,
        watched=[dora.base_dir, dora.adapter_dir],
    )
    found = re.search(r"module '([^']+)'", message)
    assert found and found.group(1) in modules_of(dora.adapter_dir), message


def test_dora_with_weight_one_is_fine(dora, tmp_path):
    out = tmp_path / "out"
    lorafuse.apply(dora.base_dir, [dora.adapter_dir], [1.0], out=out, progress=False)
    got = tensors_of(out)
    for key, ref in dora.merged_state.items():
        np.testing.assert_allclose(got[key], ref, rtol=0, atol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------- failure while writing


class Boom(RuntimeError):
    pass


def _fail_after_first_batch(monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]) -> dict[str, object]:
    """Make _Executor._flush raise right after its first call has computed a batch of merged tensors.

    Only while state["armed"] is set, so that the earlier good run is not affected. At the
    moment it raises, it records the temporary entries beside state["out"], to prove that a
    partial output really existed (under a temporary name) when the error struck.
    """
    original = apply_mod._Executor._flush
    state: dict[str, object] = {"armed": 0, "calls": 0, "out": None, "tmp_seen": []}

    def flush(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = original(*args, **kwargs)
        if state["armed"]:
            state["calls"] += 1  # type: ignore[operator]
            state["tmp_seen"] = leftovers(state["out"])  # type: ignore[arg-type]
            raise exc("disk on fire")
        return result

    monkeypatch.setattr(apply_mod._Executor, "_flush", flush)
    return state


def _disarming(state: dict[str, object], make: Callable[[Path], object]) -> Callable[[Path], object]:
    def prior(out: Path) -> object:
        armed, state["armed"] = state["armed"], 0
        try:
            return make(out)
        finally:
            state["armed"] = armed
    return prior


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt, NonFiniteError])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_error_while_writing_leaves_nothing(llama, tmp_path, good_output, monkeypatch, exc, layout):
    shard = {"max_shard_size": "100KB"} if layout == "sharded" else {}
    state = _fail_after_first_batch(monkeypatch, exc)

    def call(out: Path) -> object:
        state.update(armed=1, calls=0, out=out)
        return lorafuse.apply(llama.base_dir, [llama.adapter_dir], out=out, progress=False, **shard)

    check_failure(call, tmp_path / "out", exc, "disk on fire", make_prior=_disarming(state, good_output),
                  watched=[llama.base_dir, llama.adapter_dir])
    assert state["calls"] == 1
    assert len(state["tmp_seen"]) == 1 and ".tmp-" in state["tmp_seen"][0]  # type: ignore[arg-type,index]


def test_error_while_writing_a_single_file(llama, tmp_path, good_file_output, monkeypatch):
    state = _fail_after_first_batch(monkeypatch, Boom)

    def call(out: Path) -> object:
        state.update(armed=1, calls=0, out=out)
        return lorafuse.apply(llama.base_dir / "model.safetensors", [llama.adapter_dir], out=out, progress=False)

    check_failure(call, tmp_path / "merged.safetensors", Boom, "disk on fire",
                  make_prior=_disarming(state, good_file_output), watched=[llama.base_dir, llama.adapter_dir])
    assert state["calls"] == 1
    assert len(state["tmp_seen"]) == 1 and ".tmp-" in state["tmp_seen"][0]  # type: ignore[arg-type,index]


def test_error_while_copying_side_files(llama, tmp_path, good_output, monkeypatch):
    """A failure after every shard is written (copying config.json) still leaves no output."""
    real_copy = apply_mod.copy_file
    state = {"armed": 0}

    def copy2(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if state["armed"] and Path(src).name == "generation_config.json":
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    def call(out: Path) -> object:
        state["armed"] = 1
        return lorafuse.apply(llama.base_dir, [llama.adapter_dir], out=out, progress=False)

    monkeypatch.setattr(apply_mod, "copy_file", copy2)
    check_failure(call, tmp_path / "out", OutputError, "No space left", make_prior=_disarming(state, good_output),
                  watched=[llama.base_dir, llama.adapter_dir])


def test_error_while_writing_stops_queued_writes_first(llama, tmp_path, good_output, monkeypatch):
    """Writes still queued when an error strikes must not run against the closed output file
    (its descriptor number may already belong to another file), nor after apply has returned."""
    from lorafuse.io import safetensors as st_mod

    real_copy_range = st_mod.copy_range
    events: list[str] = []
    state = _fail_after_first_batch(monkeypatch, Boom)

    def slow_copy_range(*args):  # type: ignore[no-untyped-def]
        if state["armed"]:
            time.sleep(0.05)  # a slow disk: the main thread fails while this copy is queued or running
        try:
            real_copy_range(*args)
        except OSError as e:
            events.append(f"write failed: {e}")
            raise
        if state["armed"] and state["returned"]:
            events.append("write after apply returned")

    monkeypatch.setattr(st_mod, "copy_range", slow_copy_range)

    def call(out: Path) -> object:
        state.update(armed=1, calls=0, out=out, returned=0)
        try:
            return lorafuse.apply(llama.base_dir, [llama.adapter_dir], out=out, progress=False)
        finally:
            state["returned"] = 1

    check_failure(call, tmp_path / "out", Boom, "disk on fire", make_prior=_disarming(state, good_output),
                  watched=[llama.base_dir, llama.adapter_dir])
    time.sleep(0.2)
    assert events == []

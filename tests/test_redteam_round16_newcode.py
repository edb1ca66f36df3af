"""Round 16 red team, the code of round 15's last hours: the console script's fast exit (lorafuse_entry.run ends the
process with os._exit once a command is done), apply's page-padded headers and 256 KiB writes, and the round-15
features (PEFT trainable tokens, lora_bias arithmetic, kohya negative scales), checked against safetensors, PEFT and
numpy float64 on files written here."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

RUN = "from lorafuse_entry import run\nsys.exit(run())\n"


def _adapter(tmp: Path, out: int = 12, inn: int = 10, alpha: int = 3) -> Path:
    """A rank-2 PEFT adapter folder on two q_proj weights (out x inn, float32)."""
    rng = np.random.default_rng(3)
    ad = tmp / "ad"
    ad.mkdir()
    factors = {}
    for i in range(2):
        stem = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        factors[f"{stem}.lora_A.weight"] = rng.standard_normal((2, inn)).astype(np.float32)
        factors[f"{stem}.lora_B.weight"] = rng.standard_normal((out, 2)).astype(np.float32)
    save_file(factors, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": alpha,
                                                        "target_modules": ["q_proj"]}))
    return ad


def _buffered_run(prelude: str, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """The console script's entry run after `prelude`, with stdout and stderr pipes block-buffered as a user's
    shell gives them (PYTHONUNBUFFERED, which this test environment may set, left out)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", "import sys\n" + prelude + RUN, *map(str, args)],
                          capture_output=True, timeout=120, env=env)


# ---- the console script's exit: what atexit handlers print is not lost ------------------------------------------


def test_run_keeps_what_an_atexit_handler_prints_to_a_pipe(tmp_path: Path) -> None:
    """run() ran the atexit handlers after its last flush of stdout and stderr, then os._exit: what a handler
    printed (a library's summary, a user's sitecustomize) sat in the pipe's buffer and was lost; the interpreter's
    own exit flushes after the handlers."""
    ad = _adapter(tmp_path)
    prelude = ("import atexit\n"
               "atexit.register(lambda: (sys.stdout.write('out-from-atexit'), sys.stderr.write('err-from-atexit')))\n")
    p = _buffered_run(prelude, "info", ad)
    assert p.returncode == 0, p.stderr
    assert b"peft" in p.stdout  # the command's own output
    assert p.stdout.endswith(b"out-from-atexit")
    assert p.stderr.endswith(b"err-from-atexit")


def test_run_keeps_an_atexit_handlers_output_and_the_commands_status(tmp_path: Path) -> None:
    """A failing command's status (1, one line) stands, and a handler's line still reaches the pipe."""
    prelude = "import atexit\natexit.register(print, 'bye')\n"
    p = _buffered_run(prelude, "info", tmp_path / "missing.safetensors")
    assert p.returncode == 1
    assert p.stdout == b"bye\n"
    assert b"Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ---- apply's page-padded header: the output reads as the input, in safetensors and lorafuse ---------------------


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_padded_header_of_apply_reads_back_in_safetensors_torch_and_lorafuse(tmp_path: Path) -> None:
    """A base whose data starts off a page, with 2-byte tensors of odd lengths between the copied ones: the merged
    file's header is padded (copies keep their place within pages), and every reader gets the same tensors, the
    merged ones equal to W + 1.5 B A in float64, the copied ones byte for byte."""
    import torch
    from safetensors.torch import load_file as load_torch

    import lorafuse

    rng = np.random.default_rng(5)
    base = tmp_path / "base"
    base.mkdir()
    weights: dict[str, np.ndarray] = {}
    for i in range(2):
        weights[f"model.layers.{i}.self_attn.q_proj.weight"] = rng.standard_normal((12, 10)).astype(np.float32)
        weights[f"model.layers.{i}.odd"] = rng.standard_normal((3,)).astype(np.float16)
        weights[f"model.layers.{i}.mlp.up_proj.weight"] = rng.standard_normal((64, 64)).astype(np.float32)
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt", "note": "x" * 37})
    ad = _adapter(tmp_path)
    lorafuse.apply(base, [ad], out=tmp_path / "o")
    out = tmp_path / "o" / "model.safetensors"
    assert _data_start(out) % 8 == 0
    got, got_t = load_file(str(out)), load_torch(str(out))
    factors = load_file(str(ad / "adapter_model.safetensors"))
    assert set(got) == set(got_t) == set(weights)
    for k, w in weights.items():
        assert got_t[k].dtype == torch.from_numpy(w).dtype
        np.testing.assert_array_equal(got_t[k].numpy(), got[k])
        stem = "base_model.model." + k.removesuffix(".weight")
        if f"{stem}.lora_A.weight" in factors:
            want = w.astype(np.float64) + 1.5 * (factors[f"{stem}.lora_B.weight"].astype(np.float64)
                                                   @ factors[f"{stem}.lora_A.weight"].astype(np.float64))
            np.testing.assert_allclose(got[k].astype(np.float64), want, rtol=2e-6, atol=2e-6)
        else:
            assert got[k].tobytes() == w.tobytes(), k


# ---- a variant's shards re-sharded: the output keeps the variant in its names, as docs/cli.md says ---------------


def test_a_variant_folder_resharded_keeps_the_variant_and_loads_with_it(tmp_path: Path) -> None:
    """save_pretrained(variant="fp16", max_shard_size=...) then `apply --max-shard-size`: the note (and docs/cli.md)
    say the output keeps its names and from_pretrained(..., variant="fp16") loads it; the re-sharded output was
    named model-0000i-of-0000n.safetensors + model.safetensors.index.json, which that call does not find."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorafuse

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=64)
    base = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(base, variant="fp16", max_shard_size="20KB")
    ad = _adapter(tmp_path, out=32, inn=32, alpha=2)
    lorafuse.apply(base, [ad], out=tmp_path / "kept")  # the input's shards and names
    want = {k: v for f in sorted((tmp_path / "kept").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    for size, shards in (("64KiB", 2), ("1GB", 1)):
        out = tmp_path / f"o{shards}"
        lorafuse.apply(base, [ad], out=out, max_shard_size=size)
        files = sorted(p.name for p in out.glob("*.safetensors"))
        assert files == (["model.fp16.safetensors"] if shards == 1 else
                         [f"model.fp16-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)])
        assert (out / "model.safetensors.index.fp16.json").is_file() == (shards > 1)
        assert not (out / "model.safetensors.index.json").exists()
        if shards > 1:
            index = json.loads((out / "model.safetensors.index.fp16.json").read_text())
            assert set(index["weight_map"].values()) == set(files)
            assert index["metadata"]["total_size"] == sum(v.nbytes for v in want.values())
        model = LlamaForCausalLM.from_pretrained(out, variant="fp16")
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        for k, v in want.items():
            np.testing.assert_array_equal(state[k], v, err_msg=k)


# ---- --help to a stdout that cannot take it --------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["apply", "--help"], ["help", "resize"], ["--version"]])
def test_help_to_a_full_disk_written_through_fails_saying_so(args: list[str]) -> None:
    """`lorafuse --help > /dev/full` under python -u / PYTHONUNBUFFERED (writes go out at once): argparse's
    _print_message drops the OSError, and the command exited 0 with nothing shown; as --version and the buffered
    case do, it says `stdout: No space left on device` with status 1."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open("/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, "-c", "import sys\n" + RUN, *args], stdout=full, stderr=subprocess.PIPE,
                           timeout=120, env=env)
    assert p.returncode == 1, p.stderr
    assert p.stderr.decode().strip() == "lorafuse: error: stdout: No space left on device"


def test_help_to_a_reader_that_left_is_status_141() -> None:
    """`lorafuse apply --help | (exit)`: the reader left; status 141 and nothing on stderr, as for a command's
    output (argparse dropped the BrokenPipeError: status 0)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-c", "import sys\n" + RUN, "apply", "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=120) == 141
    assert err == b""

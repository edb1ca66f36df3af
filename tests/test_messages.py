"""Issue #13 §5 / §6: no tracebacks, no endless copies, clear messages, and what a read of the code found.

- side files of a base folder that are not regular files (broken links, link loops, FIFOs, sockets,
  devices) are left out with a note naming them; one that changes while it is copied is refused;
  an unreadable config.json is an error naming it; nothing blocks or copies without end;
- zero-size tensors, scalars and zero-tensor checkpoints are written, whatever --dtype / --max-shard-size;
- model_index.json component names are plain folder names of the pipeline;
- names from files reach the terminal escaped (ESC, BEL, CR, bidi overrides), our line breaks kept;
- `.SAFETENSORS` in any case;
- `parse_size` and absurd `--max-shard-size` values;
- the bias path honours a replaced bias (modules_to_save) and adds every LoRA bias, in any order;
- one JSON reader for config.json (apply and extract);
- `state_dict("torch")` gives F8 tensors as torch float8 dtypes; `with_factors` keeps magnitude and bias.

References: numpy float64 for values, the `safetensors` and `torch` packages for what is written.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

import lorafuse
from lorafuse import FormatError, LorafuseValueError
from lorafuse._terminal import printable
from lorafuse.cli import main
from lorafuse.formats import detect_format
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.io.pipeline import Pipeline
from lorafuse.model import Adapter
from lorafuse.ops.apply import parse_size
from lorafuse.ops.extract import extract
from lorafuse.ops.rank import RankRule
from lorafuse.ops.resize import resize

PREFIX = "base_model.model."
RANK, ALPHA = 2, 4.0  # scale 2
SCALE = ALPHA / RANK


# ----------------------------------------------------------------------------- builders


def write_base(folder: Path, extra: dict[str, np.ndarray] | None = None, config: object = None,
               metadata: dict[str, str] | None = None, name: str = "model.safetensors") -> dict[str, np.ndarray]:
    """A checkpoint folder: layer.q (weight 8x8 + bias), layer.k (8x8), and `extra` tensors."""
    rng = np.random.default_rng(7)
    tensors = {"layer.q.weight": rng.standard_normal((8, 8)).astype(np.float32),
               "layer.q.bias": rng.standard_normal(8).astype(np.float32),
               "layer.k.weight": rng.standard_normal((8, 8)).astype(np.float32)}
    tensors.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name), metadata=metadata or {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"} if config is None else config))
    return tensors


def write_peft(folder: Path, modules: tuple[str, ...] = ("layer.q",), seed: int = 1, bias: bool = False,
               full: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A PEFT LoRA folder (r=2, alpha=4) on `modules`, with lora_B biases and modules_to_save tensors if asked."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for m in modules:
        tensors[f"{PREFIX}{m}.lora_A.weight"] = rng.standard_normal((RANK, 8)).astype(np.float32)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = rng.standard_normal((8, RANK)).astype(np.float32)
        if bias:
            tensors[f"{PREFIX}{m}.lora_B.bias"] = rng.standard_normal(8).astype(np.float32)
    tensors.update({PREFIX + k: v for k, v in (full or {}).items()})
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "lora_bias": bias,
           "target_modules": [m.rsplit(".", 1)[-1] for m in modules]}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return tensors


def merged(base: dict[str, np.ndarray], lora: dict[str, np.ndarray], module: str) -> np.ndarray:
    """W + scale * B @ A in float64."""
    a = lora[f"{PREFIX}{module}.lora_A.weight"].astype(np.float64)
    b = lora[f"{PREFIX}{module}.lora_B.weight"].astype(np.float64)
    return base[module + ".weight"].astype(np.float64) + SCALE * b @ a


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def finishes(call: Callable[[], object], unblock: Callable[[], None], seconds: float = 20.0) -> object:
    """`call()` in a thread; a call still running after `seconds` (blocked on a FIFO, copying /dev/zero)
    fails the test after `unblock()`. Returns what it returned; re-raises what it raised."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock()
        thread.join(10)
        pytest.fail(f"still running after {seconds} s: blocked on a FIFO or copying without end")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def fifo_unblocker(*fifos: Path) -> Callable[[], None]:
    def unblock() -> None:  # an open for reading and writing never blocks and releases a blocked reader
        for f in fifos:
            os.close(os.open(f, os.O_RDWR | os.O_NONBLOCK))

    return unblock


# ----------------------------------------------------------------------------- §5 side files


def _special_side_files(base: Path) -> dict[str, str]:
    """Side files that are not regular files, name -> the words its note must hold."""
    os.symlink("tokenizer_gone.json", base / "dangling.json")
    os.symlink("loop_b", base / "loop_a")
    os.symlink("loop_a", base / "loop_b")
    os.mkfifo(base / "pipe.json")
    os.symlink("/dev/zero", base / "zeros.txt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(base / "sock"))
    sock.close()
    return {"dangling.json": "does not exist", "loop_a": "loop", "loop_b": "loop", "pipe.json": "FIFO",
            "zeros.txt": "character device", "sock": "socket"}


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_side_files_that_are_not_regular_files_are_left_out_with_a_note(tmp_path, capsys, dtype):
    base_dir, ad_dir, out = tmp_path / "base", tmp_path / "ad", tmp_path / "out"
    base = write_base(base_dir)
    lora = write_peft(ad_dir)
    special = _special_side_files(base_dir)
    (tmp_path / "elsewhere.json").write_text('{"vocab": [1, 2, 3]}')
    (base_dir / "tokenizer.json").write_text('{"model": "bpe"}')
    os.symlink(tmp_path / "elsewhere.json", base_dir / "vocab.json")  # a link out of the folder: left out
    os.symlink("tokenizer.json", base_dir / "tokenizer_link.json")
    argv = ["apply", base_dir, ad_dir, "-o", out, "--no-progress"] + (["--dtype", dtype] if dtype else [])
    code, stdout, stderr = finishes(lambda: run_cli(capsys, *argv), fifo_unblocker(base_dir / "pipe.json"))
    assert code == 0, stderr
    notes = [line for line in stderr.splitlines() if line.startswith("note: ")]
    for name, words in special.items():
        line = next((n for n in notes if n.startswith(f"note: {name} is ")), None)
        assert line is not None and words in line and line.endswith("not copied"), (name, notes)
        assert not os.path.lexists(out / name), name
    # regular files reached through links inside the folder are copied as files, with their content; a link out of
    # it is not (its bytes could be anyone's: tests/test_redteam_round4_files.py, a Hugging Face snapshot's blobs too)
    for name, src in (("tokenizer_link.json", base_dir / "tokenizer.json"),
                      ("tokenizer.json", base_dir / "tokenizer.json"), ("config.json", base_dir / "config.json")):
        assert not (out / name).is_symlink() and (out / name).read_bytes() == src.read_bytes(), name
    assert not os.path.lexists(out / "vocab.json")
    assert f"note: vocab.json is a symbolic link to {(tmp_path / 'elsewhere.json').resolve()}, outside" in stderr
    w = load_torch(str(out / "model.safetensors"))["layer.q.weight"]
    want = merged(base, lora, "layer.q")
    assert w.dtype == (torch.float32 if dtype is None else torch.bfloat16)
    tol = 1e-5 if dtype is None else 2 ** -8
    np.testing.assert_allclose(w.float().numpy(), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("kind", ["dangling", "loop", "fifo", "dev-zero", "not-json", "list", "deep"])
def test_a_config_json_that_cannot_be_read_is_an_error_naming_it(tmp_path, capsys, kind):
    base_dir, ad_dir, out = tmp_path / "base", tmp_path / "ad", tmp_path / "out"
    write_base(base_dir)
    write_peft(ad_dir)
    cfg = base_dir / "config.json"
    cfg.unlink()
    unblock: Callable[[], None] = lambda: None  # noqa: E731
    if kind == "dangling":
        os.symlink("gone.json", cfg)
    elif kind == "loop":
        os.symlink("config.json", cfg)
    elif kind == "fifo":
        os.mkfifo(cfg)
        unblock = fifo_unblocker(cfg)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", cfg)
    else:
        cfg.write_text({"not-json": '{"model_type": ', "list": "[1, 2]", "deep": "[" * 100_000}[kind])
    words = {"dangling": "does not exist", "loop": "symbolic link", "fifo": "FIFO", "dev-zero": "character device",
             "not-json": "not valid JSON", "list": "not a JSON object", "deep": "not valid JSON"}[kind]
    code, stdout, stderr = finishes(lambda: run_cli(capsys, "apply", base_dir, ad_dir, "-o", out, "--no-progress"),
                                    unblock)
    assert (code, stdout) == (1, "")
    assert stderr.startswith(f"lorafuse apply: error: FormatError: {cfg}") and words in stderr, stderr
    assert "Traceback" not in stderr and not out.exists()
    # extract reads the same file through the same reader (it sets the adapter's task_type from it)
    ft = tmp_path / "ft"
    ft.mkdir()
    shutil.copy(base_dir / "model.safetensors", ft / "model.safetensors")
    with pytest.raises(FormatError, match="config.json") as info:
        finishes(lambda: extract(base_dir, ft, RankRule(rank=2), progress=False), unblock)
    assert words in str(info.value)


def test_extract_reads_the_architecture_through_the_json_reader(tmp_path):
    base_dir, ft_dir = tmp_path / "base", tmp_path / "ft"
    base = write_base(base_dir, config={"architectures": ["TinyForCausalLM"]})
    ft = dict(base)
    ft["layer.q.weight"] = base["layer.q.weight"] + np.outer(np.arange(8), np.ones(8)).astype(np.float32)
    ft_dir.mkdir()
    save_file(ft, str(ft_dir / "model.safetensors"))
    res = extract(base_dir, ft_dir, RankRule(rank=1), progress=False)
    assert res.adapter.config["task_type"] == "CAUSAL_LM"
    (base_dir / "config.json").write_text(json.dumps({"architectures": "TinyForCausalLM"}))  # not a list
    res = extract(base_dir, ft_dir, RankRule(rank=1), progress=False)
    assert res.adapter.config["task_type"] is None


def test_a_side_file_that_grows_while_copied_is_refused_not_copied_without_end(tmp_path, capsys, monkeypatch):
    """/proc files say they hold 0 bytes and then give more: the copy stops at the size it saw. A link to one
    leads out of the base folder and is left out unread; a file inside it that fstat says is smaller than
    what it gives (as a /proc file does) is refused."""
    import lorafuse.io.sidefiles as sidefiles

    base_dir, ad_dir, out = tmp_path / "base", tmp_path / "ad", tmp_path / "out"
    write_base(base_dir)
    write_peft(ad_dir)
    os.symlink("/proc/self/status", base_dir / "status.txt")
    code, stdout, stderr = finishes(lambda: run_cli(capsys, "apply", base_dir, ad_dir, "-o", out, "--no-progress"),
                                    lambda: None)
    assert code == 0, stderr
    assert "note: status.txt is a symbolic link to /proc/" in stderr and not os.path.lexists(out / "status.txt")
    (base_dir / "status.txt").unlink()
    (base_dir / "status.txt").write_text("x" * 1000)
    _fstat_says(monkeypatch, sidefiles, 0)  # what a /proc file's fstat says
    code, stdout, stderr = finishes(lambda: run_cli(capsys, "apply", base_dir, ad_dir, "-o", out, "--no-progress",
                                                    "--overwrite"), lambda: None)
    assert (code, stdout) == (1, "")
    assert f"FormatError: {base_dir / 'status.txt'}: the file grew while it was copied" in stderr, stderr
    assert not os.path.lexists(out / "status.txt")


def _fstat_says(monkeypatch: pytest.MonkeyPatch, sidefiles: object, size: int) -> None:
    """io.sidefiles' os.fstat says `size` bytes for a 1000-byte file (and the truth for others)."""
    real_fstat = os.fstat

    class Said:
        def __init__(self, st: os.stat_result) -> None:
            self._st = st

        def __getattr__(self, name: str) -> object:
            return size if name == "st_size" else getattr(self._st, name)

    def fstat(fd: int) -> object:
        st = real_fstat(fd)
        return Said(st) if st.st_size == 1000 else st

    monkeypatch.setattr(sidefiles.os, "fstat", fstat)  # type: ignore[attr-defined]


def test_a_side_file_that_shrinks_while_copied_is_refused(tmp_path, monkeypatch):
    import lorafuse.io.sidefiles as sidefiles

    base_dir, ad_dir, out = tmp_path / "base", tmp_path / "ad", tmp_path / "out"
    write_base(base_dir)
    write_peft(ad_dir)
    (base_dir / "tokenizer.json").write_text("x" * 1000)
    _fstat_says(monkeypatch, sidefiles, 5000)  # what fstat said before the file was cut to 1000 bytes
    with pytest.raises(FormatError, match=r"tokenizer\.json: the file shrank while it was copied \(1000 of its 5000"):
        lorafuse.apply(base_dir, [ad_dir], out=out, progress=False)
    assert not out.exists()


# ----------------------------------------------------------------------------- §5 zero-size tensors


@pytest.mark.parametrize("options", [[], ["--dtype", "bf16"], ["--dtype", "fp16", "--max-shard-size", "64KiB"]],
                         ids=["copy", "dtype", "dtype-resharded"])
def test_zero_size_tensors_and_scalars_are_written(tmp_path, capsys, options):
    extra = {"empty_rows": np.zeros((0, 8), np.float32), "empty_cols": np.zeros((8, 0), np.float32),
             "empty": np.zeros((0,), np.float32), "scalar": np.array(3.5, np.float32),
             "ids": np.zeros((0, 3), np.int64)}
    base_dir, ad_dir, out = tmp_path / "base", tmp_path / "ad", tmp_path / "out"
    base = write_base(base_dir, extra)
    lora = write_peft(ad_dir)
    code, stdout, stderr = run_cli(capsys, "apply", base_dir, ad_dir, "-o", out, "--no-progress", *options)
    assert code == 0, stderr
    got: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_torch(str(f)))
    assert set(got) == set(base)
    float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options[1] if options else "", torch.float32)
    for name, value in extra.items():
        assert tuple(got[name].shape) == value.shape, name
        assert got[name].dtype == (torch.int64 if name == "ids" else float_dtype), name
    assert got["scalar"].item() == 3.5
    want = merged(base, lora, "layer.q")
    tol = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -8}[float_dtype]
    np.testing.assert_allclose(got["layer.q.weight"].float().numpy(), want, rtol=tol, atol=tol * np.abs(want).max())


def test_a_merged_zero_size_weight_and_an_empty_checkpoint(tmp_path):
    """An adapter on a (0, 8) weight merges nothing and says it merged it; a checkpoint with no tensors
    re-sharded still gets its model file."""
    base_dir, ad_dir = tmp_path / "base", tmp_path / "ad"
    base = write_base(base_dir, {"layer.z.weight": np.zeros((0, 8), np.float32)})
    ad_dir.mkdir()
    save_file({f"{PREFIX}layer.z.lora_A.weight": np.ones((RANK, 8), np.float32),
               f"{PREFIX}layer.z.lora_B.weight": np.ones((0, RANK), np.float32)},
              str(ad_dir / "adapter_model.safetensors"))
    (ad_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA}))
    report = lorafuse.apply(base_dir, [ad_dir], out=tmp_path / "out", dtype="bf16", progress=False)
    assert report.merged == ["layer.z.weight"]
    got = load_torch(str(tmp_path / "out" / "model.safetensors"))
    assert tuple(got["layer.z.weight"].shape) == (0, 8) and got["layer.z.weight"].dtype == torch.bfloat16
    np.testing.assert_array_equal(got["layer.k.weight"].float().numpy(),
                                  torch.from_numpy(base["layer.k.weight"]).bfloat16().float().numpy())

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    save_file({}, str(empty_dir / "model.safetensors"))
    report = lorafuse.apply(empty_dir, [ad_dir], out=tmp_path / "out2", max_shard_size="1GB", skip_missing=True,
                            progress=False)
    assert report.tensors == 0 and any("layer.z" in n for n in report.notes)
    assert load_file(str(tmp_path / "out2" / "model.safetensors")) == {}


# ----------------------------------------------------------------------------- §5 pipelines


def _pipeline(root: Path, index_extra: dict[str, object] | None = None) -> tuple[Path, np.ndarray]:
    """A diffusers pipeline folder with one text encoder weight and a scheduler; (folder, the weight)."""
    pipe = root / "pipe"
    (pipe / "text_encoder").mkdir(parents=True)
    w = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": w},
              str(pipe / "text_encoder" / "model.safetensors"))
    (pipe / "text_encoder" / "config.json").write_text("{}")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"beta_start": 0.00085}')
    index: dict[str, object] = {"_class_name": "StableDiffusionPipeline",
                                "text_encoder": ["transformers", "CLIPTextModel"],
                                "scheduler": ["diffusers", "PNDMScheduler"]}
    index.update(index_extra or {})
    (pipe / "model_index.json").write_text(json.dumps(index))
    return pipe, w


def _kohya_te_lora(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(4)
    down, up = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
               f"{name}.alpha": np.array(3.0, np.float32)}, str(path))
    return down, up, 3.0 / 2


def test_pipeline_files_are_copied_through_links_and_special_files_left_out(tmp_path):
    repo = tmp_path / "models--org--pipe"  # a Hugging Face cache: snapshot files link to the repository's blobs
    pipe, w = _pipeline(repo / "snapshots")
    lora = tmp_path / "lora.safetensors"
    down, up, scale = _kohya_te_lora(lora)
    blob = repo / "blobs" / "0123abcd"
    blob.parent.mkdir()
    blob.write_text('{"vocab": {"a": 0}}')
    (pipe / "tokenizer").mkdir()
    os.symlink(os.path.relpath(blob, pipe / "tokenizer"), pipe / "tokenizer" / "vocab.json")
    os.mkfifo(pipe / "scheduler" / "fifo")
    os.symlink("/dev/zero", pipe / "zeros")
    os.symlink("..", pipe / "scheduler" / "parent")  # a loop
    os.symlink(repo / "blobs", pipe / "outside")  # a folder outside the pipeline
    os.symlink("missing", pipe / "tokenizer" / "merges.txt")
    report = finishes(lambda: lorafuse.apply(pipe, [lora], out=tmp_path / "out", progress=False),
                      fifo_unblocker(pipe / "scheduler" / "fifo"))
    out = tmp_path / "out"
    got = load_file(str(out / "text_encoder" / "model.safetensors"))[
        "text_model.encoder.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_allclose(got, w.astype(np.float64) + scale * up.astype(np.float64) @ down, rtol=1e-5, atol=1e-5)
    vocab = out / "tokenizer" / "vocab.json"
    assert not vocab.is_symlink() and vocab.read_bytes() == blob.read_bytes()
    sched = Path("scheduler") / "scheduler_config.json"
    assert (out / sched).read_bytes() == (pipe / sched).read_bytes()
    expected = {"scheduler/fifo is a FIFO", "zeros is a character device", "scheduler/parent/ is a symbolic link",
                "outside/ is a symbolic link to the folder", "tokenizer/merges.txt is a symbolic link to missing"}
    for words in expected:
        assert any(n.startswith(words) and n.endswith("not copied") for n in report.notes), (words, report.notes)
    for rel in ("scheduler/fifo", "zeros", "scheduler/parent", "outside", "tokenizer/merges.txt"):
        assert not os.path.lexists(out / rel), rel


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/etc", "..\\x", "unet\x1b[2J", "te\u202ext", "link-out"])
def test_pipeline_component_names_must_be_plain_folder_names(tmp_path, capsys, name):
    parent_weights = tmp_path / "model.safetensors"  # what '..' would read
    save_file({"x.weight": np.ones((2, 2), np.float32)}, str(parent_weights))
    if name == "link-out":
        (tmp_path / "elsewhere").mkdir()
        save_file({"y.weight": np.ones((2, 2), np.float32)}, str(tmp_path / "elsewhere" / "model.safetensors"))
    pipe, _ = _pipeline(tmp_path, {name: ["diffusers", "UNet2DConditionModel"]})
    if name == "link-out":
        os.symlink(tmp_path / "elsewhere", pipe / name)
    with pytest.raises(FormatError) as info:
        Pipeline(pipe)
    message = str(info.value)
    assert message.startswith(f"{pipe / 'model_index.json'}: component {name!r}"), message
    assert ("outside the pipeline folder" if name == "link-out" else "not the plain name of a folder") in message
    lora = tmp_path / "lora.safetensors"
    _kohya_te_lora(lora)
    code, stdout, stderr = run_cli(capsys, "apply", pipe, lora, "-o", tmp_path / "out", "--no-progress")
    assert (code, stdout) == (1, "") and "model_index.json: component" in stderr
    assert "\x1b" not in stderr and "\u202e" not in stderr
    assert not (tmp_path / "out").exists()
    code, stdout, stderr = run_cli(capsys, "info", pipe)
    assert code == 1 and "model_index.json: component" in stderr


# ----------------------------------------------------------------------------- §5 escaping


def test_printable_escapes_controls_and_keeps_our_line_breaks():
    assert printable("plain text, ünïcode and 漢字") == "plain text, ünïcode and 漢字"
    assert printable("a\x1b[31mred\x07\rback\u202eevil\x00\x9b\udcff") == \
        "a\\x1b[31mred\\x07\\x0dback\\u202eevil\\x00\\x9b\\udcff"
    assert printable("line 1\n  line\x1b 2\n") == "line 1\n  line\\x1b 2\n"
    assert printable("one\ntwo", keep_newlines=False) == "one\\x0atwo"
    assert printable("tab\there\U000e0041") == "tab\\x09here\\U000e0041"


def test_names_from_files_reach_the_terminal_escaped(tmp_path, capsys):
    base_dir, ad_dir, out = tmp_path / "base", tmp_path / "ad", tmp_path / "out"
    write_base(base_dir)
    write_peft(ad_dir)
    evil = "evil\x1b]0;owned\x07\x1b[2J\r\u202e.json"
    os.symlink("nowhere", base_dir / evil)
    code, stdout, stderr = run_cli(capsys, "apply", base_dir, ad_dir, "-o", out, "--no-progress")
    assert code == 0, stderr
    assert "note: evil\\x1b]0;owned\\x07\\x1b[2J\\x0d\\u202e.json is a symbolic link to nowhere" in stderr, stderr
    for raw in ("\x1b", "\x07", "\r", "\u202e"):
        assert raw not in stderr + stdout
    # errors too, and a multi-line error keeps its lines
    bad = tmp_path / "gone\x1b[31m"
    code, stdout, stderr = run_cli(capsys, "info", bad)
    assert code == 1 and "gone\\x1b[31m" in stderr and "\x1b" not in stderr
    lora = write_peft(tmp_path / "ad2", modules=("layer.nope", "layer.none"))
    assert lora
    code, stdout, stderr = run_cli(capsys, "apply", base_dir, tmp_path / "ad2", "-o", tmp_path / "o2", "--no-progress")
    assert code == 1
    lines = stderr.splitlines()
    assert len(lines) == 4 and "2 adapter modules found no target" in lines[0], stderr
    listed = sorted(line.strip().rsplit(": ", 1)[1] for line in lines[1:3])
    assert listed == ["module 'layer.none'", "module 'layer.nope'"]
    assert lines[3].startswith("(pass --skip-missing")


def test_a_progress_bar_shows_tensor_names_escaped():
    import io

    from lorafuse._progress import Progress

    stream = io.StringIO()
    bar = Progress(10, "apply", True, stream)
    bar.update(10, "w\x1b[2J\nx")
    assert "w\\x1b[2J\\x0ax" in stream.getvalue() and "\x1b" not in stream.getvalue()


# ----------------------------------------------------------------------------- §5 suffix case


def test_safetensors_suffixes_in_any_case(tmp_path, capsys):
    lora = tmp_path / "STYLE.SAFETENSORS"
    down, up, scale = _kohya_te_lora(lora)
    assert detect_format(lora) == "kohya"
    assert detect_format(tmp_path / "STYLE.SAFETENSORS") == "kohya"
    base_dir = tmp_path / "base"
    base = write_base(base_dir, name="Model.Safetensors")
    assert Checkpoint(base_dir).shards == ["Model.Safetensors"]
    ad_dir = tmp_path / "ad"
    lora_t = write_peft(ad_dir)
    report = lorafuse.apply(base_dir, [ad_dir], out=tmp_path / "out", progress=False)
    assert report.merged == ["layer.q.weight"]
    got = load_file(str(tmp_path / "out" / "Model.Safetensors"))  # the input's name is kept
    np.testing.assert_allclose(got["layer.q.weight"], merged(base, lora_t, "layer.q"), rtol=1e-5, atol=1e-5)
    pickled = tmp_path / "base2"
    pickled.mkdir()
    (pickled / "PYTORCH_MODEL.BIN").write_bytes(b"\x80\x04")
    with pytest.raises(FormatError, match="pickle checkpoints are not read"):
        Checkpoint(pickled)
    with pytest.raises(FormatError, match="pickle checkpoints are not read"):
        lorafuse.load(pickled / "PYTORCH_MODEL.BIN")
    code, stdout, stderr = run_cli(capsys, "convert", lora, "--to", "peft", "-o", tmp_path / "OUT.SAFETENSORS")
    assert code == 0, stderr
    assert (tmp_path / "OUT.SAFETENSORS").is_file()
    assert detect_format(tmp_path / "OUT.SAFETENSORS") == "diffusers"


def test_a_second_weight_file_in_another_case_is_noted_not_copied(tmp_path):
    base_dir, ad_dir = tmp_path / "base", tmp_path / "ad"
    write_base(base_dir)
    write_peft(ad_dir)
    save_file({"x": np.ones(2, np.float32)}, str(base_dir / "extra.SAFETENSORS"))
    (base_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model.safetensors" for k in ("layer.q.weight", "layer.q.bias", "layer.k.weight")}}))
    (base_dir / "OLD.SAFETENSORS.INDEX.JSON").write_text("{}")
    (base_dir / "optimizer.PT").write_bytes(b"\x80")
    report = lorafuse.apply(base_dir, [ad_dir], out=tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    for name in ("extra.SAFETENSORS", "OLD.SAFETENSORS.INDEX.JSON", "optimizer.PT"):
        assert f"{name} holds other weights and was not copied" in report.notes
        assert not (tmp_path / "out" / name).exists()


# ----------------------------------------------------------------------------- §6 parse_size, shard sizes


@pytest.mark.parametrize("text, size", [
    ("100", 100), (12345, 12345), ("5GB", 5 * 10**9), ("1.5GB", 1_500_000_000), ("2GiB", 2 * 2**30),
    ("500MB", 500 * 10**6), ("10KB", 10_000), ("10kb", 10_000), (" 5 gb ", 5 * 10**9), ("2gib", 2 * 2**30),
    ("1.1GB", 1_100_000_000), ("4.35MB", 4_350_000), ("0.5KiB", 512), ("7B", 7), ("3TB", 3 * 10**12),
    ("1.0000001KB", 1000),  # a fraction of a byte rounds down
])
def test_parse_size_accepts(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, words", [
    ("10IB", "is not a size"), ("3I", "is not a size"), ("1.5", "fraction of a byte"), ("1.5B", "fraction of a byte"),
    ("0GB", "is 0 bytes"), ("0", "is 0 bytes"), ("lots", "is not a size"), ("", "is not a size"),
    ("1e9", "is not a size"), ("-5GB", "is not a size"), ("5 G B", "is not a size"), ("٣GB", "is not a size"),
    (0, "not a positive number"), (-1, "not a positive number"), (True, "is not a size"), (1.5e9, "is not a size"),
])
def test_parse_size_refuses(text, words):
    with pytest.raises(LorafuseValueError) as info:
        parse_size(text)
    assert words in str(info.value)
    assert repr(text) in str(info.value) or str(text) in str(info.value)
    assert "5GB" in str(info.value) and "2GiB" in str(info.value)  # examples


@pytest.mark.parametrize("size", ["1", "1KB", "64000", "10KiB"])
def test_absurd_shard_sizes_are_refused(tmp_path, capsys, size):
    base_dir, ad_dir, out = tmp_path / "base", tmp_path / "ad", tmp_path / "out"
    write_base(base_dir)
    write_peft(ad_dir)
    code, stdout, stderr = run_cli(capsys, "apply", base_dir, ad_dir, "-o", out, "--max-shard-size", size)
    assert (code, stdout) == (2, "")
    assert f"shard size '{size}'" in stderr and "64 KiB minimum" in stderr, stderr
    assert not out.exists()


def test_metadata_is_not_copied_into_shards_smaller_than_100_times_it(tmp_path):
    rng = np.random.default_rng(0)
    big = {f"layer.{i}.weight": rng.standard_normal((128, 128)).astype(np.float32) for i in range(8)}  # 64 KiB each
    base_dir, ad_dir = tmp_path / "base", tmp_path / "ad"
    meta = {"format": "pt", "notes": "x" * 2000}
    base = write_base(base_dir, big, metadata=meta)
    write_peft(ad_dir)
    with pytest.raises(LorafuseValueError, match=r"model.safetensors: its metadata \(20\d\d bytes\) is copied into"):
        lorafuse.apply(base_dir, [ad_dir], out=tmp_path / "out", max_shard_size="100KB", progress=False)
    assert not (tmp_path / "out").exists()
    report = lorafuse.apply(base_dir, [ad_dir], out=tmp_path / "out", max_shard_size="300KB", progress=False)
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) == 2 and report.tensors == len(base)
    got: dict[str, np.ndarray] = {}
    for f in shards:
        assert f.stat().st_size <= 300_000 + 4096
        with safe_open(str(f), "np") as h:  # the input's metadata, and the run's record (issue #16)
            assert {k: v for k, v in h.metadata().items() if not k.startswith("lorafuse.")} == meta
        got.update(load_file(str(f)))
    for k in big:
        np.testing.assert_array_equal(got[k], base[k])


# ----------------------------------------------------------------------------- §6 bias path


@pytest.mark.parametrize("order", ["replace-first", "lora-first"])
def test_a_replaced_bias_and_a_lora_bias_both_count(tmp_path, order):
    """Adapter A replaces layer.q (weight and bias: modules_to_save); adapter B has a LoRA with a lora_B bias
    on it. As for the weight, the replacement takes the base's place and B's delta adds to it."""
    base_dir = tmp_path / "base"
    base = write_base(base_dir)
    rng = np.random.default_rng(11)
    repl = {"layer.q.weight": rng.standard_normal((8, 8)).astype(np.float32),
            "layer.q.bias": rng.standard_normal(8).astype(np.float32)}
    a_lora = write_peft(tmp_path / "a", modules=("layer.k",), seed=5, full=repl)
    b_lora = write_peft(tmp_path / "b", modules=("layer.q",), seed=6, bias=True)
    adapters = [tmp_path / "a", tmp_path / "b"] if order == "replace-first" else [tmp_path / "b", tmp_path / "a"]
    weights = [1.0, 0.5] if order == "replace-first" else [0.5, 1.0]  # B at 0.5
    report = lorafuse.apply(base_dir, adapters, weights, out=tmp_path / "out", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    coef = 0.5 * SCALE
    want_w = repl["layer.q.weight"].astype(np.float64) + coef * (
        b_lora[f"{PREFIX}layer.q.lora_B.weight"].astype(np.float64) @ b_lora[f"{PREFIX}layer.q.lora_A.weight"])
    want_b = repl["layer.q.bias"].astype(np.float64) + coef * b_lora[f"{PREFIX}layer.q.lora_B.bias"]
    np.testing.assert_allclose(got["layer.q.weight"], want_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["layer.q.bias"], want_b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["layer.k.weight"], merged(base, a_lora, "layer.k"), rtol=1e-5, atol=1e-5)
    assert "layer.q.bias" in report.replaced and "layer.q.bias" in report.biases
    assert "layer.q.weight" in report.replaced and "layer.q.weight" in report.merged


# ----------------------------------------------------------------------------- §6 state_dict, with_factors


@pytest.mark.parametrize("f8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_state_dict_torch_gives_float8_tensors_equal_to_the_numpy_widening(tmp_path, f8):
    folder = tmp_path / "ad"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {f"{PREFIX}layer.q.lora_A.weight": (torch.randn((RANK, 8), generator=g) * 0.5).to(f8),
               f"{PREFIX}layer.q.lora_B.weight": (torch.randn((8, RANK), generator=g) * 0.5).to(f8)}
    save_torch(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA}))
    adapter = lorafuse.load(folder)
    sd_torch = adapter.state_dict("torch")
    sd_np = adapter.state_dict("numpy")
    for k, t in tensors.items():
        assert sd_torch[k].dtype == f8, k
        assert torch.equal(sd_torch[k].view(torch.uint8), t.view(torch.uint8)), k  # the stored bytes
        np.testing.assert_array_equal(sd_torch[k].float().numpy(), t.float().numpy())  # torch's own widening
        np.testing.assert_array_equal(sd_np[k], t.float().numpy())  # the numpy path agrees
    again = Adapter.from_state_dict(sd_torch, {"r": RANK, "lora_alpha": ALPHA})
    np.testing.assert_array_equal(again.updates["layer.q"].delta(), adapter.updates["layer.q"].delta())


def test_with_factors_keeps_magnitude_and_bias(tmp_path):
    rng = np.random.default_rng(2)
    sd = {f"{PREFIX}layer.q.lora_A.weight": rng.standard_normal((RANK, 8)).astype(np.float32),
          f"{PREFIX}layer.q.lora_B.weight": rng.standard_normal((8, RANK)).astype(np.float32),
          f"{PREFIX}layer.q.lora_B.bias": rng.standard_normal(8).astype(np.float32),
          f"{PREFIX}layer.q.lora_magnitude_vector": rng.random(8).astype(np.float32) + 0.5}
    adapter = Adapter.from_state_dict(sd, {"r": RANK, "lora_alpha": ALPHA, "use_dora": True, "lora_bias": True})
    u = adapter.updates["layer.q"]
    b, a = u.stored_factors()
    same = u.with_factors(b, a, scale=u.scale)
    assert same.magnitude is u.magnitude and same.bias is u.bias and same.magnitude_on_columns == u.magnitude_on_columns
    np.testing.assert_allclose(same.delta(), u.delta(), rtol=1e-12)
    # a new scale: the bias is rescaled so that scale * bias (what a merge adds) is unchanged
    other = u.with_factors(b * 4, a, scale=u.scale / 4)
    np.testing.assert_allclose(other.delta(), u.delta(), rtol=1e-6)
    np.testing.assert_allclose(other.scale * other.bias.f32().astype(np.float64),
                               u.scale * sd[f"{PREFIX}layer.q.lora_B.bias"].astype(np.float64), rtol=1e-6)
    np.testing.assert_array_equal(other.magnitude.f32(), sd[f"{PREFIX}layer.q.lora_magnitude_vector"])
    with pytest.raises(LorafuseValueError, match=r"'layer.q': its lora_B bias .* scale 0"):
        u.with_factors(b, a, scale=0.0)


def test_resize_keeps_a_lora_bias(tmp_path):
    rng = np.random.default_rng(8)
    sd = {f"{PREFIX}layer.q.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
          f"{PREFIX}layer.q.lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32),
          f"{PREFIX}layer.q.lora_B.bias": rng.standard_normal(8).astype(np.float32)}
    adapter = Adapter.from_state_dict(sd, {"r": 4, "lora_alpha": 8, "lora_bias": True})
    small, _ = resize(adapter, RankRule(rank=2), progress=False)
    u = small.updates["layer.q"]
    assert u.rank == 2
    np.testing.assert_allclose(u.scale * u.bias.f32(), 2.0 * sd[f"{PREFIX}layer.q.lora_B.bias"], rtol=1e-6)
    dense = 2.0 * sd[f"{PREFIX}layer.q.lora_B.weight"].astype(np.float64) @ sd[f"{PREFIX}layer.q.lora_A.weight"]
    s = np.linalg.svd(dense, compute_uv=False)
    assert np.linalg.norm(u.delta() - dense) == pytest.approx(np.sqrt((s[2:] ** 2).sum()), rel=1e-4)

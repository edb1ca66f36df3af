"""Red-team round 4, many adapters: combine --from-list, the streamed engines (stream, ray), fixed.

1. The streamed engines refuse adapters of different models (or one model in two namings) as the in-memory
   engine does (arithmetic.check_shared), in the header pass, naming both list lines.
2. A PEFT adapter listed by its weights file is recorded (its files' sha256) and checked between passes as the
   loader reads it: its folder, adapter_config.json included.
3. An adapter file replaced after the last pass, before its background hash read it, is refused before the
   commit (the record would give the sha256 of bytes no pass read).
4. `#` after a space in a listed path: a line that names a path whole (`run #2`) is that path; one that also
   reads as another existing path with a comment is refused as ambiguous.
5. Lines end at \\n, \\r\\n and \\r only: \\f, \\v, \\x1c-\\x1e, U+0085, U+2028 and U+2029 are part of a line.
6. (Ray's unreachable address: fixed by the lead, not here.)
7. A CLI command stopped (Ctrl-C, SIGTERM) after it started a Ray leaves with os._exit: Ray's threads could crash
   the interpreter's exit (SIGSEGV).
8. List weights are decimal numbers: `1_5` is refused (Python's float() reads 15), and so is `1e-400`, which
   would silently be 0.
9. A weight times a scale beyond float32 stops the header pass naming the line (both engines); the streamed
   linear takes such a weight as the in-memory linear does; a line `/` is said to be no adapter, not an output
   error; a megabyte line is not echoed whole.
10. The streamed summary's error estimate is that of the factors as written (rounded to the output dtype).

Independent references: deltas in numpy float64 from the factors written here (and read back with the
`safetensors` package), sha256 by hashlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import peft_folder
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch

import lorafuse
from lorafuse import cli
from lorafuse.errors import FormatError, InputChangedError, LorafuseValueError
from lorafuse.io import provenance
from lorafuse.ops.combine import CombineOptions, combine_to, many, ray_engine
from lorafuse.ops.combine.many import read_list

PREFIX = "base_model.model."
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
GPT2 = "transformer.h.0.attn.c_attn"
UNET_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


# ----------------------------------------------------------------------------- references


def peft_deltas(folder: Path) -> dict[str, np.ndarray]:
    """(lora_alpha / r) B @ A per module of a PEFT folder (float32 or BF16 factors), in float64, from its files."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    from safetensors.torch import load_file as load_torch

    t = {k: v.double().numpy() for k, v in load_torch(str(folder / "adapter_model.safetensors")).items()}
    out = {}
    for key in t:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = t[key.replace("lora_A", "lora_B")]
            out[module] = cfg["lora_alpha"] / cfg["r"] * (b @ t[key])
    return out


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def written_delta(out: Path, module: str) -> np.ndarray:
    (d,) = [v for k, v in peft_deltas(out).items() if k == module]
    return d


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(args)
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- 1. different models


@pytest.mark.parametrize("options", [["--passes", "2"], ["--engine", "stream"], ["--passes", "1"]])
def test_streamed_engines_refuse_adapters_of_different_models(tmp_path: Path, options: list[str],
                                                              capsys: pytest.CaptureFixture[str]):
    peft_folder(tmp_path / "llama", {Q: (12, 10)}, 1)
    peft_folder(tmp_path / "gpt2", {GPT2: (18, 6)}, 2)
    listing = write_list(tmp_path / "models.txt", ["# two models", "llama", "gpt2"])
    rc, err = run_cli(["combine", "--from-list", str(listing), "-o", str(tmp_path / "out"), *options], capsys)
    assert rc == 1 and "UnsharedModulesError" in err, err  # an input error (2 before round 5)
    assert f"{listing} line 2 ({tmp_path / 'llama'}) and {listing} line 3 ({tmp_path / 'gpt2'}) share no module" \
        in err, err
    assert "adapters for different models" in err
    assert not (tmp_path / "out").exists()
    rc, err = run_cli(["combine", "--from-list", str(listing), "-o", str(tmp_path / "out")], capsys)  # in memory
    assert rc == 1 and "share no module" in err, err


@pytest.mark.parametrize("engine", ["stream", "ray"])
def test_python_streamed_engines_refuse_different_models_before_any_pass(tmp_path: Path, engine: str,
                                                                          monkeypatch: pytest.MonkeyPatch):
    a = peft_folder(tmp_path / "llama", {Q: (12, 10)}, 1)
    b = peft_folder(tmp_path / "gpt2", {GPT2: (18, 6)}, 2)
    monkeypatch.setattr(many, "fold_sources", lambda *_, **__: pytest.fail("a pass started"))
    monkeypatch.setattr(ray_engine, "run_ray", lambda *_, **__: pytest.fail("Ray was started"))
    with pytest.raises(LorafuseValueError, match=r"adapter 1 \(.*llama\) and adapter 2 \(.*gpt2\) share no module"):
        lorafuse.combine([a, b], engine=engine)


def _kohya(path: Path, seed: int) -> Path:
    g = np.random.default_rng(seed)
    key = "lora_unet_" + UNET_Q.replace(".", "_")
    save_file({f"{key}.lora_down.weight": g.standard_normal((2, 8)).astype(np.float32),
               f"{key}.lora_up.weight": g.standard_normal((8, 2)).astype(np.float32),
               f"{key}.alpha": np.array(2.0, dtype=np.float32)}, str(path))
    return path


def _diffusers(path: Path, seed: int) -> Path:
    g = np.random.default_rng(seed)
    save_file({f"unet.{UNET_Q}.lora_A.weight": g.standard_normal((2, 8)).astype(np.float32),
               f"unet.{UNET_Q}.lora_B.weight": g.standard_normal((8, 2)).astype(np.float32)}, str(path))
    return path


def test_one_model_in_two_namings_is_refused_naming_the_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    _kohya(tmp_path / "k.safetensors", 1)
    _diffusers(tmp_path / "d.safetensors", 2)
    listing = write_list(tmp_path / "l.txt", ["k.safetensors", "d.safetensors"])
    rc, err = run_cli(["combine", "--from-list", str(listing), "-o", str(tmp_path / "out.safetensors"),
                       "--passes", "2"], capsys)
    assert rc == 1, err  # an input error (2 before round 5)
    assert f"{listing} line 1" in err and f"{listing} line 2" in err and "two namings" in err, err
    assert "not a kohya module name" not in err


def test_disjoint_modules_of_one_model_still_stream(tmp_path: Path):
    """A q_proj adapter and a v_proj adapter of one model share a root: combined, against numpy float64."""
    a = peft_folder(tmp_path / "q", {Q: (12, 10)}, 1)
    b = peft_folder(tmp_path / "v", {V: (12, 10)}, 2)
    out = combine_to([a, b], [0.5, 2.0], CombineOptions(passes=2, rank=2), tmp_path / "out")
    assert out.engine == "stream"
    assert rel(written_delta(tmp_path / "out", Q), 0.5 * peft_deltas(a)[Q]) < 1e-5
    assert rel(written_delta(tmp_path / "out", V), 2.0 * peft_deltas(b)[V]) < 1e-5


# ----------------------------------------------------------------------------- 2. a weights file's folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_peft_adapter_listed_by_its_weights_file_records_its_config(tmp_path: Path):
    a = peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    b = peft_folder(tmp_path / "b", {Q: (12, 10)}, 2)
    listing = write_list(tmp_path / "l.txt", ["a/adapter_model.safetensors", "b/adapter_model.safetensors"])
    sources, weights = read_list(listing)
    combine_to(sources, weights, CombineOptions(passes=2, rank=4), tmp_path / "o1")
    record = lorafuse.load(tmp_path / "o1").provenance
    assert record is not None
    for folder, got in zip((a, b), record.inputs):
        assert dict(got.files) == {"adapter_config.json": _sha256(folder / "adapter_config.json"),
                                   "adapter_model.safetensors": _sha256(folder / "adapter_model.safetensors")}
    # the same list in memory records the same inputs
    combine_to(sources, weights, CombineOptions(engine="memory"), tmp_path / "o2")
    assert [dict(i.files) for i in lorafuse.load(tmp_path / "o2").provenance.inputs] == \
        [dict(i.files) for i in record.inputs]
    # and the result is the weighted sum of the deltas that config states (alpha 2, r 2)
    ref = 0.5 * peft_deltas(a)[Q] + 0.5 * peft_deltas(b)[Q]
    assert rel(written_delta(tmp_path / "o1", Q), ref) < 1e-5


@pytest.mark.parametrize("at_pass", [2, 3])
def test_a_config_changed_between_passes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_pass: int):
    peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    peft_folder(tmp_path / "b", {Q: (12, 10)}, 2)
    listing = write_list(tmp_path / "l.txt", ["a/adapter_model.safetensors", "b/adapter_model.safetensors"])
    start = many.Sketching.start

    def edited(self: many.Sketching, pass_no: int):  # the config's alpha changes before pass `at_pass`
        if pass_no == at_pass:
            cfg = tmp_path / "b" / "adapter_config.json"
            cfg.write_text(cfg.read_text().replace('"lora_alpha": 2', '"lora_alpha": 16'))
        return start(self, pass_no)

    monkeypatch.setattr(many.Sketching, "start", edited)
    sources, weights = read_list(listing)
    with pytest.raises(InputChangedError, match=rf"{listing} line 2: changed since combine started \(pass {at_pass}\)"):
        combine_to(sources, weights, CombineOptions(passes=3, rank=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 3. a hash racing a swap


def test_a_file_replaced_before_its_hash_is_refused_before_the_commit(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    paths = [peft_folder(tmp_path / f"a{j}", {Q: (12, 10)}, j) for j in range(3)]
    new = peft_folder(tmp_path / "new", {Q: (12, 10)}, 99)
    passes_done = threading.Event()
    real_hash = provenance.cached_sha256

    def slow_hash(p: Path, stop: threading.Event | None = None) -> str:  # a hash thread behind the passes
        passes_done.wait(20)
        return real_hash(p, stop)

    finish = many.Sketching.finish

    def swap_then_finish(self: many.Sketching, on_module):  # after the last pass: a trainer's atomic rename
        shutil.copy(new / "adapter_model.safetensors", tmp_path / "tmp")
        (tmp_path / "tmp").replace(paths[1] / "adapter_model.safetensors")
        passes_done.set()
        return finish(self, on_module)

    monkeypatch.setattr(provenance, "cached_sha256", slow_hash)
    monkeypatch.setattr(many.Sketching, "finish", swap_then_finish)
    with pytest.raises(InputChangedError, match=r"adapter 2 \(.*a1\): changed while combine ran"):
        combine_to(paths, None, CombineOptions(rank=2, passes=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    passes_done.set()


def test_the_in_memory_result_of_the_streamed_engine_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    paths = [peft_folder(tmp_path / f"a{j}", {Q: (12, 10)}, j) for j in range(2)]
    finish = many.Sketching.finish

    def touched_then_finish(self: many.Sketching, on_module):
        (paths[0] / "adapter_config.json").write_text((paths[0] / "adapter_config.json").read_text() + " ")
        return finish(self, on_module)

    monkeypatch.setattr(many.Sketching, "finish", touched_then_finish)
    with pytest.raises(InputChangedError, match=r"adapter 1 \(.*a0\): changed while combine ran"):
        lorafuse.combine(paths, passes=2, rank=2)


# ----------------------------------------------------------------------------- 4. `#` inside a path


def test_a_hash_after_a_space_in_a_listed_path(tmp_path: Path):
    peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    peft_folder(tmp_path / "c #2", {Q: (12, 10)}, 2)
    listing = write_list(tmp_path / "l.txt", ["a # the first", "c #2", "c #2 0.25  # a weight and a comment"])
    sources, weights = read_list(listing)
    assert [s.path for s in sources] == [tmp_path / "a", tmp_path / "c #2", tmp_path / "c #2"]
    assert weights == [1 / 3, 1 / 3, 0.25]
    peft_folder(tmp_path / "c", {Q: (12, 10)}, 3)  # now `c #2` also reads as `c` and a comment
    with pytest.raises(LorafuseValueError, match=rf"{listing} line 2: 'c #2' reads two ways: the adapter 'c #2' "
                                                 r"\(`#` part of its name\), or 'c' followed by a comment"):
        read_list(listing)
    write_list(listing, ["a", "c # the third"])  # a comment, since no path `c # the third` exists
    sources, _ = read_list(listing)
    assert [s.path for s in sources] == [tmp_path / "a", tmp_path / "c"]


def test_a_hash_path_combines_the_adapter_it_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    a = peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    c2 = peft_folder(tmp_path / "c #2", {Q: (12, 10)}, 2)
    listing = write_list(tmp_path / "l.txt", ["a", "c #2"])
    rc, err = run_cli(["combine", "--from-list", str(listing), "-o", str(tmp_path / "out"), "-q", "--rank", "4"],
                      capsys)
    assert rc == 0, err
    ref = 0.5 * peft_deltas(a)[Q] + 0.5 * peft_deltas(c2)[Q]
    assert rel(written_delta(tmp_path / "out", Q), ref) < 1e-5


# ----------------------------------------------------------------------------- 5. line numbers


@pytest.mark.parametrize("sep", ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"])
def test_only_newlines_end_a_list_line(tmp_path: Path, sep: str):
    peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    peft_folder(tmp_path / f"c{sep}d", {Q: (12, 10)}, 2)
    listing = tmp_path / "l.txt"
    listing.write_text(f"a\n{sep}\nmissing\n", encoding="utf-8")  # `missing` is line 3 for wc, sed, editors
    with pytest.raises(FormatError, match=rf"{listing} line 3: no such file or folder"):
        read_list(listing)
    listing.write_text(f"a\r\nc{sep}d\rb\n".replace("b\n", ""), encoding="utf-8")  # CRLF and a lone CR still end
    sources, weights = read_list(listing)
    assert [s.path for s in sources] == [tmp_path / "a", tmp_path / f"c{sep}d"]
    assert [s.where for s in sources] == [f"{listing} line 1", f"{listing} line 2"]


def test_a_nul_byte_is_said_at_its_line_with_lone_carriage_returns(tmp_path: Path):
    listing = tmp_path / "l.txt"
    listing.write_bytes(b"a\rb\rc\0\n")
    with pytest.raises(FormatError, match=rf"{listing} line 3: holds a NUL byte"):
        read_list(listing)


# ----------------------------------------------------------------------------- 7. Ctrl-C after a Ray start


@pytest.mark.parametrize(("stop", "status"), [(KeyboardInterrupt, 130), (cli._Terminated, 143)])
def test_a_command_stopped_after_starting_ray_leaves_at_once(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str], stop, status):
    left: list[int] = []

    class Left(BaseException):
        pass

    def exit_now(code: int) -> None:
        left.append(code)
        raise Left

    def command(args):  # a combine --engine ray: Ray is started, then Ctrl-C
        monkeypatch.setattr(ray_engine, "_STARTS", ray_engine.ray_starts() + 1)
        raise stop()

    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setattr(cli, "_commands", lambda: {"combine": command})
    with pytest.raises(Left):
        cli.main(["combine", "a", "-o", "out"])
    assert left == [status]
    assert "no output was written" in capsys.readouterr().err

    def no_ray(args):
        raise stop()

    monkeypatch.setattr(cli, "_commands", lambda: {"combine": no_ray})  # no Ray started by this command
    assert cli.main(["combine", "a", "-o", "out"]) == status
    assert left == [status]


# ----------------------------------------------------------------------------- 8. weights


@pytest.mark.parametrize(("weight", "message"), [
    ("1_5", "bad weight '1_5'"), ("1__5", "bad weight"), ("\u0661", "bad weight"), ("0x10", "bad weight"),
    ("1e-400", "weight '1e-400' is too small for a float64: it would be 0"), ("-0.0000e-999", None),
    ("nan", "is not finite"), ("-inf", "is not finite"), ("1e400", "is not finite")])
def test_list_weights_are_decimal_numbers(tmp_path: Path, weight: str, message: str | None):
    peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    peft_folder(tmp_path / "b", {Q: (12, 10)}, 2)
    listing = write_list(tmp_path / "l.txt", [f"a {weight}", "b"])
    if message is None:  # a zero written as one is a zero
        assert read_list(listing)[1] == [0.0, 0.5]
        return
    with pytest.raises(LorafuseValueError, match=rf"{listing} line 1: .*{message}"):
        read_list(listing)


@pytest.mark.parametrize(("weight", "value"), [("1.5", 1.5), ("+2e-3", 2e-3), (".5", 0.5), ("5.", 5.0),
                                               ("-1E2", -100.0), ("1e-320", 1e-320)])
def test_plain_decimal_weights_are_read(tmp_path: Path, weight: str, value: float):
    peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    listing = write_list(tmp_path / "l.txt", [f"a {weight}"])
    assert read_list(listing)[1] == [value]


# ----------------------------------------------------------------------------- 9. list errors


@pytest.mark.parametrize("options", [[], ["--passes", "2"], ["--engine", "stream"]])
def test_a_weight_beyond_float32_names_its_line_before_any_work(tmp_path: Path, options: list[str],
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]):
    peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    peft_folder(tmp_path / "b", {Q: (12, 10)}, 2)
    listing = write_list(tmp_path / "l.txt", ["# header", "", "a", "b 1e39"])
    monkeypatch.setattr(many, "fold_sources", lambda *_, **__: pytest.fail("a pass started"))
    rc, err = run_cli(["combine", "--from-list", str(listing), "-o", str(tmp_path / "out"), *options], capsys)
    assert rc == 2, err
    assert f"{listing} line 4: module '{Q}': weight 1e+39 times its scale 1 is beyond float32's range" in err, err


def test_streamed_linear_takes_a_large_weight_as_the_in_memory_linear(tmp_path: Path):
    """PEFT's linear: A' = sum sign(c_i) sqrt|c_i| A_i, B' = sum sqrt|c_i| B_i (float64 reference here)."""
    a = peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    b = peft_folder(tmp_path / "b", {Q: (12, 10)}, 2)
    ws = [0.5, 1e39]
    streamed = lorafuse.combine([a, b], ws, method="linear", engine="stream").updates[Q]
    memory = lorafuse.combine([a, b], ws, method="linear").updates[Q]
    tensors = [load_file(str(x / "adapter_model.safetensors")) for x in (a, b)]
    key = f"{PREFIX}{Q}"
    a_ref = sum(np.sign(w) * np.sqrt(abs(w)) * t[f"{key}.lora_A.weight"].astype(np.float64)
                for w, t in zip(ws, tensors))
    b_ref = sum(np.sqrt(abs(w)) * t[f"{key}.lora_B.weight"].astype(np.float64) for w, t in zip(ws, tensors))
    ref = b_ref @ a_ref
    assert rel(streamed.delta().astype(np.float64), ref) < 1e-6
    assert rel(memory.delta().astype(np.float64), ref) < 1e-6


def test_a_listed_root_folder_is_no_adapter_not_an_output_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    listing = write_list(tmp_path / "l.txt", ["a", "/"])
    rc, err = run_cli(["combine", "--from-list", str(listing), "-o", str(tmp_path / "ro")], capsys)
    assert rc == 1, err
    assert f"FormatError: {listing} line 2: /: not a recognised adapter" in err, err
    assert "OutputError" not in err
    # an output error of a list of adapters is still said as one
    other = write_list(tmp_path / "l2.txt", ["a"])
    rc, err = run_cli(["combine", "--from-list", str(other), "-o", str(tmp_path / "a" / "out")], capsys)
    assert rc == 1 and "OutputError" in err and "inside the input folder" in err, err


def test_a_megabyte_line_is_not_echoed_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    listing = tmp_path / "l.txt"
    for line in ("a" * 5_000_000, "a/b@" + "x" * 5_000_000, "a " + "1" * 2_000_000 + "_5"):
        listing.write_text(line + "\n")
        rc, err = run_cli(["combine", "--from-list", str(listing), "-o", str(tmp_path / "out")], capsys)
        assert rc in (1, 2) and len(err) < 1000, err[:300]
        assert f"{listing} line 1" in err and "characters)" in err, err


# ----------------------------------------------------------------------------- 10. the estimate of the written file


def test_the_streamed_estimate_includes_the_output_dtype_rounding(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    key = f"{PREFIX}{Q}"
    paths = []
    for j in range(4):
        p = tmp_path / f"a{j}"
        p.mkdir()
        save_torch({f"{key}.lora_A.weight": torch.randn(4, 256, generator=g).to(torch.bfloat16),
                    f"{key}.lora_B.weight": torch.randn(256, 4, generator=g).to(torch.bfloat16)},
                   str(p / "adapter_model.safetensors"))
        (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                           "target_modules": ["q_proj"]}))
        paths.append(p)
    ref = sum(0.25 * peft_deltas(p)[Q] for p in paths)
    for dtype, expected in (("bf16", "BF16"), ("fp32", "F32")):
        out = tmp_path / f"out_{dtype}"
        report = combine_to(paths, [0.25] * 4, CombineOptions(rank=16, passes=2, dtype=dtype), out)
        assert report.dtype == expected and report.summary is not None
        true = rel(written_delta(out, Q), ref)
        estimate = report.summary.errors[Q]
        if dtype == "bf16":
            assert true > 1e-3  # the rounding to BF16 is the error (rank 16 holds the sum exactly)
            assert 0.5 * true < estimate < 2 * true, (estimate, true)
        else:
            assert estimate < 1e-5 and true < 1e-5, (estimate, true)
    assert "the factors as written" in "\n".join(report.summary.lines())


@pytest.mark.parametrize(("argv", "message"), [
    (["combine", "a", "b", "--weights", "1_5,1"], "weights must be comma-separated decimal numbers"),
    (["combine", "a", "b", "--weights", "1,\u0661"], "weights must be comma-separated decimal numbers"),
    (["combine", "a", "b", "--weights", "1e-400,1"], "weight 1e-400 is too small for a float64"),
    (["resize", "a", "--sv-ratio", "1_0"], "--sv-ratio: must be a number >= 1, got '1_0'")])
def test_command_line_numbers_are_decimal_numbers_too(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      argv: list[str], message: str):
    """The sibling of the list's weights: argparse's numbers were Python's float() too (`1_5` read as 15)."""
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "-o", str(tmp_path / "out")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_weights_spelled_plainly_are_read(tmp_path: Path):
    a = peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    b = peft_folder(tmp_path / "b", {Q: (12, 10)}, 2)
    assert cli.main(["combine", str(a), str(b), "--weights", " 1.5, -2e-1", "--method", "cat", "-q",
                     "-o", str(tmp_path / "out")]) == 0
    ref = 1.5 * peft_deltas(a)[Q] - 0.2 * peft_deltas(b)[Q]
    assert rel(written_delta(tmp_path / "out", Q), ref) < 1e-6

"""info and similarity for a new user (issue #18): a file that is not safetensors says so and what
it looks like, a diffusers LoRA folder is an adapter, `info --json` numbers are JSON numbers, every
verb's help names its inputs and shows its own examples, adapters that share no module are named
as such, and a progress bar shows elapsed and remaining time.

Inputs are written by the `safetensors` package (and zipfile / pickle / json / struct for the files
that are not safetensors); expected values come from numpy in float64."""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lorafuse
from lorafuse.cli import build_parser, main
from lorafuse.errors import FormatError
from lorafuse.io.safetensors import read_header

G = np.random.default_rng(18)

# kohya names of an SD 1.x UNet, and the diffusers names of the same modules
KOHYA = {"lora_unet_down_blocks_0_attentions_0_proj_in": (12, 10),
         "lora_unet_mid_block_attentions_0_proj_out": (16, 12),
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (8, 8)}
DIFFUSERS = {"unet.down_blocks.0.attentions.0.proj_in": (12, 10),
             "unet.mid_block.attentions.0.proj_out": (16, 12)}


def _kohya(path: Path, alphas: dict[str, float | None], rank: int = 4, seed: int = 0,
           nan: bool = False) -> dict[str, np.ndarray]:
    """A kohya LoRA file; returns {module: scale * up @ down} in float64 (alpha None: none stored, scale 1)."""
    g = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    deltas = {}
    for name, (o, i) in KOHYA.items():
        down = g.standard_normal((rank, i)).astype(np.float32)
        up = g.standard_normal((o, rank)).astype(np.float32)
        if nan:
            up[0, 0] = np.nan
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        alpha = alphas.get(name)
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
        scale = (alpha if alpha is not None else rank) / rank
        deltas[name] = scale * up.astype(np.float64) @ down.astype(np.float64)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return deltas


def _diffusers(path: Path, r: int = 4, alpha: float = 8.0, seed: int = 1) -> dict[str, np.ndarray]:
    """A diffusers LoRA file (save_lora_weights' keys and lora_adapter_metadata); {module: delta} in float64."""
    g = np.random.default_rng(seed)
    tensors, deltas = {}, {}
    for name, (o, i) in DIFFUSERS.items():
        a = g.standard_normal((r, i)).astype(np.float32)
        b = g.standard_normal((o, r)).astype(np.float32)
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
        deltas[name] = alpha / r * b.astype(np.float64) @ a.astype(np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(
        {"unet.r": r, "unet.lora_alpha": alpha, "unet.target_modules": ["proj_in", "proj_out"]})})
    return deltas


def _peft(path: Path, modules: dict[str, tuple[int, int]], r: int = 4, alpha: int = 8,
          seed: int = 2) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors, deltas = {}, {}
    for name, (o, i) in modules.items():
        a = g.standard_normal((r, i)).astype(np.float32)
        b = g.standard_normal((o, r)).astype(np.float32)
        tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"] = a, b
        deltas[name] = alpha / r * b.astype(np.float64) @ a.astype(np.float64)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
         "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules})}))
    return deltas


def _strict_json(text: str) -> dict[str, object]:
    def refuse(name: str) -> object:
        raise AssertionError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)  # type: ignore[no-any-return]


def _numbers(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cos(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> float:
    dot = sum(float(np.sum(x[n] * y[n])) for n in x if n in y)
    nx = np.sqrt(sum(float(np.sum(v * v)) for v in x.values()))
    ny = np.sqrt(sum(float(np.sum(v * v)) for v in y.values()))
    return dot / (nx * ny)


# ----------------------------------------------------------------------------- 1. not a safetensors file


def _gguf() -> bytes:  # GGUF v3: magic, version, tensor count, metadata count
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + b"\0" * 64


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # what torch.save writes: a zip archive
        z.writestr("archive/data.pkl", pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    return buf.getvalue()


NOT_SAFETENSORS = {
    "script.py": (b"#!/usr/bin/env python3\nimport sys\n\nprint('hello', sys.argv)\n" * 20, "text"),
    "model.safetensors": (_zip(), "a zip archive"),
    "weights.safetensors": (pickle.dumps({"w": list(range(100))}, protocol=4), "a Python pickle"),
    "llama.gguf": (_gguf(), "a GGUF file"),
    "page.safetensors": (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>" + b"x" * 500
                         + b"</body></html>\n", "an HTML page"),
    "lfs.safetensors": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64
                        + b"\nsize 1234567\n", "a Git LFS pointer"),
    "config.json": (json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 2048}).encode(), "JSON text"),
}


@pytest.mark.parametrize("name", NOT_SAFETENSORS)
def test_info_on_a_file_that_is_not_safetensors_says_so(tmp_path, capsys, name):
    data, kind = NOT_SAFETENSORS[name]
    path = tmp_path / name
    path.write_bytes(data)
    (n,) = struct.unpack("<Q", data[:8])
    assert 8 + n > len(data)  # what made the old message: a "header length" past the end
    if name.endswith(".gguf"):  # info describes a GGUF file (gguf's reader): an empty one here
        pytest.importorskip("gguf")
        assert main(["info", str(path)]) == 0
        assert capsys.readouterr().out.startswith(f"gguf        {path}")
    else:
        assert main(["info", str(path)]) == 1
        err = capsys.readouterr().err
        if name == "config.json":  # a model's config given for the model: info names the folder to give
            assert f"{path}: a JSON file, not a checkpoint: give the model's folder ({tmp_path})" in err, err
        else:
            assert f"{path}: not a safetensors file: it looks like {kind}" in err, err
    with pytest.raises(FormatError, match=re.escape(f"{path}: not a safetensors file: it looks like {kind}")):
        read_header(path)


def test_binary_that_is_nothing_known_is_still_not_a_safetensors_file(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(bytes([0x13, 0x37, 0xC0, 0xDE, 0x00, 0xFF, 0x01, 0x02]) * 64)
    with pytest.raises(FormatError, match=r"noise\.safetensors: not a safetensors file \(a safetensors file starts "
                                          r"with an 8-byte header length"):
        read_header(path)


def test_a_header_that_is_not_an_object_is_not_safetensors(tmp_path):
    path = tmp_path / "array.safetensors"
    header = b'[{"a": 1}]'
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(FormatError, match=r"array\.safetensors: not a safetensors file: its header does not "
                                          r"start with '\{'"):
        read_header(path)


def test_a_truncated_safetensors_file_is_not_called_something_else(tmp_path):
    """A real safetensors file cut short is a truncated safetensors file, not 'not safetensors'."""
    path = tmp_path / "cut.safetensors"
    save_file({"w": np.arange(64, dtype=np.float32)}, str(path))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8 + n // 2])
    with pytest.raises(FormatError) as info:
        read_header(path)
    assert f"header length {n} runs past the end of the {8 + n // 2}-byte file" in str(info.value)
    assert "not a safetensors file" not in str(info.value)


def test_valid_safetensors_files_still_read(tmp_path):
    path = tmp_path / "ok.safetensors"
    w = G.standard_normal((3, 5)).astype(np.float32)
    save_file({"w": w}, str(path), metadata={"k": "v"})
    tensors, metadata, _ = read_header(path)
    assert tensors["w"].shape == (3, 5) and tensors["w"].dtype == "F32" and metadata == {"k": "v"}


# ----------------------------------------------------------------------------- 2. a diffusers LoRA folder


def test_info_on_a_diffusers_lora_folder_describes_an_adapter(tmp_path, capsys):
    folder = tmp_path / "my_lora"
    deltas = _diffusers(folder / "pytorch_lora_weights.safetensors")
    assert main(["info", str(folder), "--json"]) == 0
    d = _strict_json(capsys.readouterr().out)
    assert d["type"] == "adapter" and d["format"] == "diffusers" and d["modules"] == len(DIFFUSERS)
    assert d["path"] == str(folder / "pytorch_lora_weights.safetensors")
    norms = {m["name"]: m["delta_norm"] for m in d["module_details"]}  # type: ignore[union-attr]
    for name, delta in deltas.items():
        assert norms[name] == pytest.approx(np.linalg.norm(delta), rel=1e-6)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("adapter ") and "(diffusers)" in out and "checkpoint" not in out


def test_a_diffusers_lora_folder_with_other_files_is_still_an_adapter(tmp_path):
    folder = tmp_path / "trained"
    _diffusers(folder / "pytorch_lora_weights.safetensors")
    save_file({"w": np.zeros((2, 2), np.float32)}, str(folder / "optimizer_state.safetensors"))
    (folder / "README.md").write_text("a LoRA\n")
    assert lorafuse.describe(folder)["type"] == "adapter"


def test_a_folder_holding_one_kohya_file_is_an_adapter(tmp_path):
    folder = tmp_path / "kohya_lora"
    folder.mkdir()
    _kohya(folder / "style.safetensors", {})
    d = lorafuse.describe(folder)
    assert d["type"] == "adapter" and d["format"] == "kohya" and d["modules"] == len(KOHYA)


def test_a_checkpoint_folder_is_still_a_checkpoint(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    w = {"model.layers.0.q_proj.weight": G.standard_normal((6, 4)).astype(np.float32)}
    save_file(w, str(folder / "model.safetensors"))
    d = lorafuse.describe(folder)
    assert d["type"] == "checkpoint" and d["tensors"] == 1 and d["parameters"] == 24


def test_info_spectrum_reads_the_adapter_of_a_folder(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "my_lora"
    _diffusers(folder / "pytorch_lora_weights.safetensors")
    assert main(["info", str(folder), "--spectrum", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- 3. JSON numbers


def _check_numbers(d: dict[str, object]) -> None:
    """Every numeric field of an info --json adapter or checkpoint is a JSON number."""
    if d["type"] == "checkpoint":
        for key in ("tensors", "parameters", "bytes"):
            assert isinstance(d[key], int) and not isinstance(d[key], bool), key
        assert all(isinstance(v, int) for v in d["dtypes"].values())  # type: ignore[union-attr]
        return
    for key in ("modules", "parameters"):
        assert isinstance(d[key], int) and not isinstance(d[key], bool), key
    assert d["lora_alpha"] is None or _numbers(d["lora_alpha"]), d["lora_alpha"]
    assert all(_numbers(a) for a in d["lora_alphas"])  # type: ignore[union-attr]
    assert all(_numbers(s) for s in d["scales"])  # type: ignore[union-attr]
    assert all(isinstance(v, int) for v in d["ranks"].values())  # type: ignore[union-attr]
    assert all(isinstance(v, int) for v in d["dtypes"].values())  # type: ignore[union-attr]
    for m in d["module_details"]:  # type: ignore[union-attr]
        assert isinstance(m["rank"], int) and _numbers(m["scale"]) and all(isinstance(x, int) for x in m["shape"])
        assert m["delta_norm"] is None or _numbers(m["delta_norm"])


def test_kohya_alphas_are_json_numbers(tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    names = list(KOHYA)
    alphas = {names[0]: 8.0, names[1]: 8.0, names[2]: 0.5}
    deltas = _kohya(path, alphas)
    assert main(["info", "--json", str(path)]) == 0
    d = _strict_json(capsys.readouterr().out)
    _check_numbers(d)
    assert d["format"] == "kohya"
    assert d["lora_alpha"] == 8 and d["lora_alphas"] == [0.5, 8]
    assert d["scales"] == pytest.approx(sorted({a / 4 for a in alphas.values()}))
    for m in d["module_details"]:  # type: ignore[union-attr]
        assert m["scale"] == pytest.approx(alphas[m["name"]] / 4)
        assert m["delta_norm"] == pytest.approx(np.linalg.norm(deltas[m["name"]]), rel=1e-6)
    assert main(["info", str(path)]) == 0
    assert "lora_alpha  0.5, 8" in capsys.readouterr().out


def test_a_kohya_file_without_alphas_has_alpha_r(tmp_path, capsys):
    path = tmp_path / "noalpha.safetensors"
    _kohya(path, {}, rank=4)
    assert main(["info", "--json", str(path)]) == 0
    d = _strict_json(capsys.readouterr().out)
    _check_numbers(d)
    assert d["lora_alpha"] == 4 and d["lora_alphas"] == [4] and d["scales"] == [1.0]


def test_diffusers_and_peft_and_checkpoint_numbers(tmp_path, capsys):
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    _diffusers(lora, r=4, alpha=6.0)
    peft = tmp_path / "peft"
    _peft(peft, {"model.layers.0.self_attn.q_proj": (12, 10)}, r=4, alpha=16)
    ckpt = tmp_path / "model.safetensors"
    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float16)}, str(ckpt))
    got = {}
    for path in (lora, peft, ckpt):
        assert main(["info", "--json", str(path)]) == 0
        got[path] = _strict_json(capsys.readouterr().out)
        _check_numbers(got[path])
    assert got[lora]["lora_alpha"] == 6 and got[lora]["lora_alphas"] == [6] and got[lora]["scales"] == [1.5]
    assert got[peft]["lora_alpha"] == 16 and got[peft]["lora_alphas"] == [16] and got[peft]["scales"] == [4.0]
    assert got[ckpt]["parameters"] == 17 and got[ckpt]["bytes"] == 12 * 4 + 5 * 2
    assert got[ckpt]["dtypes"] == {"F32": 1, "F16": 1}


def test_a_lycoris_only_file_has_no_alpha_number(tmp_path, capsys):
    path = tmp_path / "loha.safetensors"
    g = np.random.default_rng(5)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    t = {f"{name}.hada_w1_a": g.standard_normal((12, 2)).astype(np.float32),
         f"{name}.hada_w1_b": g.standard_normal((2, 10)).astype(np.float32),
         f"{name}.hada_w2_a": g.standard_normal((12, 2)).astype(np.float32),
         f"{name}.hada_w2_b": g.standard_normal((2, 10)).astype(np.float32),
         f"{name}.alpha": np.array(1.0, np.float32)}
    save_file(t, str(path))
    assert main(["info", "--json", str(path)]) == 0
    d = _strict_json(capsys.readouterr().out)
    _check_numbers(d)
    assert d["lora_alpha"] is None and d["lora_alphas"] == []
    delta = 0.5 * (t[f"{name}.hada_w1_a"].astype(np.float64) @ t[f"{name}.hada_w1_b"]) * \
        (t[f"{name}.hada_w2_a"].astype(np.float64) @ t[f"{name}.hada_w2_b"])  # scale alpha / dim = 1 / 2
    (m,) = d["module_details"]  # type: ignore[misc]
    assert m["delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5)
    assert main(["info", str(path)]) == 0
    assert "lora_alpha  - (LoHa / LoKr only" in capsys.readouterr().out


def test_a_nan_norm_is_null_in_strict_json(tmp_path, capsys):
    path = tmp_path / "nan.safetensors"
    _kohya(path, {}, nan=True)
    rc = main(["info", "--json", str(path)])
    captured = capsys.readouterr()
    if rc != 0:  # an adapter with NaN factors may be refused on load: then it says why, as an error
        assert "NaN" in captured.err or "non-finite" in captured.err, captured.err
        return
    d = _strict_json(captured.out)
    _check_numbers(d)
    assert all(m["delta_norm"] is None for m in d["module_details"])  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- 4. help


VERBS = ("apply", "combine", "similarity", "info", "resize", "extract", "convert")


def _help(verb: str) -> str:
    return build_parser().verbs[verb].format_help()  # type: ignore[attr-defined]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verbs_examples_show_that_verb(verb):
    text = _help(verb)
    assert "examples:\n" in text, f"{verb} --help shows no examples"
    examples = text.split("examples:\n", 1)[1].split("\n\n", 1)[0]  # the indented lines up to a blank one
    shown = re.findall(r"^\s+lorafuse (\w+)", examples, flags=re.M)
    assert shown, f"{verb} --help shows no example"
    assert set(shown) == {verb}, (verb, shown)


@pytest.mark.parametrize("verb", ["info", "similarity"])
def test_info_and_similarity_help_name_every_input_format(verb):
    text = " ".join(_help(verb).split())
    for fmt in ("PEFT", "kohya", "LyCORIS", "diffusers LoRA"):
        assert fmt in text, (verb, fmt)
    if verb == "info":
        assert "checkpoint" in text and "pipeline" in text and "pytorch_lora_weights.safetensors" in text


def test_resize_and_extract_both_explain_the_rank_rules():
    for verb in ("resize", "extract"):
        assert "--sv-fro F" in _help(verb) and "--sv-cumulative C" in _help(verb)


# ----------------------------------------------------------------------------- 5. no shared module


def test_similarity_of_kohya_and_diffusers_files_says_they_share_no_module(tmp_path, capsys):
    kohya, diff = tmp_path / "style.safetensors", tmp_path / "pytorch_lora_weights.safetensors"
    dk, dd = _kohya(kohya, {}), _diffusers(diff)
    assert main(["similarity", str(kohya), str(diff)]) == 0
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("[0]", "[1]"))]
    assert len(rows) == 2  # the matrix is still printed
    values = [[float(v) for v in row.rsplit(maxsplit=3)[1:3]] for row in rows]  # label, cos, cos, [i]
    np.testing.assert_allclose(values, [[1.0, _cos(dk, dd)], [_cos(dd, dk), 1.0]], atol=1e-4)
    assert f"note: {kohya} and {diff} share no module" in err
    assert "lorafuse convert" in err and f"{kohya}" in err and "--to peft" in err
    assert main(["similarity", "--json", str(kohya), str(diff)]) == 0
    d = _strict_json(capsys.readouterr().out)
    assert d["share_no_module"] == [[0, 1]]
    np.testing.assert_allclose(d["cosine"], [[1.0, _cos(dk, dd)], [_cos(dd, dk), 1.0]], atol=1e-7)


def test_similarity_of_peft_adapters_of_different_models(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    da = _peft(a, {"model.layers.0.self_attn.q_proj": (12, 10)}, seed=3)
    db = _peft(b, {"transformer.h.0.attn.c_attn": (12, 10)}, seed=4)
    dc = _peft(c, {"model.layers.0.self_attn.q_proj": (12, 10)}, seed=5)
    assert main(["similarity", "--json", str(a), str(b), str(c)]) == 0
    captured = capsys.readouterr()
    d = _strict_json(captured.out)
    assert d["share_no_module"] == [[0, 1], [1, 2]]
    assert np.array(d["cosine"]) == pytest.approx(np.array([[_cos(x, y) for y in (da, db, dc)]
                                                            for x in (da, db, dc)]), abs=1e-7)
    assert f"note: {a} and {b} share no module" in captured.err and f"note: {b} and {c} share no module" in \
        captured.err and f"{a} and {c} share" not in captured.err
    assert "different models" in captured.err and "--to peft" not in captured.err


def test_similarity_of_adapters_that_share_modules_adds_no_note(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    da = _peft(a, {"model.layers.0.self_attn.q_proj": (12, 10)}, seed=6)
    db = _peft(b, {"model.layers.0.self_attn.q_proj": (12, 10)}, seed=7)
    assert main(["similarity", str(a), str(b)]) == 0
    out, err = capsys.readouterr()
    assert "share no module" not in err
    assert f"{_cos(da, db):8.4f}" in out


# ----------------------------------------------------------------------------- 6. progress with an ETA


def test_the_tqdm_bar_shows_elapsed_and_remaining_time():
    pytest.importorskip("tqdm")
    from lorafuse._progress import BAR_FORMAT, ProgressEvent, TqdmBar

    assert "{elapsed}" in BAR_FORMAT and "{remaining}" in BAR_FORMAT
    stream = io.StringIO()
    bar = TqdmBar("apply", stream)
    total = 4096
    done = 0
    for i in range(4):
        done += 1024
        bar(ProgressEvent("apply", f"w{i}", 1024, True, done, total, i + 1, 4))
    bar.close()
    text = stream.getvalue()
    assert re.search(r"\d\d:\d\d elapsed, (\d\d:\d\d|\?) left", text), text
    assert "100%" in text and "w3" in text, text


def test_the_own_progress_bar_shows_elapsed_and_remaining_time():
    from lorafuse._progress import Progress, clock

    stream = io.StringIO()
    bar = Progress(10, "resize", enabled=True, stream=stream, unit="modules")
    bar.update(5, "a")
    bar.update(5, "b")
    bar.close()
    assert re.search(r"10/10 modules \S+/s \d\d:\d\d elapsed, \d\d:\d\d left", stream.getvalue()), stream.getvalue()
    assert clock(0) == "00:00" and clock(75.9) == "01:15" and clock(3725) == "1:02:05"
    assert clock(float("nan")) == "?" and clock(float("inf")) == "?"

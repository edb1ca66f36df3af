"""Red team round 6, the read-only commands (info, similarity): every figure `info` prints agrees with numpy,
small alphas and scales included (1e-7 is not 0); a huge alpha is a JSON number a double reads, not 301 digits;
`similarity --json` names an undecodable file name as `info` does (\\xNN, never a lone surrogate that strict
JSON readers refuse), and its table lines up under escaped names; a GGUF file's boolean alpha or non-string
lorafuse mark is not shown as an alpha or a version."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorafuse.cli import main

NAME = "lora_te_text_model_encoder_layers_{}_mlp_fc1"


def _kohya(path: Path, alphas: list[float], rank: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A kohya LoRA file with one module per alpha (float64 alphas); its deltas in float64."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    deltas = {}
    for i, alpha in enumerate(alphas):
        p = NAME.format(i)
        down = rng.standard_normal((rank, 32)).astype(np.float32)
        up = rng.standard_normal((64, rank)).astype(np.float32)
        tensors |= {f"{p}.lora_down.weight": down, f"{p}.lora_up.weight": up, f"{p}.alpha": np.array(alpha)}
        deltas[p] = alpha / rank * (up.astype(np.float64) @ down.astype(np.float64))
    save_file(tensors, str(path))
    return deltas


def _strict(text: str) -> dict[str, object]:
    """JSON as a strict reader takes it: no NaN / Infinity, and text that UTF-8 can hold (no lone surrogate)."""
    def refuse(c: str) -> None:
        raise ValueError(c)
    d = json.loads(text, parse_constant=refuse)
    json.dumps(d, ensure_ascii=False).encode("utf-8")  # a lone surrogate raises UnicodeEncodeError
    return d


def test_info_small_alphas_and_scales_are_not_shown_as_zero(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    alphas = [1e-7, 3e-9]
    deltas = _kohya(path, alphas)
    assert main(["info", "--json", str(path)]) == 0
    d = _strict(capsys.readouterr().out)
    assert d["scales"] == pytest.approx(sorted(a / 4 for a in alphas), rel=1e-6)
    assert d["lora_alphas"] == pytest.approx(sorted(alphas), rel=1e-6)
    assert any(d["lora_alpha"] == pytest.approx(a, rel=1e-6) for a in alphas)
    assert d["lora_alpha"] != 0  # kohya reads alpha 0 as 'alpha = rank': a 0 shown would say scale 1
    for m in d["module_details"]:  # type: ignore[union-attr]
        assert m["delta_norm"] == pytest.approx(np.linalg.norm(deltas[m["name"]]), rel=1e-5)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    scales = re.search(r"^  scales +(.*)$", out, re.M)
    assert scales is not None and [float(s) for s in scales.group(1).split(", ")] == \
        pytest.approx([7.5e-10, 2.5e-8], rel=1e-2)
    alpha_line = re.search(r"^  lora_alpha +(.*)$", out, re.M)
    assert alpha_line is not None and [float(s) for s in alpha_line.group(1).split(", ")] == \
        pytest.approx([3e-9, 1e-7], rel=1e-2)


def test_info_huge_alpha_is_a_json_number_a_double_reads(tmp_path, capsys):
    path = tmp_path / "huge.safetensors"
    _kohya(path, [1e300, 4.0, 4.0])
    assert main(["info", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    d = _strict(out)
    assert d["lora_alpha"] == 4 and d["lora_alphas"] == pytest.approx([4, 1e300])
    assert re.search(r"\d{20}", out) is None  # not 1e300 written out as a 301-digit integer


def _odd_name(tmp_path: Path) -> Path:
    if sys.platform == "darwin":  # macOS refuses file names that are not UTF-8
        pytest.skip("the file system takes only UTF-8 names")
    src = tmp_path / "a.safetensors"
    _kohya(src, [4.0, 2.0], seed=1)
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/\xffodd.safetensors"))
    odd.write_bytes(src.read_bytes())
    return odd


def test_similarity_json_names_an_undecodable_file_name_as_info_does(tmp_path, capsys):
    odd = _odd_name(tmp_path)
    other = tmp_path / "b.safetensors"
    _kohya(other, [4.0, 2.0], seed=2)
    assert main(["similarity", "--json", str(odd), str(other)]) == 0
    d = _strict(capsys.readouterr().out)
    assert main(["info", "--json", str(odd)]) == 0
    info = _strict(capsys.readouterr().out)
    assert d["adapters"] == [info["path"], str(other)]
    assert "\\xff" in str(info["path"])


def test_similarity_table_lines_up_under_escaped_names(tmp_path, capsys):
    odd = _odd_name(tmp_path)
    other = tmp_path / "b.safetensors"
    _kohya(other, [4.0, 2.0], seed=2)
    assert main(["similarity", str(odd), str(other)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "\\xffodd.safetensors" in lines[1]  # named as info names it, not \udcff
    assert len(lines[0]) == lines[1].index("   [0]") == lines[2].index("   [1]")  # the columns line up


def _gguf(path: Path, alpha: object, mark: object) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    if isinstance(alpha, bool):
        w.add_bool("adapter.lora.alpha", alpha)
    if isinstance(mark, bool):
        w.add_bool("lorafuse_version", mark)
    else:
        w.add_array("lorafuse_version", list(mark))  # type: ignore[call-overload]
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((4, 16), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((24, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("mark", [True, range(3)])
def test_gguf_info_does_not_show_a_boolean_alpha_or_a_non_string_mark(tmp_path, capsys, mark):
    path = tmp_path / "odd.gguf"
    _gguf(path, True, mark)  # llama.cpp reads adapter.lora.alpha only as a float32
    assert main(["info", "--json", str(path)]) == 0
    d = _strict(capsys.readouterr().out)
    assert d["lora_alpha"] is None and d["written_by_lorafuse"] is None
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lora_alpha" not in out and "made by" not in out


@pytest.mark.parametrize("alpha", [1e280, 1e300])
def test_spectrum_of_a_huge_but_finite_scale_is_plotted_exactly(tmp_path, capsys, alpha):
    """scale 2.5e299: ||delta||_F is finite in float64 (info shows it); B * scale in float32 is not, and
    matplotlib's log axis overflows near 1e308 (its margins, its ticks): drawn in a unit of a power of ten."""
    pytest.importorskip("matplotlib")
    from lorafuse.formats import load
    from lorafuse.plot import spectra

    path = tmp_path / "huge.safetensors"
    deltas = _kohya(path, [alpha, -4.0])
    got = spectra(load(path))
    for name, delta in deltas.items():
        ref = np.linalg.svd(delta, compute_uv=False)[:4]
        np.testing.assert_allclose(got[name], ref, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "overflow encountered in cast", RuntimeWarning)  # numpy's, at B * scale
        assert main(["info", str(path), "--spectrum", str(tmp_path / "s.svg")]) == 0
    svg = (tmp_path / "s.svg").read_text()
    assert "unit 1e+" in svg and "NaN" not in capsys.readouterr().err


def test_spectrum_of_nan_factors_names_the_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "nan.safetensors"
    _kohya(path, [4.0, 4.0])
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    tensors[f"{NAME.format(0)}.lora_up.weight"][0, 0] = np.nan
    save_file(tensors, str(path))
    assert main(["info", str(path), "--spectrum", str(tmp_path / "s.svg")]) == 1
    err = capsys.readouterr().err
    assert "nan.safetensors" in err and NAME.format(0) in err and "Traceback" not in err
    assert not (tmp_path / "s.svg").exists()


def test_info_dtypes_count_the_full_tensors_the_parameters_count(tmp_path, capsys):
    """A PEFT adapter whose modules_to_save head is float16 beside float32 factors: both dtypes shown, and as
    many tensors as the file holds."""
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], "modules_to_save": ["head"]}))
    rng = np.random.default_rng(0)
    tensors = {"base_model.model.q.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
               "base_model.model.q.lora_B.weight": rng.standard_normal((24, 4)).astype(np.float32),
               "base_model.model.head.weight": rng.standard_normal((5, 24)).astype(np.float16),
               "base_model.model.head.bias": rng.standard_normal(5).astype(np.float16)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    assert main(["info", "--json", str(folder)]) == 0
    d = _strict(capsys.readouterr().out)
    assert d["parameters"] == sum(t.size for t in tensors.values())
    assert d["dtypes"] == {"F32": 2, "F16": 2}


def test_similarity_heat_map_of_many_adapters_is_bounded(tmp_path, monkeypatch):
    """120 adapters: the heat map was 3 + 0.7 n inches square with n^2 texts (150 adapters: a 13104 x 12960
    PNG, 6 GB and a minute); its size and its texts are bounded now."""
    pytest.importorskip("matplotlib")
    import lorafuse.plot as plot

    seen = {}

    def save(fig, path, inputs, overwrite):  # type: ignore[no-untyped-def]
        seen["inches"] = max(fig.get_size_inches())
        seen["texts"] = sum(len(ax.texts) for ax in fig.axes)
        return Path(path)

    monkeypatch.setattr(plot, "_save", save)
    n = 120
    plot.plot_similarity(np.eye(n), [f"adapter_{i}" for i in range(n)], tmp_path / "heat.png")
    assert seen["inches"] * 120 <= 4000 and seen["texts"] <= n
    plot.plot_similarity(np.eye(3), ["a", "b", "c"], tmp_path / "small.png")
    assert seen["texts"] == 9  # a few adapters: each cosine written in its cell


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plots_of_an_undecodable_file_name_are_drawn(tmp_path, capsys, suffix):
    """A file name with a byte that is not UTF-8: matplotlib's fonts raised on its lone surrogate (a traceback
    after the table was printed); the name is drawn as info shows it (\\xNN)."""
    pytest.importorskip("matplotlib")
    odd = _odd_name(tmp_path)
    other = tmp_path / "b.safetensors"
    _kohya(other, [4.0, 2.0], seed=2)
    heat, spectrum = tmp_path / f"heat{suffix}", tmp_path / f"spectrum{suffix}"
    assert main(["similarity", str(odd), str(other), "--plot", str(heat)]) == 0
    assert main(["info", str(odd), "--spectrum", str(spectrum)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert heat.stat().st_size > 0 and spectrum.stat().st_size > 0


def test_plot_similarity_api_takes_labels_with_any_surrogate(tmp_path):
    pytest.importorskip("matplotlib")
    from lorafuse.plot import plot_similarity

    out = plot_similarity(np.eye(2), ["a\ud800", "b\udcff"], tmp_path / "heat.png", title="t\udc80")
    assert out.stat().st_size > 0


def test_heat_map_of_long_paths_shows_what_tells_them_apart(tmp_path):
    """Absolute paths as labels: the constrained layout collapsed (a matplotlib warning on stderr) and the
    labels were cut at the figure's edge, so no row said which adapter it was."""
    pytest.importorskip("matplotlib")
    from lorafuse.plot import plot_similarity

    root = tmp_path / "a_rather_long_folder_of_experiments" / "with_another_level_of_nesting_here"
    labels = [str(root / f"run{i}" / "checkpoint-500" / "adapter_model.safetensors") for i in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's 'constrained_layout not applied'
        out = plot_similarity(np.eye(2), labels, tmp_path / "heat.svg")
    svg = out.read_text()
    assert "run1/" in svg and "run2/" in svg and "safetensors" in svg

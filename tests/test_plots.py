"""Plots: singular value spectra and similarity heat maps as PNG files (matplotlib, an optional
dependency), the CLI options that write them, and the clear error when matplotlib is missing."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import OutputError, UnsupportedError
from lorafuse.plot import module_type, plot_similarity, plot_spectrum, spectra

mpimg = pytest.importorskip("matplotlib.image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODULES = [  # (kohya name, out, in, kernel, rank)
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 64, 48, 0, 8),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 96, 80, 0, 8),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", 64, 48, 0, 8),
    ("lora_unet_down_blocks_0_resnets_0_conv1", 32, 16, 3, 4),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", 128, 64, 0, 16),
]


def kohya_file(path: Path, seed: int, modules: list[tuple] = MODULES) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, o, i, k, r in modules:
        tensors[f"{name}.lora_down.weight"] = torch.randn((r, i, k, k) if k else (r, i), generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn((o, r, 1, 1) if k else (o, r), generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(r / 2)
    save_file(tensors, str(path))
    return path


def check_png(path: Path, min_size: tuple[int, int] = (200, 200)) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    image = mpimg.imread(str(path))
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= min_size[0] and image.shape[1] >= min_size[1]
    rgb = image[..., :3]
    drawn = np.any(rgb < 0.9, axis=2).mean()  # fraction of pixels that are not (near) white
    assert 0.01 < drawn < 0.95, drawn
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20  # several colours, not a flat image
    return image


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("plots")
    paths = [kohya_file(d / f"lora{i}.safetensors", seed=i) for i in range(3)]
    # A fourth adapter that is the first one scaled: cosine 1 with it.
    with safe_open(str(paths[0]), framework="pt") as f:
        t = {k: f.get_tensor(k) * (3.0 if k.endswith(".alpha") else 1.0) for k in f.keys()}
    save_file(t, str(d / "lora0x3.safetensors"))
    return [*paths, d / "lora0x3.safetensors"]


def test_module_types():
    assert module_type("model.layers.3.self_attn.q_proj") == "q_proj"
    assert module_type(MODULES[0][0]) == module_type(MODULES[1][0]) == "attn1_to_q"
    assert module_type(MODULES[3][0]) == "conv1"
    assert module_type("lora_te1_text_model_encoder_layers_11_mlp_fc1") == "mlp_fc1"
    assert module_type("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2") == "net_2"
    assert module_type("lora_unet_conv_in") == "conv_in"


def test_spectra_are_the_singular_values_of_the_deltas(files):
    adapter = lorafuse.load(files[0])
    s = spectra(adapter)
    for name, u in adapter.updates.items():
        d = u.delta().reshape(u.delta_shape[0], -1)
        ref = np.linalg.svd(d, compute_uv=False)[: len(s[name])]
        assert len(s[name]) == min(u.rank, *d.shape)
        np.testing.assert_allclose(s[name], ref, rtol=1e-4, atol=1e-6 * ref[0], err_msg=name)


def test_plot_spectrum_writes_a_png(files, tmp_path):
    out = plot_spectrum(lorafuse.load(files[0]), tmp_path / "spectrum.png")
    assert out == tmp_path / "spectrum.png"
    check_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["spectrum.png"]  # nothing left beside it


def test_plot_spectrum_of_an_in_memory_peft_adapter(tmp_path):
    rng = np.random.default_rng(0)
    sd = {}
    for layer in range(3):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            sd[f"{key}.lora_A.weight"] = rng.standard_normal((4, 32)).astype(np.float32)
            sd[f"{key}.lora_B.weight"] = rng.standard_normal((32, 4)).astype(np.float32)
    adapter = lorafuse.Adapter.from_state_dict(sd, {"r": 4, "lora_alpha": 8})
    check_png(plot_spectrum(adapter, tmp_path / "peft.png", title="a title"))


def test_plot_similarity_writes_a_png(tmp_path):
    m = np.array([[1.0, 0.25, -0.5], [0.25, 1.0, 0.0], [-0.5, 0.0, 1.0]])
    out = plot_similarity(m, ["style", "subject", "negative"], tmp_path / "heat.png")
    image = check_png(out)
    # The colour map runs from blue (-1) through white to red (+1): both ends appear.
    rgb = image[..., :3]
    assert np.any((rgb[..., 0] > 0.6) & (rgb[..., 2] < 0.4))  # red: the diagonal
    assert np.any((rgb[..., 2] > 0.6) & (rgb[..., 0] < 0.4))  # blue: -0.5
    with pytest.raises(lorafuse.LorafuseValueError, match="does not fit 2 labels"):
        plot_similarity(m, ["a", "b"], tmp_path / "bad.png")


def test_a_plot_never_replaces_an_input(files):
    with pytest.raises(OutputError, match="would overwrite the input"):
        plot_spectrum(lorafuse.load(files[0]), files[0])


def test_cli_info_spectrum(files, tmp_path, capsys):
    out = tmp_path / "plot.png"
    assert main(["info", str(files[1]), "--spectrum", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"adapter     {files[1]}  (kohya)" in stdout
    assert stdout.strip().endswith(f"wrote the singular value plot to {out}")
    check_png(out)
    # With --json the note goes to stderr so stdout stays JSON.
    assert main(["info", str(files[1]), "--json", "--spectrum", str(tmp_path / "p2.png")]) == 0
    captured = capsys.readouterr()
    assert captured.out.lstrip().startswith("{") and "wrote the singular value plot" in captured.err
    check_png(tmp_path / "p2.png")


def test_cli_info_spectrum_needs_an_adapter(tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(ckpt))
    assert main(["info", str(ckpt), "--spectrum", str(tmp_path / "x.png")]) == 2
    assert "--spectrum needs an adapter" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_similarity_plot(files, tmp_path, capsys):
    out = tmp_path / "heat.png"
    assert main(["similarity", *map(str, files), "--plot", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = [line for line in stdout.splitlines() if line.rstrip().endswith("]")]
    assert len(rows) == 4
    assert float(rows[0].split()[4]) == pytest.approx(1.0)  # lora0 vs lora0x3
    assert stdout.strip().endswith(f"wrote the heat map to {out}")
    check_png(out)


@pytest.mark.parametrize("how", ["sys.modules", "import"])
def test_missing_matplotlib_is_a_clear_error(files, tmp_path, monkeypatch, capsys, how):
    if how == "sys.modules":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    else:
        real_import = builtins.__import__

        def no_matplotlib(name, *args, **kwargs):  # type: ignore[no-untyped-def]
            if name == "matplotlib" or name.startswith("matplotlib."):
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    adapter = lorafuse.load(files[0])
    with pytest.raises(UnsupportedError, match=r"pip install lorafuse\[plot\]"):
        plot_spectrum(adapter, tmp_path / "s.png")
    with pytest.raises(UnsupportedError, match=r"pip install lorafuse\[plot\]"):
        plot_similarity(np.eye(2), ["a", "b"], tmp_path / "h.png")
    assert main(["similarity", str(files[0]), str(files[1]), "--plot", str(tmp_path / "h.png")]) == 1
    assert "pip install lorafuse[plot]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

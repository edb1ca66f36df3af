"""Round 7 red team, LyCORIS: files the real `lycoris` package writes (create_lycoris on small torch models), through
`info`, `convert` and `apply`. References are LyCORIS's own forward pass (float64), never lorafuse's reading."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris import create_lycoris
from safetensors.torch import load_file, save_file
from torch import nn

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import UnsupportedError


class _Model(nn.Module):
    """A Linear layer, a 3x3 and a 1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8, bias=False)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.point = nn.Conv2d(16, 8, 1, bias=False)


class _Grouped(nn.Module):
    """Convolutions the other LyCORIS tests do not train: depthwise, grouped, and a non-square kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.gc = nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=False)
        self.rect = nn.Conv2d(8, 16, (3, 1), padding=(1, 0), bias=False)


def _network(model: nn.Module, **kwargs: object) -> object:
    net = create_lycoris(model, 1.0, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter random and non-zero (DoRA magnitudes positive)
        for lora in net.loras:
            for name, p in lora.named_parameters():
                p.copy_(p * 1.2 if name == "dora_scale" else torch.randn(p.shape, generator=g) * 0.3)
    return net


def _saved(tmp_path: Path, model: nn.Module, **kwargs: object) -> tuple[Path, object]:
    net = _network(model, **kwargs)
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, None)  # type: ignore[attr-defined]
    return path, net


def test_info_counts_the_lokr_modules_of_two_full_halves_among_the_ranks(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A LoKr whose halves are both full matrices (a lora_dim too large for the layer: LyCORIS's 'full matrix
    mode') has no rank; its module line says r=full. The summary's ranks line left such modules out: for a file of
    them it was empty ('  ranks       '), for a mixed file it counted 2 of 3 modules."""
    torch.manual_seed(0)
    path, _ = _saved(tmp_path, _Model(), algo="lokr", linear_dim=10000, linear_alpha=1.0, conv_dim=10000,
                     conv_alpha=1.0)
    assert main(["info", str(path)]) == 0
    assert "\n  ranks       r=full: 3\n" in capsys.readouterr().out
    # factor 2 and dim 4: the Linear's halves are full; the 3x3's larger half is factorized (Tucker, rank 2)
    torch.manual_seed(0)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    path, net = _saved(mixed, _Model(), algo="lokr", linear_dim=4, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0,
                       factor=2, use_tucker=True)
    full = sum(1 for lora in net.loras if getattr(lora, "use_w1", False) and getattr(lora, "use_w2", False))  # type: ignore[attr-defined]
    assert 0 < full < 3
    assert main(["info", str(path)]) == 0
    assert f"\n  ranks       r=2: {3 - full}, r=full: {full}\n" in capsys.readouterr().out


@pytest.mark.parametrize(("algo", "kwargs"), [("locon", {}), ("loha", {"rank": 2})])
def test_convert_to_peft_of_lycoris_wrapper_names_says_what_they_are(tmp_path: Path, algo: str,
                                                                      kwargs: dict[str, int]) -> None:
    """create_lycoris names a layer of any model 'lycoris_' + its path: no family's kohya name, so no diffusers one.
    convert --to peft said 'cannot tell the model family (sd1, sdxl, flux) from the module names: they fit none;
    name it explicitly', naming no file; naming it (--family sd1) then failed with 'have no diffusers name'; a LoHa
    file was factorized first (its note on unknown kernels printed) and refused after. It is now refused first, with
    the file, the module and the reason, whatever --family says, and nothing is written."""
    torch.manual_seed(0)
    path, _ = _saved(tmp_path, _Model(), algo=algo, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0)
    out = tmp_path / "out.safetensors"
    for family in (None, "sd1"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no note about work done before the refusal
            with pytest.raises(UnsupportedError) as e:
                lorafuse.convert(path, out, to="peft", family=family, **kwargs)  # type: ignore[arg-type]
        msg = str(e.value)
        assert msg.startswith(f"{path}: modules 'lycoris_conv' and 2 more carry the names LyCORIS's own wrapper "
                              "gives a layer of any model"), msg
        assert "convert --to peft reads kohya names" in msg
        assert not out.exists()
    # --to kohya keeps them (the names are LyCORIS's as read)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a LoHa: the note on unknown kernels (test_redteam_round4_interop.py)
        lorafuse.convert(path, out, to="kohya", **kwargs)  # type: ignore[arg-type]
    assert {k.split(".", 1)[0] for k in load_file(str(out))} == {"lycoris_fc", "lycoris_conv", "lycoris_point"}


def _outputs(model: nn.Module) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return {name: model.get_submodule(name)(torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64)).numpy()
                for name in ("dw", "gc", "rect")}


@pytest.mark.parametrize(("algo", "kwargs"), [
    ("locon", {}), ("locon", {"use_tucker": True}), ("loha", {}), ("loha", {"use_tucker": True}),
    ("lokr", {"factor": 2}), ("locon", {"dora_wd": True}), ("lokr", {"dora_wd": True}),
])
def test_apply_of_grouped_depthwise_and_rectangular_convolutions_equals_lycoris_forward(
        tmp_path: Path, algo: str, kwargs: dict[str, object]) -> None:
    """A depthwise conv (weight (8, 1, 3, 3)), a 2-group conv and a (3, 1) kernel: LyCORIS's factors cover
    in_channels / groups inputs, and a LoHa / LoKr stores the kernel flattened; apply gives each the base weight's
    shape. The merged layers compute what the LyCORIS network does."""
    torch.manual_seed(0)
    model = _Grouped()
    base = tmp_path / "base.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(base))
    path, net = _saved(tmp_path, model, algo=algo, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.5,
                       **kwargs)
    out = tmp_path / "out.safetensors"
    lorafuse.apply(base, [path], out=out, progress=False)
    model.double()
    net.double()  # type: ignore[attr-defined]
    net.eval()  # type: ignore[attr-defined]
    want = _outputs(model)
    fresh = _Grouped().double()
    fresh.load_state_dict({k: v.double() for k, v in load_file(str(out)).items()})
    got = _outputs(fresh)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_a_dora_lycoris_file_read_and_saved_keeps_a_convolutions_dora_scale(tmp_path: Path, algo: str) -> None:
    """A LoHa / LoKr with DoRA (dora_wd) on a generic model stores a convolution's factors with the kernel flattened,
    2-D as a Linear layer's, and its dora_scale (out, 1, 1, 1). Read and saved, the dora_scale came back (out, 1):
    a file read and saved was no longer the file, and LyCORIS could not load it onto the convolution ('output with
    shape [16, 1, 1, 1] doesn't match the broadcast shape [16, 1, 16, 1]'). It is written back as stored, and
    LyCORIS's network from the saved file computes what the original does."""
    from lycoris import create_lycoris_from_weights

    torch.manual_seed(0)
    model = _Model()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path, net = _saved(tmp_path, model, algo=algo, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0,
                       dora_wd=True, factor=2)  # a LoKr's larger halves factorized: the kernels flattened
    out = tmp_path / "saved.safetensors"
    lorafuse.load(path).save(out)
    read, saved = load_file(str(path)), load_file(str(out))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in read.items()}
    assert all(torch.equal(saved[k], read[k]) for k in read)
    again = _Model()
    again.load_state_dict(base)
    net2, _ = create_lycoris_from_weights(1.0, str(out), again)
    net2.apply_to()
    g = torch.Generator().manual_seed(3)
    inputs = {"fc": torch.randn(3, 16, generator=g, dtype=torch.float64),
              "conv": torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64),
              "point": torch.randn(2, 16, 4, 4, generator=g, dtype=torch.float64)}
    for m, n in ((model, net), (again, net2)):
        m.double()
        n.double()  # type: ignore[attr-defined]
        n.eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        for name, x in inputs.items():
            np.testing.assert_allclose(again.get_submodule(name)(x).numpy(), model.get_submodule(name)(x).numpy(),
                                       rtol=1e-12, atol=1e-12, err_msg=name)

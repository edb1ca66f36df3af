"""Round 10 red team, LyCORIS: files the real `lycoris` package writes (create_lycoris on tiny torch models), through
`convert`. References are LyCORIS's own weight_decompose / get_weight in float64, never lorafuse's reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris.functional.general import _weight_decompose
from safetensors.torch import load_file, save_file
from torch import nn

import lorafuse
from lorafuse.errors import AdapterNote, UnsupportedError


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8, bias=False)
        self.point = nn.Conv2d(12, 8, 1, bias=False)


def _dora_file(tmp_path: Path, algo: str) -> tuple[Path, Path, nn.Module, object]:
    from lycoris import create_lycoris

    torch.manual_seed(0)
    model = _Model()
    kwargs: dict[str, object] = {"factor": 2, "decompose_both": True} if algo == "lokr" else {}
    net = create_lycoris(model, 1.0, algo=algo, linear_dim=2, linear_alpha=2.0, conv_dim=2, conv_alpha=2.0,
                         dora_wd=True, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.loras:
            for name, p in lora.named_parameters():
                p.copy_(p * 1.3 if name == "dora_scale" else torch.randn(p.shape, generator=g) * 0.4)
    path = tmp_path / f"{algo}_dora.safetensors"
    net.save_weights(str(path), torch.float32, None)
    base = tmp_path / "base.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(base))
    return path, base, model, net


def _lycoris_merged(net: object) -> dict[str, np.ndarray]:
    """LyCORIS's DoRA merge in float64 of the forward pass's delta (scale applied once)."""
    out = {}
    with torch.no_grad():
        for lora in net.loras:  # type: ignore[attr-defined]
            w = lora.org_module[0].weight.double()
            d = lora.get_weight(lora.shape).double().reshape(w.shape)
            merged = _weight_decompose(w + d, lora.dora_scale.double(), 1, True)
            out[lora.lora_name.removeprefix("lycoris_") + ".weight"] = merged.numpy()
    return out


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_convert_rank_of_a_dora_lycoris_module_is_exact_or_refused(tmp_path: Path, algo: str) -> None:
    """`convert --rank K` of a DoRA LoHa / LoKr (LyCORIS dora_wd) cut the delta to rank K and kept the magnitude:
    the file written merged to m / ||W + dW_K|| (W + dW_K), no approximation of what LyCORIS merges, while resize
    and combine refuse to cut a DoRA module's rank ('its rank cannot be reduced independently of the magnitude
    vector'). A K below the delta's rank is now refused, naming the module and that rank; a K that keeps the delta
    exactly still converts, and merges as LyCORIS does."""
    path, base, _, net = _dora_file(tmp_path, algo)
    out = tmp_path / "out.safetensors"
    with pytest.raises(UnsupportedError) as e:
        lorafuse.convert(path, out, to="kohya", rank=1)
    msg = str(e.value)
    assert msg.startswith(f"{path}: module 'lycoris_"), msg
    assert "is DoRA (dora_scale)" in msg and "its rank cannot be reduced to 1" in msg, msg
    assert not out.exists()
    with pytest.warns(AdapterNote, match="written as 2-D LoRA factors"):  # generic names: kernel unknown
        lorafuse.convert(path, out, to="kohya", rank=64)  # every module's exact LoRA
    merged = tmp_path / "merged.safetensors"
    lorafuse.apply(base, [out], out=merged, progress=False)
    got = load_file(str(merged))
    for key, want in _lycoris_merged(net).items():
        np.testing.assert_allclose(got[key].double().numpy(), want, rtol=2e-5, atol=2e-6, err_msg=key)

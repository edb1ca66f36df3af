"""Round 6 red team, LyCORIS / kohya: files the real `lycoris` package writes, through lorafuse.

References are LyCORIS's own forward pass (the layer's output with the network applied, float64), never
lorafuse's reading of the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris import create_lycoris
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file
from torch import nn

import lorafuse
from lorafuse.errors import MissingModuleError, ShapeMismatchError


class _Unet(nn.Module):
    """A few layers of an SD 1.x diffusers UNet, under their diffusers paths (LyCORIS names them
    'lycoris_down_blocks_1_...' when wrapped directly, as SimpleTuner and other diffusers trainers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.Module(), nn.Module()])
        blk = self.down_blocks[1]
        blk.attentions = nn.ModuleList([nn.Module()])
        blk.attentions[0].proj_in = nn.Linear(16, 16)
        blk.attentions[0].to_q = nn.Linear(16, 16, bias=False)
        blk.resnets = nn.ModuleList([nn.Module()])
        blk.resnets[0].conv1 = nn.Conv2d(8, 16, 3, padding=1)
        blk.resnets[0].conv_shortcut = nn.Conv2d(8, 16, 1)


LAYERS = {"down_blocks.1.attentions.0.proj_in": (3, 16), "down_blocks.1.attentions.0.to_q": (3, 16),
          "down_blocks.1.resnets.0.conv1": (2, 8, 5, 5), "down_blocks.1.resnets.0.conv_shortcut": (2, 8, 4, 4)}


def _network(seed: int, **kwargs: object) -> tuple[_Unet, object]:
    torch.manual_seed(seed)
    model = _Unet()
    net = create_lycoris(model, 1.0, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every parameter random and non-zero (a use_scalar scalar too: LyCORIS folds it on save)
        for lora in net.loras:
            for name, p in lora.named_parameters():
                if name == "dora_scale":  # DoRA magnitudes stay positive
                    p.copy_(p * (0.5 + torch.rand(p.shape, generator=g)))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, net


def _outputs(model: nn.Module) -> dict[str, np.ndarray]:
    """Each layer's output on fixed inputs, float64."""
    g = torch.Generator().manual_seed(99)
    out = {}
    with torch.no_grad():
        for path, shape in LAYERS.items():
            layer = model.get_submodule(path)
            out[path] = layer(torch.randn(*shape, generator=g, dtype=torch.float64)).numpy()
    return out


def _lycoris_outputs(model: nn.Module, net: object) -> dict[str, np.ndarray]:
    """What the model computes with the LyCORIS network applied (its forward pass), float64."""
    model.double()
    net.double()  # type: ignore[attr-defined]
    net.eval()  # type: ignore[attr-defined]
    return _outputs(model)


def _merged_outputs(out_file: Path) -> dict[str, np.ndarray]:
    fresh = _Unet().double()
    fresh.load_state_dict({k: torch.from_numpy(v).double() for k, v in load_np(str(out_file)).items()})
    return _outputs(fresh)


def _pipeline(root: Path, model: nn.Module) -> Path:
    """A diffusers pipeline folder: the UNet and a text encoder."""
    (root / "unet").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"]}))
    (root / "unet" / "config.json").write_text("{}")
    (root / "text_encoder" / "config.json").write_text("{}")
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
              str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.ones(12, 12)},
              str(root / "text_encoder" / "model.safetensors"))
    return root


def test_a_lycoris_file_of_a_pipeline_component_points_at_the_components_folder(tmp_path: Path) -> None:
    """create_lycoris(pipe.unet) names the UNet's layers 'lycoris_<diffusers path>'. On the pipeline folder
    they find no target (the pipeline's keys are 'unet/...'): the error said only that, where for a PEFT
    adapter of one component it names the component and its folder. It now does for LyCORIS names too, and
    the folder it names merges the file as LyCORIS's forward pass computes."""
    model, net = _network(0, algo="loha", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=3.0)
    lyc = tmp_path / "lycoris_unet.safetensors"
    net.save_weights(str(lyc), torch.float32, None)  # type: ignore[attr-defined]
    pipe = _pipeline(tmp_path / "pipe", model)
    with pytest.raises(MissingModuleError) as e:
        lorafuse.apply(pipe, [lyc], out=tmp_path / "out", progress=False)
    msg = str(e.value)
    assert ("module 'lycoris_down_blocks_1_resnets_0_conv1' (the base holds unet/down_blocks.1.resnets.0.conv1.weight: "
            "an adapter of that component alone?)") in msg
    assert f"give that component's folder as the base ({pipe / 'unet'})" in msg
    assert not (tmp_path / "out").exists()
    # the folder it names: LyCORIS's own result
    lorafuse.apply(pipe / "unet", [lyc], out=tmp_path / "unet_out", progress=False)
    got = _merged_outputs(tmp_path / "unet_out" / "diffusion_pytorch_model.safetensors")
    want = _lycoris_outputs(model, net)
    for path in LAYERS:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)


# Options of create_lycoris the other LyCORIS tests do not train with: use_scalar (folded into the saved
# factors), rs_lora (alpha saved as alpha * sqrt(r)), LoKr full_matrix / unbalanced_factorization.
OPTIONS = {
    "locon_scalar": dict(algo="locon", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=3.0, use_scalar=True),
    "locon_rs": dict(algo="locon", linear_dim=4, linear_alpha=1.0, conv_dim=4, conv_alpha=3.0, rs_lora=True),
    "loha_scalar": dict(algo="loha", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=3.0, use_scalar=True),
    "loha_rs_tucker": dict(algo="loha", linear_dim=4, linear_alpha=1.0, conv_dim=2, conv_alpha=3.0, rs_lora=True,
                           use_tucker=True),
    "lokr_scalar": dict(algo="lokr", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=3.0, use_scalar=True,
                        factor=4),
    "lokr_full_matrix": dict(algo="lokr", linear_dim=2, linear_alpha=5.0, conv_dim=2, conv_alpha=3.0,
                             full_matrix=True),
    "lokr_unbalanced": dict(algo="lokr", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=3.0,
                            unbalanced_factorization=True, decompose_both=True),
    "lokr_dora_rs": dict(algo="lokr", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=3.0, rs_lora=True,
                         dora_wd=True, factor=4),
}


@pytest.mark.parametrize("config", list(OPTIONS))
def test_apply_equals_lycoris_forward_for_more_options(config: str, tmp_path: Path) -> None:
    model, net = _network(3, **OPTIONS[config])  # type: ignore[arg-type]
    lyc = tmp_path / "lycoris.safetensors"
    net.save_weights(str(lyc), torch.float32, {"ss_network_module": "lycoris.kohya"})  # type: ignore[attr-defined]
    base = tmp_path / "base.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(base))
    report = lorafuse.apply(base, [lyc], out=tmp_path / "out.safetensors", progress=False)
    assert len(report.merged) == len(LAYERS)
    got = _merged_outputs(tmp_path / "out.safetensors")
    want = _lycoris_outputs(model, net)
    for path in LAYERS:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)


def test_convert_to_peft_rewrites_the_kohya_network_keys_it_carries(tmp_path: Path) -> None:
    """A LyCORIS LoHa file (ss_network_module lycoris.kohya, algo loha, dim 4, conv_dim 2) converted to a diffusers
    LoRA of rank 6 / conv rank 3: the ss_* keys it keeps said LoHa, dim 4 and conv_dim 2 (what `convert --to kohya`
    corrects); they now describe the LoRA written, as in the kohya output."""
    from safetensors import safe_open

    from lorafuse.cli import main

    g = torch.Generator().manual_seed(5)
    shapes = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (16, 4, 16, 2.0),
              "lora_unet_down_blocks_1_resnets_0_conv1": (16, 2, 8 * 9, 1.0)}  # LyCORIS's layout: kernel flattened
    tensors = {f"{m}.{k}": torch.randn(shape, generator=g) for m, (out, r, cols, _) in shapes.items()
               for k, shape in (("hada_w1_a", (out, r)), ("hada_w1_b", (r, cols)), ("hada_w2_a", (out, r)),
                                ("hada_w2_b", (r, cols)))}
    tensors.update({f"{m}.alpha": torch.tensor(alpha) for m, (*_, alpha) in shapes.items()})
    src = tmp_path / "loha.safetensors"
    save_file(tensors, str(src), {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4",
                                  "ss_network_alpha": "2.0", "ss_network_args": json.dumps(
                                      {"algo": "loha", "conv_dim": "2", "conv_alpha": "1.0", "preset": "full"})})
    want = {"ss_network_module": "networks.lora", "ss_network_dim": "6", "ss_network_alpha": "6.0",
            "ss_network_args": json.dumps({"conv_dim": "3", "conv_alpha": "3.0", "preset": "full"})}
    for to in ("kohya", "peft"):
        out = tmp_path / f"{to}.safetensors"
        family = ["--family", "sd1"] if to == "peft" else []  # these two layers are SD 1.x's and SDXL's alike
        assert main(["convert", str(src), "--to", to, *family, "--rank", "6", "--conv-rank", "3", "-o", str(out),
                     "-q"]) == 0
        with safe_open(str(out), "np") as f:
            meta = f.metadata()
        assert {k: v for k, v in meta.items() if k.startswith("ss_")} == want, to


@pytest.mark.parametrize(("conv", "kind"), [(nn.Conv1d(8, 16, 3), "1-D"), (nn.Conv3d(4, 8, (1, 3, 3)), "3-D")])
@pytest.mark.parametrize(("algo", "kwargs", "parts"), [
    ("locon", {}, ("lora_down", "lora_up")),
    ("locon", {"use_tucker": True}, ("lora_down", "lora_mid", "lora_up")),
    ("loha", {"use_tucker": True}, ("hada_t1", "hada_t2")),
    ("lokr", {"factor": 4}, ("lokr_w2",)),
])
def test_lycoris_modules_of_1d_and_3d_convolutions_are_named_as_such(conv: nn.Module, kind: str, algo: str,
                                                                     kwargs: dict[str, object],
                                                                     parts: tuple[str, ...], tmp_path: Path) -> None:
    """LyCORIS adapts Conv1d and Conv3d layers too (its default preset targets them). Their factors were refused as
    misfits: 'lora_down (2, 8, 3) and lora_up (16, 2, 1) are not LoRA factors of one rank', 'LoKr tensors do not fit
    together ... lokr_w2 must be a non-empty (c, d) or (c, d, kh, kw) tensor'. The error now says what they are."""
    torch.manual_seed(0)
    model = nn.Sequential(conv)
    net = create_lycoris(model, 1.0, algo=algo, linear_dim=2, conv_dim=2, conv_alpha=1.0, **kwargs)
    net.apply_to()
    path = tmp_path / "conv.safetensors"
    net.save_weights(str(path), torch.float32, None)
    with pytest.raises(ShapeMismatchError) as e:
        lorafuse.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: module 'lycoris_0': "), msg
    assert all(f"{p} (" in msg for p in parts), msg
    assert msg.endswith(f"of a Linear layer or a 2-D convolution but a {kind} convolution's (LyCORIS adapts Conv1d "
                        "and Conv3d layers too), which lorafuse does not read"), msg

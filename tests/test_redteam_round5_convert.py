"""Red-team round 5, convert: the family guessed only from names one family alone has (an SD3 / QwenImage /
HunyuanVideo diffusers LoRA was written under Flux's kohya names, which their loaders ignore), the block-diagonal
fusion of parts with different scales (exact where a common scale makes it so, else to float32 rounding, as the
docs now say), LoHa / LoKr -> LoRA in the input's factor dtype (as resize), and --to gguf refusing a non-PEFT
input first.

References: diffusers itself (each pipeline's save_lora_weights, its kohya Flux converter and LoRA loaders), the
lycoris package's own deltas, and numpy float64."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from tests.lycoris_fixtures import CONFIGS, lycoris_delta, modules, network, save
from tests.sd_fixtures import _clip_config
from transformers import CLIPTextModel

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import AdapterNote, LorafuseValueError, MissingModuleError, UnsupportedError
from lorafuse.formats.flux_keys import is_flux_module

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
H = 16  # the tiny transformers' width
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def _tiny(cls, **kw):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return cls(**kw).eval()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _injected(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """module -> the delta its injected PEFT LoRA layer adds (PEFT's own get_delta_weight)."""
    return {n: m.get_delta_weight(m.active_adapters[0]).detach().double().numpy()
            for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


# ----------------------------------------------------------------------------- 1. family guess


def _sd3():  # type: ignore[no-untyped-def]
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline, lambda: _tiny(
        SD3Transformer2DModel, sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
        out_channels=4, pos_embed_max_size=16)


def _qwenimage():  # type: ignore[no-untyped-def]
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    return QwenImagePipeline, lambda: _tiny(
        QwenImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))


def _hunyuanvideo():  # type: ignore[no-untyped-def]
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    return HunyuanVideoPipeline, lambda: _tiny(
        HunyuanVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


# Targets whose diffusers names Flux has too: HunyuanVideo's single blocks are Flux's, layer for layer.
MODELS = {"sd3": (_sd3, ATTN), "qwenimage": (_qwenimage, ATTN),
          "hunyuanvideo": (_hunyuanvideo, [*ATTN, "proj_mlp", "proj_out", "norm.linear"])}


@pytest.mark.parametrize("model", list(MODELS))
def test_a_diffusers_lora_of_another_mmdit_is_not_written_under_flux_names(tmp_path: Path, model: str,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The file diffusers' own pipeline saves: every module name is one Flux has too, so convert --to kohya
    guessed Flux and wrote lora_unet_double_blocks_0_img_attn_qkv, which this model's loader ignores (0 LoRA
    layers injected, where the original file gives every one). Now refused, asking for --family."""
    pipeline, build = MODELS[model][0]()
    m = build()
    m.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=MODELS[model][1]))
    layers = {k: v for k, v in get_peft_model_state_dict(m).items() if "token_refiner" not in k}  # HunyuanVideo's own
    pipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=layers)
    src = tmp_path / "pytorch_lora_weights.safetensors"
    names = {k.rsplit(".lora_", 1)[0] for k in _tensors(src)}
    assert names and all(is_flux_module(n) for n in names)  # all shared with Flux
    if model == "sd3":  # the reporter's check: diffusers' SD3 loader takes the original file whole
        fresh = build()
        pipeline.load_lora_into_transformer(pipeline.lora_state_dict(str(src)), transformer=fresh)
        assert len(_injected(fresh)) == len(names) == 8
    out = tmp_path / "kohya.safetensors"
    with pytest.raises(LorafuseValueError, match=r"cannot tell Flux from other models.*--family flux"):
        lorafuse.convert(src, out, to="kohya")
    assert not out.exists()
    assert main(["convert", str(src), "--to", "kohya", "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert "SD3, QwenImage, HunyuanVideo" in err and "lora_unet_joint_blocks_" in err and not out.exists()


def test_a_diffusers_flux_lora_converts_with_family_flux_as_diffusers_reads_it(tmp_path: Path) -> None:
    """The same names from a Flux LoRA: --family flux converts them, and diffusers' own kohya Flux loader gives
    back the deltas of the original PEFT layers (q / k / v with alphas 3, 1, 5 at rank 4 fused block-diagonally),
    its CLIP text encoder's too (which made the Flux fused-row count fail: 'not a Flux transformer module')."""
    m = _tiny(FluxTransformer2DModel, **FLUX)
    # double blocks: diffusers' kohya Flux loader splits linear1 with Flux.1-dev's own widths, and names the global
    # layers (img_in, ...) without their transformer. prefix, so that it loads them nowhere
    targets = r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff\.net\.2)"
    config = LoraConfig(r=4, lora_alpha=3, init_lora_weights=False, target_modules=targets,
                        alpha_pattern={"to_k": 1, "to_v": 5})
    m.add_adapter(config)
    te = _tiny(CLIPTextModel, config=_clip_config())
    te_config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "out_proj"])
    inject_adapter_in_model(te_config, te)
    want = _injected(m)
    te_want = _injected(te)
    FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(m),
                                   text_encoder_lora_layers=get_peft_model_state_dict(te),
                                   transformer_lora_adapter_metadata=config.to_dict(),
                                   text_encoder_lora_adapter_metadata=te_config.to_dict())
    src = tmp_path / "pytorch_lora_weights.safetensors"
    out = tmp_path / "kohya.safetensors"
    with pytest.raises(LorafuseValueError, match="--family flux"):
        lorafuse.convert(src, out, to="kohya")
    report = lorafuse.convert(src, out, to="kohya", family="flux")
    assert report.family == "flux" and "lora_unet_double_blocks_0_img_attn_qkv" in report.fused
    fresh = _tiny(FluxTransformer2DModel, **FLUX)
    state, alphas = FluxPipeline.lora_state_dict(str(out), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, alphas, transformer=fresh)
    fresh_te = _tiny(CLIPTextModel, config=_clip_config())
    FluxPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=fresh_te, prefix="text_encoder")
    for ours, theirs in ((_injected(fresh), want), (_injected(fresh_te), te_want)):
        assert sorted(ours) == sorted(theirs) and theirs
        for name, delta in theirs.items():
            np.testing.assert_allclose(ours[name], delta, rtol=1e-5, atol=1e-6, err_msg=name)
    back = tmp_path / "back.safetensors"  # the kohya file records nothing of a family: Flux's own names say it
    assert lorafuse.convert(out, back, to="peft").family == "flux"


def _kohya(path: Path, names: dict[str, tuple[int, int]]) -> Path:
    g = torch.Generator().manual_seed(1)
    t: dict[str, torch.Tensor] = {}
    for n, (o, i) in names.items():
        t[f"{n}.lora_down.weight"] = torch.randn(2, i, generator=g)
        t[f"{n}.lora_up.weight"] = torch.randn(o, 2, generator=g)
        t[f"{n}.alpha"] = torch.tensor(2.0)
    save_file(t, str(path))
    return path


def test_a_kohya_t5_alone_is_not_taken_for_flux(tmp_path: Path) -> None:
    """lora_te3_ is SD3's T5 (diffusers text_encoder_3) as well as Flux's (text_encoder_2): guessed Flux, an SD3
    file was renamed onto text_encoder_2, SD3's CLIP-G. Now --family says which; Flux's diffusers T5 slot tells."""
    q = "encoder.block.0.layer.0.SelfAttention.q"
    src = _kohya(tmp_path / "t5.safetensors", {"lora_te3_" + q.replace(".", "_"): (8, 8)})
    out = tmp_path / "out.safetensors"
    with pytest.raises(LorafuseValueError, match=r"lora_te3_ for SD3 .*text_encoder_3.*--family flux"):
        lorafuse.convert(src, out, to="peft")
    assert not out.exists()
    lorafuse.convert(src, out, to="peft", family="flux")
    assert list(lorafuse.load(out).updates) == [f"text_encoder_2.{q}"]
    lorafuse.convert(src, out, to="peft", family="sdxl", overwrite=True)
    assert list(lorafuse.load(out).updates) == [f"text_encoder_3.{q}"]
    flux_t5 = tmp_path / "flux_t5.safetensors"
    save_file({f"text_encoder_2.{q}.lora_A.weight": torch.ones(2, 8), f"text_encoder_2.{q}.lora_B.weight":
               torch.ones(8, 2)}, str(flux_t5))
    assert lorafuse.convert(flux_t5, tmp_path / "k.safetensors", to="kohya").family == "flux"


def test_sd3_kohya_names_are_refused_not_renamed(tmp_path: Path) -> None:
    """sd-scripts' SD3 names (lora_unet_joint_blocks_N_x_block_attn_qkv): lorafuse has no table for them; the
    refusal says so, and --family flux does not make them Flux's."""
    src = _kohya(tmp_path / "sd3.safetensors", {"lora_unet_joint_blocks_0_x_block_attn_qkv": (3 * H, H),
                                                "lora_unet_joint_blocks_0_context_block_attn_proj": (H, H)})
    out = tmp_path / "out.safetensors"
    with pytest.raises(LorafuseValueError, match=r"fit none.*not SD3's lora_unet_joint_blocks_"):
        lorafuse.convert(src, out, to="peft")
    with pytest.raises(MissingModuleError, match="lora_unet_joint_blocks_0_x_block_attn_qkv"):
        lorafuse.convert(src, out, to="peft", family="flux")
    assert not out.exists()


def test_flux_own_names_still_tell_flux() -> None:
    from lorafuse.formats.flux_keys import is_flux_own_name
    from lorafuse.formats.sd_keys import guess_family

    own = ["lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.single_blocks.3.linear1",
           "model.diffusion_model.final_layer.adaLN_modulation.1", "double_blocks.0.img_mlp.0"]
    shared = ["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_mlp",
              "transformer.x_embedder", "transformer.time_text_embed.guidance_embedder.linear_1",
              "lora_transformer_transformer_blocks_0_attn_to_q", "img_in", "transformer_blocks.0.ff.net.2"]
    assert [is_flux_own_name(n) for n in own] == [True] * 4
    assert [is_flux_own_name(n) for n in shared] == [False] * len(shared)
    for n in own:
        assert guess_family([*shared, n]) == "flux"
    for n in shared:
        with pytest.raises(LorafuseValueError, match="--family flux"):
            guess_family([n, "text_encoder.text_model.encoder.layers.0.mlp.fc1"])


# ----------------------------------------------------------------------------- 2. block-diagonal fusion


def _qkv_file(path: Path, alphas: dict[str, float], rank: int = 4) -> dict[str, torch.Tensor]:
    """A diffusers Flux file of BF16 to_q / to_k / to_v LoRAs at one rank, alphas through alpha_pattern."""
    g = torch.Generator().manual_seed(0)
    st = {}
    for x in alphas:
        st[f"transformer.transformer_blocks.0.attn.to_{x}.lora_A.weight"] = torch.randn(rank, H, generator=g).bfloat16()
        st[f"transformer.transformer_blocks.0.attn.to_{x}.lora_B.weight"] = torch.randn(H, rank, generator=g).bfloat16()
    first = next(iter(alphas.values()))
    md = {"transformer.r": rank, "transformer.lora_alpha": first,
          "transformer.alpha_pattern": {f"transformer_blocks.0.attn.to_{x}": a for x, a in alphas.items()}}
    save_file(st, str(path), {"lora_adapter_metadata": json.dumps(md)})
    return st


def _part_deltas(st: dict[str, torch.Tensor], alphas: dict[str, float], rank: int = 4) -> list[np.ndarray]:
    out = []
    for x, a in alphas.items():
        n = f"transformer.transformer_blocks.0.attn.to_{x}"
        out.append(a / rank * st[n + ".lora_B.weight"].double().numpy() @ st[n + ".lora_A.weight"].double().numpy())
    return out


def _kohya_qkv(path: Path) -> tuple[np.ndarray, torch.dtype]:
    """The kohya qkv delta as sd-scripts computes it (alpha / rank * up @ down), in float64, and lora_up's dtype."""
    t = _tensors(path)
    n = "lora_unet_double_blocks_0_img_attn_qkv"
    up, down = t[f"{n}.lora_up.weight"], t[f"{n}.lora_down.weight"]
    scale = float(t[f"{n}.alpha"].double()) / down.shape[0]
    return scale * up.double().numpy() @ down.double().numpy(), up.dtype


@pytest.mark.parametrize("alphas, up_dtype", [
    ({"q": 3, "k": 1, "v": 5}, torch.float32),  # the reporter's: ratios 3, 1, 5 over to_k's scale, exact in F32
    ({"q": 8, "k": 16, "v": 4}, torch.bfloat16),  # powers of two: lora_up keeps BF16
    ({"q": 2, "k": 3}, torch.float32),  # 1.5: a binary fraction
])
def test_block_diagonal_fusion_is_exact_where_a_common_scale_makes_it(tmp_path: Path, alphas: dict[str, float],
                                                                      up_dtype: torch.dtype) -> None:
    """Parts with different scales: each lora_up block times s_i / s. With s the first part's scale (0.75 here) the
    ratios 1/3 and 5/3 were rounded to float32 (delta errors 1e-7) while the docs said exact; lorafuse now picks s
    among the parts' scales so that the products are exact, in lora_up's own dtype when they fit it."""
    st = _qkv_file(tmp_path / "src.safetensors", alphas)
    kohya = tmp_path / "kohya.safetensors"
    lorafuse.convert(tmp_path / "src.safetensors", kohya, to="kohya", family="flux")
    delta, dtype = _kohya_qkv(kohya)
    assert dtype == up_dtype
    parts = _part_deltas(st, alphas)
    np.testing.assert_array_equal(delta[: len(parts) * H], np.concatenate(parts))
    back = tmp_path / "back.safetensors"
    lorafuse.convert(kohya, back, to="peft")
    got = lorafuse.load(back)
    for x, want in zip(alphas, parts):
        np.testing.assert_array_equal(got[f"transformer.transformer_blocks.0.attn.to_{x}"].delta(), want)


def test_block_diagonal_fusion_without_such_a_scale_is_float32_rounding(tmp_path: Path) -> None:
    """Scales 3/4 and 5/4: neither ratio (5/3, 3/5) is a binary fraction. lora_up is F32 and each delta is within
    float32 rounding of the parts' (what the docs and --help now say)."""
    alphas = {"q": 3, "k": 5}
    st = _qkv_file(tmp_path / "src.safetensors", alphas)
    kohya = tmp_path / "kohya.safetensors"
    lorafuse.convert(tmp_path / "src.safetensors", kohya, to="kohya", family="flux")
    delta, dtype = _kohya_qkv(kohya)
    assert dtype == torch.float32
    parts = np.concatenate(_part_deltas(st, alphas))
    bound = np.concatenate([a / 4 * np.abs(st[f"transformer.transformer_blocks.0.attn.to_{x}.lora_B.weight"]
                                           .double().numpy()) @ np.abs(st[f"transformer.transformer_blocks.0.attn."
                                                                          f"to_{x}.lora_A.weight"].double().numpy())
                            for x, a in alphas.items()])
    err = np.abs(delta[: 2 * H] - parts)
    assert err.max() > 0 and np.all(err <= 2.0 ** -24 * bound)


def test_convert_help_no_longer_claims_lossless_fusion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "losslessly (but for a float32 rounding" in out and "else rounded to float32" in out
    assert "needs --family flux" in out


# ----------------------------------------------------------------------------- 3. LoHa / LoKr -> LoRA dtype


def _best(delta: np.ndarray, k: int) -> np.ndarray:
    d = delta.reshape(delta.shape[0], -1)
    u, s, vt = np.linalg.svd(d)
    return ((u[:, :k] * s[:k]) @ vt[:k]).reshape(delta.shape)


def _kohya_delta(t: dict[str, torch.Tensor], name: str) -> np.ndarray:
    up, down = t[f"{name}.lora_up.weight"].double(), t[f"{name}.lora_down.weight"].double()
    scale = float(t[f"{name}.alpha"].double()) / down.shape[0]
    return scale * (up.flatten(1) @ down.flatten(1)).numpy()


@pytest.mark.parametrize("algo, dtype", [("loha", "BF16"), ("lokr", "F16")])
def test_lycoris_to_lora_keeps_the_factor_dtype(tmp_path: Path, algo: str, dtype: str) -> None:
    """convert --rank wrote F32 factors whatever the input's (resize and combine keep it): now the float32 SVD
    factors are rounded once to the input's dtype, and each delta is LyCORIS's best rank-k to that rounding."""
    _, net = network(dtype=dtype, **CONFIGS[algo])  # type: ignore[arg-type]
    src = save(net, tmp_path / "in.safetensors", dtype)
    out = tmp_path / "out.safetensors"
    with pytest.warns(AdapterNote, match="kernel size is unknown"):  # Tiny's generic lycoris_ names
        lorafuse.convert(src, out, to="kohya", rank=2)
    t = _tensors(out)
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    assert {v.dtype for k, v in t.items() if k.endswith(".weight")} == {torch_dtype}
    unit = {"BF16": 2.0 ** -8, "F16": 2.0 ** -11}[dtype]
    for name, lora in modules(net).items():
        ref = _best(lycoris_delta(lora), 2).reshape(lycoris_delta(lora).shape[0], -1)
        got = _kohya_delta(t, name)
        assert np.linalg.norm(got - ref) <= 8 * unit * np.linalg.norm(ref), name


def test_lycoris_to_lora_peft_output_keeps_bf16(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    w = {f"{n}.hada_w1_a": torch.randn(8, 2, generator=g), f"{n}.hada_w1_b": torch.randn(2, 8, generator=g),
         f"{n}.hada_w2_a": torch.randn(8, 2, generator=g), f"{n}.hada_w2_b": torch.randn(2, 8, generator=g)}
    src = tmp_path / "loha.safetensors"
    save_file({k: v.bfloat16() for k, v in w.items()} | {f"{n}.alpha": torch.tensor(2.0).bfloat16()}, str(src))
    out = tmp_path / "peft.safetensors"
    lorafuse.convert(src, out, to="peft", rank=4, family="sd1")
    t = _tensors(out)
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    b = {k: v.bfloat16().double().numpy() for k, v in w.items()}
    full = (b[f"{n}.hada_w1_a"] @ b[f"{n}.hada_w1_b"]) * (b[f"{n}.hada_w2_a"] @ b[f"{n}.hada_w2_b"])  # alpha/r = 1
    got = lorafuse.load(out)["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].delta()
    ref = _best(full, 4)
    assert np.linalg.norm(got - ref) <= 8 * 2.0 ** -8 * np.linalg.norm(ref)


def test_lycoris_to_lora_of_mixed_dtypes_is_f32_with_a_note(tmp_path: Path) -> None:
    """A file of F16 LoRA modules and BF16 LoHa modules: the new factors are F32 (resize's rule), said in a note;
    the LoRA modules keep their bytes."""
    g = torch.Generator().manual_seed(0)
    lo, ha = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_attentions_0_proj_out"
    t = {f"{lo}.lora_down.weight": torch.randn(2, 8, generator=g).half(),
         f"{lo}.lora_up.weight": torch.randn(8, 2, generator=g).half(), f"{lo}.alpha": torch.tensor(2.0),
         f"{ha}.hada_w1_a": torch.randn(8, 2, generator=g).bfloat16(),
         f"{ha}.hada_w1_b": torch.randn(2, 8, generator=g).bfloat16(),
         f"{ha}.hada_w2_a": torch.randn(8, 2, generator=g).bfloat16(),
         f"{ha}.hada_w2_b": torch.randn(2, 8, generator=g).bfloat16(), f"{ha}.alpha": torch.tensor(2.0)}
    src = tmp_path / "mixed.safetensors"
    save_file(t, str(src))
    out = tmp_path / "out.safetensors"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorafuse.convert(src, out, to="kohya", rank=4)
    assert any(issubclass(w.category, AdapterNote) and "BF16 and F16" in str(w.message) and "are F32" in
               str(w.message) for w in caught)
    got = _tensors(out)
    assert got[f"{ha}.lora_up.weight"].dtype == got[f"{ha}.lora_down.weight"].dtype == torch.float32
    for k in (f"{lo}.lora_down.weight", f"{lo}.lora_up.weight"):
        assert got[k].dtype == torch.float16 and torch.equal(got[k], t[k])


# ----------------------------------------------------------------------------- 4. --to gguf input


def test_to_gguf_refuses_a_non_peft_input_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--help says --to gguf takes a PEFT adapter folder. A LyCORIS LoKr was first asked for --rank, then refused
    for its names ('--arch names another architecture'); a kohya LoRA was blamed on --arch too."""
    _, net = network(**CONFIGS["lokr"])  # type: ignore[arg-type]
    lokr = save(net, tmp_path / "lokr.safetensors")
    kohya = _kohya(tmp_path / "kohya.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8)})
    diffusers = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(2, 8),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(8, 2)}, str(diffusers))
    out = tmp_path / "a.gguf"
    for src, what, rank in ((lokr, "kohya / LyCORIS file", None), (lokr, "kohya / LyCORIS file", 4),
                            (kohya, "kohya / LyCORIS file", None), (diffusers, "diffusers LoRA file", None)):
        with pytest.raises(UnsupportedError, match=rf"a {what} .*--to gguf takes a PEFT LoRA folder"):
            lorafuse.convert(src, out, to="gguf", arch="qwen2", rank=rank)
    assert main(["convert", str(lokr), "--to", "gguf", "--arch", "qwen2", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--to gguf takes a PEFT LoRA folder" in err and "--rank" not in err and not out.exists()

"""Red-team round 4, extract / resize: what extract writes must load in PEFT 0.21 (transformers 5) and reproduce
the fine-tune there, with references independent of lorafuse: the fine-tuned model itself (transformers), numpy
float64 SVDs, the real peft / diffusers packages.

- embeddings told by the model class (T5 relative_attention_bias, XLNet word_embedding) or the name table;
- tied embeddings: the modules reading the embedding's weight (lm_head; T5's encoder / decoder embed_tokens) get
  the same LoRA, or the same tensor kept whole;
- target_modules select exactly the extracted modules (a numeric last name such as diffusers' to_out.0);
- MoE experts transformers fuses: one rank, zero factors for unchanged experts (extract and resize);
- --embeddings full with no LoRA module refused; depthwise convolutions left out; checkpoints that share no tensor
  name; mixed dtypes compared by value; Conv3d kernels extracted.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.numpy import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import lorafuse
from lorafuse.cli import main
from lorafuse.formats.peft import peft_config_for
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, LoraUpdate

pytestmark = pytest.mark.filterwarnings("ignore")


def _adapter_tensors(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _config(folder: Path) -> dict[str, object]:
    return json.loads((folder / "adapter_config.json").read_text())


def _best(d: np.ndarray, k: int) -> np.ndarray:
    """numpy float64: the best rank-k approximation of the 2-D view of `d`."""
    m = d.reshape(d.shape[0], -1).astype(np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vt[:k]).reshape(d.shape)


def _t5(tmp: Path, change: str) -> tuple[Path, Path, T5ForConditionalGeneration]:
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                   relative_attention_num_buckets=16)
    torch.manual_seed(0)
    m = T5ForConditionalGeneration(cfg)
    m.save_pretrained(tmp / "t5_base")
    with torch.no_grad():
        if change == "bias":
            for blk in (m.encoder.block[0], m.decoder.block[0]):
                bias = blk.layer[0].SelfAttention.relative_attention_bias.weight
                bias.add_(0.5 * torch.randn(16, 1) @ torch.randn(1, 4))
        else:
            m.shared.weight.add_(0.5 * torch.randn(64, 2) @ torch.randn(2, 32))
    m.save_pretrained(tmp / "t5_ft")
    return tmp / "t5_base", tmp / "t5_ft", m


# ----------------------------------------------------------------------------- 1. embeddings by the model class


def test_t5_relative_attention_bias_is_an_embedding(tmp_path: Path) -> None:
    base, ft, model = _t5(tmp_path, "bias")
    # skipped by default: nothing else changed, and the refusal says the embeddings were not compared
    with pytest.raises(lorafuse.UnsupportedError,
                       match=r"not compared \(decoder.*relative_attention_bias.weight.*extract them with --embeddings "
                             "lora"):
        lorafuse.extract(base, ft, tmp_path / "skip", rank=1)
    assert not (tmp_path / "skip").exists()
    out = tmp_path / "lora"
    lorafuse.extract(base, ft, out, rank=1, embeddings="lora")
    keys = set(_adapter_tensors(out))
    assert "base_model.model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.lora_embedding_A" in keys
    assert not any(k.endswith("lora_A.weight") for k in keys)
    merged = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base), str(out)).merge_and_unload()
    for side in ("encoder", "decoder"):
        k = f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        np.testing.assert_allclose(merged.state_dict()[k].numpy(), model.state_dict()[k].numpy(), atol=1e-5)


def test_embedding_names_without_the_model_class(tmp_path: Path) -> None:
    """No transformers class (a config without architectures): the name table knows T5's and DeBERTa's relative
    position tables."""
    rng = np.random.default_rng(0)
    shapes = {"enc.relative_attention_bias.weight": (16, 4), "deb.rel_embeddings.weight": (8, 6),
              "enc.q.weight": (6, 6)}
    b = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    f = {k: v + np.outer(rng.standard_normal(v.shape[0]), rng.standard_normal(v.shape[1])).astype(np.float32)
         for k, v in b.items()}
    for name, t in (("base", b), ("ft", f)):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "model.safetensors"))
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", rank=1)
    assert list(res.adapter.updates) == ["enc.q"]
    assert sum("embedding (use --embeddings" in s for s in res.skipped) == 2
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", rank=1, embeddings="lora")
    for m in ("enc.relative_attention_bias", "deb.rel_embeddings"):
        u = res.adapter.updates[m]
        assert u.kind == "embedding"
        np.testing.assert_allclose(u.delta(), (f[m + ".weight"] - b[m + ".weight"]).astype(np.float64), atol=1e-5)


def test_model_class_decides_embeddings_the_table_lacks() -> None:
    """XLNet's token table is `word_embedding` (no table entry); ConvNeXt's depthwise convolutions are grouped."""
    from lorafuse.ops.base_layers import base_layers

    xlnet = {"architectures": ["XLNetLMHeadModel"], "model_type": "xlnet", "vocab_size": 32, "d_model": 16,
             "n_layer": 1, "n_head": 2, "d_inner": 32}
    layers = base_layers(xlnet, ["transformer.word_embedding.weight", "lm_loss.weight"], [])
    assert layers.model_class == "XLNetLMHeadModel"
    assert layers.is_embedding("transformer.word_embedding")
    assert layers.ties == {"lm_loss": "transformer.word_embedding"}
    convnext = {"architectures": ["ConvNextModel"], "model_type": "convnext", "hidden_sizes": [8, 16],
                "depths": [1, 1], "num_stages": 2, "num_channels": 3}
    layers = base_layers(convnext, [], [])
    assert layers.group_count("encoder.stages.0.layers.0.dwconv") == 8
    assert layers.group_count("embeddings.patch_embeddings") == 1


# ----------------------------------------------------------------------------- 2. tied embeddings


def _gpt2(tmp: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    m.save_pretrained(tmp / "g_base")
    with torch.no_grad():
        m.transformer.wte.weight.add_(0.1 * torch.randn(50, 2) @ torch.randn(2, 32))
        m.transformer.h[0].attn.c_attn.weight.add_(0.1 * torch.randn(32, 2) @ torch.randn(2, 96))
    m.save_pretrained(tmp / "g_ft")  # transformer.wte.weight only: lm_head is tied to it
    return tmp / "g_base", tmp / "g_ft"


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.numpy()


@pytest.mark.parametrize("strip_class", [False, True])
def test_tied_gpt2_embedding_lora_reproduces_the_fine_tune(tmp_path: Path, strip_class: bool) -> None:
    base, ft = _gpt2(tmp_path)
    src = base
    if strip_class:  # no architectures: the tie comes from model_type's default (ops.apply_plan.TIE_DEFAULTS)
        src = tmp_path / "g_plain"
        shutil.copytree(base, src)
        cfg = json.loads((src / "config.json").read_text())
        cfg.pop("architectures")
        cfg.pop("tie_word_embeddings", None)
        (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "lora"
    res = lorafuse.extract(src, ft, out, rank=2, embeddings="lora")
    assert any("lm_head reads the weight of transformer.wte (tied)" in n for n in res.notes)
    t = _adapter_tensors(out)
    p = "base_model.model."
    np.testing.assert_array_equal(t[p + "lm_head.lora_A.weight"], t[p + "transformer.wte.lora_embedding_B"].T)
    np.testing.assert_array_equal(t[p + "lm_head.lora_B.weight"], t[p + "transformer.wte.lora_embedding_A"].T)
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(1))
    want = _logits(GPT2LMHeadModel.from_pretrained(ft), ids)
    got = _logits(PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), str(out)), ids)
    assert np.abs(want - _logits(GPT2LMHeadModel.from_pretrained(base), ids)).max() > 1
    np.testing.assert_allclose(got, want, atol=1e-4)
    # lorafuse's own merge unties lm_head and gives the fine-tune too
    assert main(["apply", str(base), str(out), "-o", str(tmp_path / "merged"), "-q"]) == 0
    np.testing.assert_allclose(_logits(GPT2LMHeadModel.from_pretrained(tmp_path / "merged"), ids), want, atol=1e-4)


def _tied_llama(tmp: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    m.save_pretrained(tmp / "l_base")
    with torch.no_grad():
        m.model.embed_tokens.weight.add_(0.1 * torch.randn(64, 2) @ torch.randn(2, 32))
        m.model.layers[0].self_attn.q_proj.weight.add_(0.1 * torch.randn(32, 1) @ torch.randn(1, 32))
    m.save_pretrained(tmp / "l_ft")
    return tmp / "l_base", tmp / "l_ft"


@pytest.mark.parametrize("embeddings", ["lora", "full"])
def test_tied_llama_embeddings_reproduce_the_fine_tune(tmp_path: Path, embeddings: str) -> None:
    base, ft = _tied_llama(tmp_path)
    out = tmp_path / "a"
    lorafuse.extract(base, ft, out, rank=2, embeddings=embeddings)
    cfg = _config(out)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    want = _logits(LlamaForCausalLM.from_pretrained(ft), ids)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(out))
    np.testing.assert_allclose(_logits(peft_model, ids), want, atol=1e-4)
    if embeddings == "full":  # both kept whole: PEFT's merge keeps them apart
        assert sorted(cfg["modules_to_save"]) == ["embed_tokens", "lm_head"]
        np.testing.assert_allclose(_logits(peft_model.merge_and_unload(), ids), want, atol=1e-4)
    else:
        assert "lm_head" in cfg["target_modules"]


def test_tied_t5_shared_keeps_its_update_on_shared(tmp_path: Path) -> None:
    """T5's `shared` is read by the encoder's and decoder's embed_tokens and the output layer: the update stays on
    `shared` alone (with a note), which PEFT's merge_and_unload and lorafuse apply both merge into the one weight:
    the merged model is the fine-tune."""
    base, ft, _ = _t5(tmp_path, "shared")
    out = tmp_path / "lora"
    res = lorafuse.extract(base, ft, out, rank=2, embeddings="lora")
    assert "shared" in res.adapter.updates
    assert not {"encoder.embed_tokens", "decoder.embed_tokens", "lm_head"} & set(res.adapter.updates)
    assert any(n.startswith("shared.weight: read by") for n in res.skipped)
    ids, dec = torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        want = T5ForConditionalGeneration.from_pretrained(ft)(input_ids=ids, decoder_input_ids=dec).logits
        merged = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base),
                                           str(out)).merge_and_unload()
        got = merged(input_ids=ids, decoder_input_ids=dec).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)
    applied = tmp_path / "applied"
    lorafuse.apply(base, [out], out=applied)
    with torch.no_grad():
        got2 = T5ForConditionalGeneration.from_pretrained(applied)(input_ids=ids, decoder_input_ids=dec).logits
    np.testing.assert_allclose(got2.numpy(), want.numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- 3. target_modules


class _Blocks(torch.nn.Module):
    """diffusers' `to_out = Sequential(Linear, Dropout)` inside numbered blocks; blocks.2 is left unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Module() for _ in range(3)])
        for b in self.blocks:
            b.to_out = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.Dropout(0.0))
            b.net = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.GELU(),
                                        torch.nn.Linear(16, 16, bias=False))


def test_numeric_last_names_select_only_the_extracted_modules(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Blocks()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    ft = {k: (v + 0.1 * np.outer(rng.standard_normal(16), rng.standard_normal(16)) if not k.startswith("blocks.2")
              else v).astype(np.float32) for k, v in sd.items()}
    for name, t in (("base", sd), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "model.safetensors"))
    out = tmp_path / "lora"
    lorafuse.extract(tmp_path / "base", tmp_path / "ft", out, rank=1)
    targets = _config(out)["target_modules"]
    assert not any(t.split(".")[0].isdigit() for t in targets)
    peft_model = PeftModel.from_pretrained(model, str(out)).merge_and_unload()
    for k, v in peft_model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), ft[k], atol=1e-5)


def test_peft_targets_pick_the_shortest_tail_that_selects_no_other_module() -> None:
    from lorafuse.ops.base_layers import peft_targets

    modules = ["down_blocks.0", "down_blocks.0.attn.to_out.0", "down_blocks.1.attn.to_out.0", "layers.0.q_proj",
               "layers.1.q_proj", "layers.0.k_proj", "layers.1.k_proj"]
    chosen = ["down_blocks.0.attn.to_out.0", "down_blocks.1.attn.to_out.0", "layers.0.q_proj", "layers.1.q_proj",
              "layers.0.k_proj"]
    assert peft_targets(chosen, modules) == ["layers.0.k_proj", "q_proj", "to_out.0"]
    # without the model's names: a word-led tail, never the bare number
    one = LoraUpdate("blocks.0.to_out.0", Tensor.from_array(np.ones((1, 4), np.float32)),
                     Tensor.from_array(np.ones((4, 1), np.float32)), 1.0)
    a = Adapter(updates={one.name: one})
    assert peft_config_for(a)["target_modules"] == ["to_out.0"]


def test_diffusers_unet_extract_loads_in_peft(tmp_path: Path) -> None:
    from sd_fixtures import _randomized, _unet

    base = _unet("sd1")
    ft = _randomized(_unet("sd1"), 5)
    for name, m in (("unet_base", base), ("unet_ft", ft)):
        m.save_pretrained(tmp_path / name)
    out = tmp_path / "lora"
    lorafuse.extract(tmp_path / "unet_base", tmp_path / "unet_ft", out, rank=2)
    cfg = _config(out)
    assert not any(t.split(".")[0].isdigit() for t in cfg["target_modules"])
    model = _unet("sd1")
    keep = {k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__ and k not in
            ("task_type", "base_model_name_or_path", "revision")}
    model = inject_adapter_in_model(LoraConfig(**keep), model)
    sd = {k.removeprefix("base_model.model."): torch.from_numpy(v) for k, v in _adapter_tensors(out).items()}
    res = set_peft_model_state_dict(model, sd)
    assert not res.unexpected_keys
    # one module against numpy: PEFT's delta is the best rank-2 approximation of the difference
    layer = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
    d = (ft.state_dict()[name] - base.state_dict()[name]).detach().double().numpy()
    np.testing.assert_allclose(layer.get_delta_weight("default").detach().double().numpy(), _best(d, 2), atol=1e-4)


# ----------------------------------------------------------------------------- 4. MoE experts


def _moe(tmp: Path, kind: str) -> tuple[Path, Path, type]:
    torch.manual_seed(0)
    if kind == "mixtral":
        cls: type = MixtralForCausalLM
        m = cls(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
    else:
        cls = Qwen3MoeForCausalLM
        m = cls(Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                               num_experts_per_tok=2, head_dim=8))
    m.save_pretrained(tmp / "base")
    with torch.no_grad():
        layer = m.model.layers[0]
        e = layer.mlp.experts
        for i, r in ((0, 1), (2, 3)):  # experts 1 and 3 unchanged; two ranks
            e.gate_up_proj[i] += 0.05 * torch.randn(e.gate_up_proj.shape[1], r) @ torch.randn(r, 32)
            e.down_proj[i] += 0.05 * torch.randn(32, r) @ torch.randn(r, e.down_proj.shape[2])
        layer.self_attn.q_proj.weight.add_(0.05 * torch.randn(layer.self_attn.q_proj.weight.shape[0], 1)
                                           @ torch.randn(1, 32))
        layer.mlp.gate.weight.add_(0.05 * torch.randn(4, 2) @ torch.randn(2, 32))
    m.save_pretrained(tmp / "ft")
    return tmp / "base", tmp / "ft", cls


def _fused_deltas(model: torch.nn.Module, base: torch.nn.Module) -> dict[str, np.ndarray]:
    b = base.state_dict()
    return {k: (v - b[k]).double().numpy() for k, v in model.state_dict().items() if "experts" in k}


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_experts_one_rank_extract_and_resize_load_in_peft(tmp_path: Path, kind: str) -> None:
    base, ft, cls = _moe(tmp_path, kind)
    exact = tmp_path / "exact"
    res = lorafuse.extract(base, ft, exact, sv_ratio=1000)
    assert any("zero factors" in n for n in res.notes)
    cfg = _config(exact)
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3  # the experts' common rank is the config's
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    want = _logits(cls.from_pretrained(ft), ids)
    np.testing.assert_allclose(_logits(PeftModel.from_pretrained(cls.from_pretrained(base), str(exact)), ids), want,
                               atol=1e-5)
    # a lossless resize gives each expert its own rank (1, 3, and the unchanged ones): written at one rank again
    lossless = tmp_path / "lossless"
    report = lorafuse.resize(exact, sv_ratio=1000, out=lossless).modules
    assert min(m.fro_kept for m in report) > 0.9999 and {m.rank_out for m in report if ".experts." in m.name} == {3}
    np.testing.assert_allclose(_logits(PeftModel.from_pretrained(cls.from_pretrained(base), str(lossless)), ids),
                               want, atol=1e-5)
    # a resize to rank 1: each expert's best rank-1 delta (numpy), every expert at rank 1 for PEFT
    small = tmp_path / "small"
    lorafuse.resize(exact, rank=1, out=small)
    merged = PeftModel.from_pretrained(cls.from_pretrained(base), str(small)).merge_and_unload()
    got = _fused_deltas(merged, cls.from_pretrained(base))
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    owner = "model.layers.0.block_sparse_moe.experts" if kind == "mixtral" else "model.layers.0.mlp.experts"
    gate, up, down = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")

    def best(part: str, e: int) -> np.ndarray:
        k = f"{owner}.{e}.{part}.weight"
        return _best(f[k].astype(np.float64) - b[k], 1)

    for e in range(4):
        np.testing.assert_allclose(got["model.layers.0.mlp.experts.gate_up_proj"][e],
                                   np.concatenate([best(gate, e), best(up, e)]), atol=1e-5)
        np.testing.assert_allclose(got["model.layers.0.mlp.experts.down_proj"][e], best(down, e), atol=1e-5)


# ----------------------------------------------------------------------------- 5 - 9


def test_embeddings_full_without_a_lora_module_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    m.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        m.lm_head.weight.add_(0.1)
    m.save_pretrained(tmp_path / "ft")
    with pytest.raises(lorafuse.UnsupportedError,
                       match=r"kept whole \(lm_head.weight.*no LoRA module.*--embeddings lora"):
        lorafuse.extract(tmp_path / "base", tmp_path / "ft", tmp_path / "out", rank=4, embeddings="full")
    assert not (tmp_path / "out").exists()
    assert main(["extract", str(tmp_path / "base"), str(tmp_path / "ft"), "--rank", "4", "--embeddings", "full",
                 "-o", str(tmp_path / "cli")]) == 1
    assert not (tmp_path / "cli").exists()


def test_depthwise_convolution_left_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    b = {"dw.weight": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
         "pw.weight": rng.standard_normal((8, 8, 1, 1)).astype(np.float32)}
    f = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in b.items()}
    for name, t in (("base", b), ("ft", f)):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "model.safetensors"))
    out = tmp_path / "lora"
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", out, rank=8)
    assert list(res.adapter.updates) == ["pw"]
    assert any(s.startswith("dw.weight: convolution with one input channel per output channel") for s in res.skipped)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
            self.pw = torch.nn.Conv2d(8, 8, 1, bias=False)

    net = Net()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in b.items()})
    merged = PeftModel.from_pretrained(net, str(out)).merge_and_unload()
    np.testing.assert_allclose(merged.pw.weight.detach().numpy(), f["pw.weight"], atol=1e-5)


def test_checkpoints_that_share_no_tensor_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    m.save_pretrained(tmp_path / "base")
    (tmp_path / "ft").mkdir()
    bare = {k: (v + 0.01).numpy() for k, v in m.model.state_dict().items()}  # LlamaModel's names: no 'model.'
    save_file(bare, str(tmp_path / "ft" / "model.safetensors"))
    with pytest.raises(lorafuse.UnsupportedError,
                       match=r"share no tensor name \(the base has 'lm_head.weight', the fine-tuned model "
                             r"'embed_tokens.weight'\); the fine-tuned model's names lack the prefix 'model.'"):
        lorafuse.extract(tmp_path / "base", tmp_path / "ft", tmp_path / "out", rank=4)


def test_mixed_dtypes_compared_by_value(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)  # exact BF16 values (truncated)
    w_b = (bf16.astype(np.uint32) << 16).view(np.float32)
    ones = np.ones(16, np.float32)
    bias = np.arange(16, dtype=np.float32)
    from safetensors.torch import save_file as save_torch

    (tmp_path / "base").mkdir()
    (tmp_path / "ft").mkdir()
    save_torch({"l.weight": torch.from_numpy(w_b).bfloat16(), "norm.weight": torch.ones(16, dtype=torch.bfloat16),
                "l.bias": torch.from_numpy(bias).bfloat16()}, str(tmp_path / "base" / "model.safetensors"))
    save_file({"l.weight": w_b + 0.01 * np.outer(rng.standard_normal(16), rng.standard_normal(16)).astype(np.float32),
               "norm.weight": ones, "l.bias": bias + 1}, str(tmp_path / "ft" / "model.safetensors"))
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", rank=1)
    assert not any(s.startswith("norm.weight") for s in res.skipped)  # equal values: unchanged
    assert any(s.startswith("l.bias: changed") for s in res.skipped)  # a real change is still told
    assert any("the rounding to the coarser of the two (BF16)" in n for n in res.notes)
    assert not any("rounding of the base to F32" in n for n in res.notes)


def test_conv3d_kernel_extracted_and_loaded_in_peft(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    b = {"patch.proj.weight": torch.randn(16, 3, 2, 4, 4, generator=g)}
    f = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in b.items()}
    for name, t in (("base", b), ("ft", f)):
        (tmp_path / name).mkdir()
        save_file({k: v.numpy() for k, v in t.items()}, str(tmp_path / name / "model.safetensors"))
    out = tmp_path / "lora"
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", out, rank=2)
    assert list(res.adapter.updates) == ["patch.proj"] and not res.skipped
    assert _adapter_tensors(out)["base_model.model.patch.proj.lora_A.weight"].shape == (2, 3, 2, 4, 4)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = torch.nn.Module()
            self.patch.proj = torch.nn.Conv3d(3, 16, (2, 4, 4), stride=(2, 4, 4), bias=False)

    net = Net()
    net.load_state_dict(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(net, str(out)).merge_and_unload()
    d = (f["patch.proj.weight"] - b["patch.proj.weight"]).double().numpy()
    got = merged.patch.proj.weight.detach().double().numpy() - b["patch.proj.weight"].double().numpy()
    np.testing.assert_allclose(got, _best(d, 2), atol=1e-5)


def test_dry_run_plans_the_tied_head_and_every_expert(tmp_path: Path) -> None:
    from lorafuse.ops.plan import plan_extract

    base, ft = _gpt2(tmp_path)
    plan = plan_extract(base, ft, rank=2, embeddings="lora")
    assert {"lm_head", "transformer.wte"} <= {m.name for m in plan.modules}
    (tmp_path / "moe").mkdir()
    mb, mf, _ = _moe(tmp_path / "moe", "mixtral")
    names = {m.name for m in plan_extract(mb, mf, rank=2).modules}
    assert {f"model.layers.{i}.block_sparse_moe.experts.{e}.{p}" for i in range(2) for e in range(4)
            for p in ("w1", "w2", "w3")} <= names


def test_an_implausible_config_is_not_built(tmp_path: Path) -> None:
    """A config.json of a billion layers beside a small checkpoint: the name tables decide, at once."""
    from lorafuse.ops.base_layers import base_layers

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 10**9,
           "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "vocab_size": 64}
    layers = base_layers(cfg, ["model.embed_tokens.weight", "lm_head.weight"], ["model.embed_tokens"])
    assert layers.model_class is None and layers.is_embedding("model.embed_tokens")

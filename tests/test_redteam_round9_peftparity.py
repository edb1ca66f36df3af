"""Round 9 red team, PEFT parity: lorafuse against the installed `peft` on adapters PEFT itself writes for tiny
models built here (torch.nn.MultiheadAttention, a Qwen3-MoE router)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft_fixtures import peft_merged_state, peft_saved_adapter, tiny_attention_base
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning", "ignore::FutureWarning")


# ------------------------------------------------------------------------------ torch.nn.MultiheadAttention


def test_multihead_attention_refusal_gives_the_reason_peft_merges_out_proj_twice(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The refusal of PEFT's LoRA on a torch.nn.MultiheadAttention said only 'lorafuse does not merge' it. The
    reason it is not merged: the installed PEFT's merge_and_unload (and the forward it trains with) adds the
    out_proj delta twice, W + 2*scale*B@A (huggingface/peft#3774 makes it W + scale*B@A), so the same file stands
    for two models. Checked here against PEFT itself, and the refusal now says so."""
    base, load = tiny_attention_base(tmp_path)
    adapter = peft_saved_adapter(tmp_path, load, LoraConfig(target_modules=["attn"], r=2, lora_alpha=3))
    ref = peft_merged_state(load, adapter)
    factors = {k: v.double().numpy() for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    w = {k: v.double().numpy() for k, v in load_file(str(base / "model.safetensors")).items()}
    pre = "base_model.model.attn."
    d_in = factors[pre + "lora_B.weight"] @ factors[pre + "lora_A.weight"] * 1.5
    d_out = factors[pre + "base_layer.out_proj.lora_B.weight"] @ factors[pre + "base_layer.out_proj.lora_A.weight"]
    np.testing.assert_allclose(ref["attn.in_proj_weight"], w["attn.in_proj_weight"] + d_in, atol=1e-6)
    np.testing.assert_allclose(ref["attn.out_proj.weight"], w["attn.out_proj.weight"] + 2 * 1.5 * d_out, atol=1e-6)
    with pytest.raises(lorafuse.UnsupportedError, match=r"'attn' \(lora_A \(2, 8\), lora_B \(24, 2\)\) with "
                       r"'attn.base_layer.out_proj' is PEFT's LoRA on a torch.nn.MultiheadAttention .*adds the "
                       r"out_proj delta twice \(W \+ 2\*scale\*B@A.*huggingface/peft#3774"):
        lorafuse.load(str(adapter))
    for argv in (["apply", str(base), str(adapter), "-o", str(tmp_path / "out")], ["info", str(adapter)],
                 ["combine", str(adapter), str(adapter), "-o", str(tmp_path / "out")],
                 ["resize", str(adapter), "--rank", "1", "-o", str(tmp_path / "out")]):
        assert main(argv) == 1
        assert "adds the out_proj delta twice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_out_proj_part_of_a_multihead_attention_lora_alone_is_refused_not_called_ignored(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A PEFT MultiheadAttention LoRA file holding only its out_proj part ('attn.base_layer.out_proj'): lorafuse
    merged the rest, noting it 'ignored 1 module that adapter_config.json does not target, as PEFT ignores
    them'. PEFT does not ignore it: it loads it into the out_proj LoRA of the targeted 'attn' and merges it
    (twice), so the merged model differs from PEFT's. Refused now, naming the missing in_proj part."""
    base, load = tiny_attention_base(tmp_path)
    adapter = peft_saved_adapter(tmp_path, load, LoraConfig(target_modules=["attn", "fc"], r=2))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".attn.lora_" not in k}, str(adapter / "adapter_model.safetensors"))
    before = load().attn.out_proj.weight.detach().double().numpy()
    assert not np.allclose(peft_merged_state(load, adapter)["attn.out_proj.weight"], before)  # PEFT merges it
    assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert ("module 'attn.base_layer.out_proj' (lora_A (2, 8), lora_B (8, 2)) is the out_proj part (its "
            "in_proj_weight part 'attn' is not in the file) of PEFT's LoRA on a torch.nn.MultiheadAttention") in err
    assert "as PEFT ignores them" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- a LoRA on a 2-D router


def test_combining_router_loras_says_what_is_unknown_without_the_base(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """target_modules=['gate'] on a Qwen3-MoE router: PEFT stores a LoRA on the 2-D parameter 'gate.weight'
    (target_parameters). combine refused it saying 'its factors hold one block per expert where that parameter
    is a fused MoE tensor' (the router is no fused MoE tensor) and without the factors' shapes."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=16, intermediate_size=32, moe_intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, vocab_size=64)
    base = tmp_path / "base"
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(base))

    def load() -> torch.nn.Module:
        return Qwen3MoeForCausalLM.from_pretrained(str(base), dtype=torch.float32)

    a = peft_saved_adapter(tmp_path, load, LoraConfig(target_modules=["gate", "q_proj"], r=2), "a")
    b = peft_saved_adapter(tmp_path, load, LoraConfig(target_modules=["gate", "q_proj"], r=2, lora_alpha=4), "b")
    capsys.readouterr()
    for method in ("svd", "linear"):
        assert main(["combine", str(a), str(b), "--method", method, "-o", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert ("module 'model.layers.0.mlp.gate' is a LoRA on a parameter of 'model.layers.0.mlp.gate' (PEFT "
                "target_parameters) with lora_A (2, 16) and lora_B (4, 2): which parameter it adapts, how many "
                "expert blocks its factors hold (one for a 2-D weight such as a router's") in err
        assert "where that parameter is a fused MoE tensor" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ a LoRA on a grouped convolution


class _Grouped(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, groups=2)
        self.fc = torch.nn.Linear(8, 4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_lora_on_a_grouped_convolution_is_refused_saying_what_it_is(tmp_path: Path, use_dora: bool,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """PEFT's LoRA on a Conv2d with groups=2 stores a grouped lora_B (8, r/2, 1, 1); PEFT's merge_and_unload
    refuses it ('Merging is not supported for _ConvNd layers with groups > 1'). lorafuse refused it as a broken
    file: 'lora_A.weight (2, 4, 3, 3) and lora_B.weight (8, 1, 1, 1) are not LoRA factors of one rank'."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    save_file(_Grouped().state_dict(), str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")

    def load() -> _Grouped:
        model = _Grouped()
        model.load_state_dict(load_file(str(base / "model.safetensors")))
        return model

    adapter = peft_saved_adapter(tmp_path, load, LoraConfig(target_modules=["conv", "fc"], r=2, use_dora=use_dora))
    with pytest.raises(NotImplementedError, match="groups > 1"):
        PeftModel.from_pretrained(load(), str(adapter)).merge_and_unload()
    for argv in (["apply", str(base), str(adapter), "-o", str(tmp_path / "out")], ["info", str(adapter)],
                 ["resize", str(adapter), "--rank", "1", "-o", str(tmp_path / "out")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert ("UnsupportedError: " in err and "module 'conv': lora_A.weight (2, 4, 3, 3) and lora_B.weight "
                "(8, 1, 1, 1) are PEFT's LoRA on a convolution with groups=2 (its lora_B is grouped too)") in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ an adapter on a resized vocabulary


@pytest.mark.parametrize("variant", ["modules_to_save", "embedding_lora"])
def test_an_adapter_trained_on_a_resized_vocabulary_says_so_and_merges_into_the_resized_model(
        tmp_path: Path, variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The common recipe: add tokens, model.resize_token_embeddings(), then LoRA with modules_to_save=[embed_tokens,
    lm_head] (or a LoRA on embed_tokens; PEFT then saves the resized embedding whole). Applied to the original
    checkpoint, lorafuse said only 'modules_to_save tensor 'lm_head.weight' has shape (44, 16) but base ... has shape
    (40, 16)'. It now names the resized vocabulary and what to do; done so, the merge equals PEFT's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=40, tie_word_embeddings=False)
    base, resized = tmp_path / "base", tmp_path / "resized"
    LlamaForCausalLM(cfg).save_pretrained(str(base))
    model = LlamaForCausalLM.from_pretrained(str(base))
    model.resize_token_embeddings(44, mean_resizing=False)
    model.save_pretrained(str(resized))
    config = (LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], r=2)
              if variant == "modules_to_save" else LoraConfig(target_modules=["q_proj", "embed_tokens"], r=2))
    adapter = peft_saved_adapter(tmp_path, lambda: model, config)
    capsys.readouterr()
    assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "ShapeMismatchError" in err and "has shape (44, 16) but base" in err
    assert ("(a vocabulary of 44 tokens where the base has 40: the adapter was trained on the model with its token "
            "embeddings resized, resize_token_embeddings(); apply it to that resized model") in err
    assert not (tmp_path / "out").exists()

    def load() -> torch.nn.Module:
        return LlamaForCausalLM.from_pretrained(str(resized))

    ref = peft_merged_state(load, adapter)
    lorafuse.apply(str(resized), [str(adapter)], out=str(tmp_path / "out"), progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(ref)
    for key, value in got.items():
        np.testing.assert_allclose(value.double().numpy(), ref[key], rtol=0, atol=1e-6, err_msg=key)


# ------------------------------------------------------------------------------ alpha_pattern key order


class _Layers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8)}) for _ in range(3)])


def test_alpha_pattern_keys_whose_order_decides_a_scale_are_noted(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """alpha_pattern={'q': 2, 'layers.1.q': 11}: PEFT trains 'layers.1.q' with the first matching key in the
    user's order (alpha 2), but save_pretrained sorts the keys, so every reload (PEFT's merge_and_unload, and
    lorafuse, which follows the file) uses 11: the merged model silently differs from the trained one. lorafuse
    merges as PEFT does from the file and now notes that the order decided that module's scale."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    save_file(_Layers().state_dict(), str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")

    def load() -> _Layers:
        model = _Layers()
        model.load_state_dict(load_file(str(base / "model.safetensors")))
        return model

    config = LoraConfig(target_modules=["q"], r=2, alpha_pattern={"q": 2, "layers.1.q": 11, "layers.2.q": 2})
    torch.manual_seed(1)
    trained = get_peft_model(load(), config)
    assert trained.base_model.model.layers[1]["q"].scaling["default"] == 1.0  # 'q' first: alpha 2
    adapter = peft_saved_adapter(tmp_path, load, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(load(), str(adapter))
    assert reloaded.base_model.model.layers[1]["q"].scaling["default"] == 5.5  # sorted: 'layers.1.q' first
    ref = peft_merged_state(load, adapter)
    capsys.readouterr()
    assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert ("alpha_pattern: 1 module matched by keys of different values ('layers.1.q' by 'layers.1.q' (11), 'q' "
            "(2)): PEFT takes the first key in adapter_config.json, as lorafuse does, but PEFT's save_pretrained "
            "writes the keys sorted") in err
    assert "'layers.2.q' (2)" not in err  # the same value whichever key comes first
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in got.items():
        np.testing.assert_allclose(value.double().numpy(), ref[key], rtol=0, atol=1e-6, err_msg=key)


# ------------------------------------------------------------------------------ lora_bias on a layer without a bias


class _NoBias(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.nb = torch.nn.Linear(4, 4, bias=False)
        self.fc = torch.nn.Linear(4, 4)


def test_a_lora_bias_module_skipped_for_a_missing_base_bias_is_skipped_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lora_bias=True on a Linear without a bias: PEFT refuses to merge it ('Impossible to merge LoRA with
    lora_bias=True because the base layer has no bias'); lorafuse refuses it as a module with no target, and with
    --skip-missing notes 'skipped (no target): module 'nb' has a lora_B bias but the base has no 'nb.bias''. Yet
    it merged that module's weight delta anyway (half the module: neither PEFT's model nor the skip it reports)."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    save_file(_NoBias().state_dict(), str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")

    def load() -> _NoBias:
        model = _NoBias()
        model.load_state_dict(load_file(str(base / "model.safetensors")))
        return model

    adapter = peft_saved_adapter(tmp_path, load, LoraConfig(target_modules=["nb", "fc"], r=2, lora_bias=True))
    with pytest.raises(RuntimeError, match="the base layer has no bias"):
        PeftModel.from_pretrained(load(), str(adapter)).merge_and_unload()
    assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "refused")]) == 1
    assert not (tmp_path / "refused").exists()
    capsys.readouterr()
    assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "out"), "--skip-missing"]) == 0
    assert "skipped (no target)" in capsys.readouterr().err
    got, before = load_file(str(tmp_path / "out" / "model.safetensors")), load().state_dict()
    assert torch.equal(got["nb.weight"], before["nb.weight"])  # skipped whole
    # the other module merges as PEFT merges it (its weight and its bias)
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    pre = "base_model.model.fc."
    delta = factors[pre + "lora_B.weight"].double() @ factors[pre + "lora_A.weight"].double() * 4
    np.testing.assert_allclose(got["fc.weight"].double(), before["fc.weight"].double() + delta, atol=1e-6)
    np.testing.assert_allclose(got["fc.bias"].double(),
                               before["fc.bias"].double() + factors[pre + "lora_B.bias"].double() * 4, atol=1e-6)

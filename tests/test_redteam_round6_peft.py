"""Round 6 red team: interoperability with the real peft / diffusers packages on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from lorafuse.cli import main


def _unet_lora(tmp_path: Path) -> Path:
    """A tiny UNet's LoRA saved by diffusers' ModelMixin.save_lora_adapter: keys without the `unet.` component."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    folder = tmp_path / "unet_lora"
    unet.save_lora_adapter(str(folder))
    keys = list(get_peft_model_state_dict(unet))
    assert keys and not keys[0].startswith("unet.")  # what makes the file one model's, not a pipeline's
    return folder / "pytorch_lora_weights.safetensors"


def test_a_model_level_diffusers_lora_is_refused_saying_what_it_is(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """diffusers' save_lora_adapter writes LoRA factors named `down_blocks....lora_A.weight` (no component):
    the refusal must say so, not that none of its tensors is named as an adapter's (they are)."""
    lora = _unet_lora(tmp_path)
    out = tmp_path / "k.safetensors"
    assert main(["convert", str(lora), "--to", "kohya", "--family", "sd1", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "none named as an adapter's" not in err
    assert "without a component prefix" in err and "save_lora_adapter" in err and "lora_A.weight" in err
    assert not out.exists()


def test_info_of_a_model_level_diffusers_lora_says_why_it_is_no_adapter(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    lora = _unet_lora(tmp_path)
    assert main(["info", str(lora), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["type"] == "checkpoint"
    assert any("without a component prefix" in n for n in shown["notes"])


def test_bias_all_with_modules_to_save_merges_like_peft(tmp_path: Path) -> None:
    """bias='all' also saves a modules_to_save wrapper's biases as `X.modules_to_save.bias` and
    `X.original_module.bias` (beside `X.bias`); PEFT loads its copy from `X.bias` and never uses the others in the
    merged model. lorafuse refused the adapter ('found no target') instead of merging it as PEFT does."""
    import numpy as np
    from peft import PeftModel, get_peft_model
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32, max_position_embeddings=16, attention_bias=True)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    LlamaForCausalLM(cfg).save_pretrained(str(base))
    model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base)), LoraConfig(
        target_modules=["q_proj"], r=2, lora_alpha=4, bias="all", modules_to_save=["k_proj"], init_lora_weights=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(str(adapter))
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith("k_proj.original_module.bias") for k in f.keys())  # the case at hand
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base)), str(adapter)).merge_and_unload()
    want = {k: v.detach().numpy() for k, v in merged.state_dict().items()}

    assert main(["apply", str(base), str(adapter), "-o", str(out)]) == 0
    got = load_file(str(out / "model.safetensors"))
    assert set(got) <= set(want)
    for k, v in got.items():
        np.testing.assert_allclose(v.numpy(), want[k], rtol=0, atol=1e-6, err_msg=k)
    k_bias = "model.layers.0.self_attn.k_proj.bias"
    assert not np.allclose(want[k_bias], load_file(str(base / "model.safetensors"))[k_bias].numpy())


def test_sequence_classification_with_bias_all_merges_like_peft(tmp_path: Path) -> None:
    """The common way to meet the case above: task_type SEQ_CLS adds 'classifier' / 'score' to modules_to_save, and
    bias='all' saves classifier.modules_to_save.bias / classifier.original_module.bias beside classifier.bias."""
    import numpy as np
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=50, max_position_embeddings=16,
                                             num_labels=3)).save_pretrained(str(base))
    model = get_peft_model(BertForSequenceClassification.from_pretrained(str(base)), LoraConfig(
        task_type="SEQ_CLS", target_modules=["query", "value"], r=2, lora_alpha=4, bias="all", init_lora_weights=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(str(adapter))
    merged = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(str(base)),
                                       str(adapter)).merge_and_unload()
    want = {k: v.detach().numpy() for k, v in merged.state_dict().items()}

    assert main(["apply", str(base), str(adapter), "-o", str(out)]) == 0
    got = load_file(str(out / "model.safetensors"))
    for k, v in got.items():
        np.testing.assert_allclose(v.numpy(), want[k], rtol=0, atol=1e-6, err_msg=k)
    before = load_file(str(base / "model.safetensors"))["classifier.bias"]
    assert not np.allclose(got["classifier.bias"].numpy(), before.numpy())


def test_a_peft_file_without_its_config_is_refused_saying_so(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """adapter_model.safetensors alone (PEFT's names, no adapter_config.json beside it): the refusal said 'none named
    as an adapter's', which is false; it must say what is missing."""
    from safetensors.torch import save_file

    lone = tmp_path / "lora.safetensors"
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2)}, str(lone))
    assert main(["convert", str(lone), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "none named as an adapter's" not in err and "adapter_config.json" in err.split("expected")[0]
    assert "save_lora_adapter" not in err

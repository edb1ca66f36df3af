"""Round 8 red team, PEFT parity: lorafuse's apply and its written adapters against the installed `peft`
(merge_and_unload) on tiny transformers models built here, for adapter_config variants earlier rounds left out."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft_fixtures import peft_merged_state, peft_saved_adapter, tiny_attention_base
from safetensors.torch import load_file

import lorafuse

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning", "ignore::FutureWarning")


# ------------------------------------------------------------------------------------------------ helpers


def _qwen3_moe(tmp: Path) -> tuple[Path, Any]:
    """A tiny Qwen3-MoE saved as transformers saves it (one weight per expert on disk, fused in memory)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=16, intermediate_size=32, moe_intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, vocab_size=64)
    base = tmp / "base"
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(base))
    return base, lambda: Qwen3MoeForCausalLM.from_pretrained(str(base), dtype=torch.float32)


_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _lorafuse_merged(base: Path, adapter: Path, out: Path) -> dict[str, np.ndarray]:
    """lorafuse apply's output, its per-expert weights fused as transformers fuses them in memory."""
    lorafuse.apply(str(base), [str(adapter)], out=str(out), progress=False)
    return _lorafuse_merged_file(out)


def _lorafuse_merged_file(out: Path) -> dict[str, np.ndarray]:
    got = {k: v.float().numpy() for k, v in load_file(str(out / "model.safetensors")).items()}
    experts: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for key in list(got):
        m = _EXPERT.fullmatch(key)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = got.pop(key)
    for prefix, parts in experts.items():
        n = len(parts["down_proj"])
        got[prefix + ".down_proj"] = np.stack([parts["down_proj"][e] for e in range(n)])
        got[prefix + ".gate_up_proj"] = np.stack([np.concatenate([parts["gate_proj"][e], parts["up_proj"][e]])
                                                  for e in range(n)])
    return got


def _assert_same(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], changed: tuple[str, ...]) -> None:
    assert set(got) == set(ref)
    for key, value in got.items():
        np.testing.assert_allclose(value, ref[key], rtol=0, atol=1e-5, err_msg=key)
    base_changed = [k for k in ref if any(c in k for c in changed)]
    assert base_changed, changed


# ------------------------------------------------------------------- LoRA on parameters (target_parameters)


def test_router_lora_that_peft_stores_as_a_parameter_merges_like_peft(tmp_path: Path) -> None:
    """target_modules=['gate'] on a Qwen3-MoE router (a module that is no torch Linear): PEFT wraps its weight with
    a ParamWrapper and writes target_modules=[], target_parameters=['gate.weight']. With init_lora_weights=false
    lorafuse refused the file, saying the router layers had 'no tensors in the file' (they have)."""
    base, load = _qwen3_moe(tmp_path)
    adapter = peft_saved_adapter(tmp_path, load, LoraConfig(target_modules=["gate"], r=2, init_lora_weights=False))
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"] == ["gate.weight"]
    ref = peft_merged_state(load, adapter, torch.float32)
    got = _lorafuse_merged(base, adapter, tmp_path / "out")
    _assert_same(got, ref, ("mlp.gate.weight",))
    assert not np.allclose(got["model.layers.0.mlp.gate.weight"],
                           load().state_dict()["model.layers.0.mlp.gate.weight"].numpy())


def test_target_parameters_named_without_their_module_do_not_claim_every_layer(tmp_path: Path) -> None:
    """PEFT matches a target_parameters entry as the parameter's dotted tail ('down_proj' targets
    'mlp.experts.down_proj'); lorafuse took such an entry to target every module, so with init_lora_weights=false
    it refused the adapter, listing embed_tokens, lm_head and every expert as layers with random factors."""
    base, load = _qwen3_moe(tmp_path)
    config = LoraConfig(target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"], r=2,
                        init_lora_weights=False)
    adapter = peft_saved_adapter(tmp_path, load, config)
    ref = peft_merged_state(load, adapter, torch.float32)
    got = _lorafuse_merged(base, adapter, tmp_path / "out")
    _assert_same(got, ref, ("experts.down_proj", "experts.gate_up_proj", "q_proj"))


@pytest.mark.parametrize("patterns", [False, True])
def test_a_saved_target_parameters_adapter_loads_in_peft_as_it_was(tmp_path: Path, patterns: bool) -> None:
    """Adapter.save restated r / rank_pattern from the stacked factors (r * experts rows, keyed by the module's
    name), where PEFT reads r per expert and matches patterns against the parameter's name: PEFT (and lorafuse
    itself) then refused the written adapter with size mismatches."""
    base, load = _qwen3_moe(tmp_path)
    extra: dict[str, Any] = dict(rank_pattern={"experts.down_proj": 3}, alpha_pattern={"gate_up_proj": 5},
                                 use_rslora=True) if patterns else {}
    config = LoraConfig(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                        r=2, lora_alpha=4, **extra)
    adapter = peft_saved_adapter(tmp_path, load, config)
    lorafuse.load(str(adapter)).save(str(tmp_path / "resaved"))
    ref = peft_merged_state(load, adapter, torch.float32)
    again = peft_merged_state(load, tmp_path / "resaved", torch.float32)
    assert set(again) == set(ref)
    for key, value in again.items():
        np.testing.assert_allclose(value, ref[key], rtol=0, atol=1e-6, err_msg=key)
    got = _lorafuse_merged(base, tmp_path / "resaved", tmp_path / "out")
    _assert_same(got, ref, ("experts.down_proj",))


def test_qwen3_vl_moe_experts_stored_as_the_hub_stores_them_merge_like_peft(tmp_path: Path) -> None:
    """The Hub's Qwen3-VL-MoE checkpoints store the fused experts [E, in, out]; transformers 5 transposes them
    when it loads them (Transpose(1, 2, check_dims=True)), so a PEFT target_parameters LoRA trained there adapts
    [E, out, in]. lorafuse refused it: 'fits none of the base's targeted parameters ... the adapter was not made
    for this base'."""
    from safetensors.torch import save_file
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                vocab_size=64, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  deepstack_visual_indexes=[0], patch_size=4, spatial_merge_size=1, temporal_patch_size=1)
    saved = tmp_path / "saved"
    Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vision)).save_pretrained(
        str(saved))
    hub = tmp_path / "hub"  # the same model, its experts stored [E, in, out]
    hub.mkdir()
    (hub / "config.json").write_text((saved / "config.json").read_text())
    state = load_file(str(saved / "model.safetensors"))
    save_file({k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in state.items()},
              str(hub / "model.safetensors"), metadata={"format": "pt"})

    def load() -> Any:
        return Qwen3VLMoeForConditionalGeneration.from_pretrained(str(hub), dtype=torch.float32)

    config = LoraConfig(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                        r=2, init_lora_weights=False)
    adapter = peft_saved_adapter(tmp_path, load, config)
    ref = peft_merged_state(load, adapter, torch.float32)
    lorafuse.apply(str(hub), [str(adapter)], out=str(tmp_path / "out"), progress=False)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert tuple(written[key].shape) == (4, 32, 48)  # as the base stores it
    merged = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    got = {k: v.detach().float().numpy() for k, v in merged.state_dict().items()}
    assert set(got) == set(ref)
    for k, value in got.items():
        np.testing.assert_allclose(value, ref[k], rtol=0, atol=1e-5, err_msg=k)
    assert not np.allclose(got[key], state[key].float().numpy())


def test_a_module_only_a_bare_target_parameters_entry_could_name_is_not_merged(tmp_path: Path) -> None:
    """With target_parameters=['down_proj'] (no module), lorafuse read every module of the file as a possible
    ParamWrapper and merged the tensors of a module target_modules does not name (v_proj here, after the config
    was narrowed to q_proj): PEFT ignores them. Now refused, saying why (skip_missing merges the rest, as PEFT)."""
    base, load = _qwen3_moe(tmp_path)
    config = LoraConfig(target_modules=["q_proj", "v_proj"], target_parameters=["down_proj"], r=2)
    adapter = peft_saved_adapter(tmp_path, load, config)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj"]
    cfg_path.write_text(json.dumps(cfg))
    ref = peft_merged_state(load, adapter, torch.float32)
    with pytest.raises(lorafuse.MissingModuleError, match=r"v_proj'.*not in target_modules.*ignores its tensors"):
        lorafuse.apply(str(base), [str(adapter)], out=str(tmp_path / "refused"), progress=False)
    assert not (tmp_path / "refused").exists()
    lorafuse.apply(str(base), [str(adapter)], out=str(tmp_path / "out"), progress=False, skip_missing=True)
    got = _lorafuse_merged_file(tmp_path / "out")
    _assert_same(got, ref, ("experts.down_proj", "q_proj"))


# ------------------------------------------------------------------------------ torch.nn.MultiheadAttention


def test_a_lora_on_multihead_attention_is_refused_saying_what_it_is(tmp_path: Path) -> None:
    """PEFT's LoRA on a torch.nn.MultiheadAttention saves 'attn' (in_proj_weight's factors) and
    'attn.base_layer.out_proj'. lorafuse refused 'attn' with no reason and claimed PEFT ignores the out_proj part
    ('ignored 1 module that adapter_config.json does not target, as PEFT ignores them'): PEFT merges both."""
    base, load = tiny_attention_base(tmp_path)
    adapter = peft_saved_adapter(tmp_path, load, LoraConfig(target_modules=["attn"], r=2))
    ref = peft_merged_state(load, adapter, torch.float32)
    assert not np.allclose(ref["attn.out_proj.weight"], load().attn.out_proj.weight.detach().numpy())
    for call in (lambda: lorafuse.load(str(adapter)),
                 lambda: lorafuse.apply(str(base), [str(adapter)], out=str(tmp_path / "out"), progress=False,
                                        skip_missing=True)):
        with pytest.raises(lorafuse.UnsupportedError, match=r"'attn' \(lora_A \(2, 8\), lora_B \(24, 2\)\) with "
                           r"'attn.base_layer.out_proj' is PEFT's LoRA on a torch.nn.MultiheadAttention"):
            call()
    assert not (tmp_path / "out").exists()

"""Round 4 findings the lead fixed beside the helpers' files: a trained bias PEFT saves under `base_layer`
(adapter_config bias='lora_only' / 'all') is the adapter's own tensor, not PEFT's copy of the base, so an
adapter weight other than 1 is refused for it as for modules_to_save (it would be installed whole); plan_apply
of a generator of adapters counts their bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import PREFIX, peft_folder
from safetensors.numpy import load_file, save_file

from lorafuse.cli import main

MODULE = "model.layers.0.self_attn.q_proj"


def _base(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(5)
    save_file({f"{MODULE}.weight": rng.standard_normal((8, 6)).astype(np.float32),
               f"{MODULE}.bias": rng.standard_normal(8).astype(np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_trained_bias_is_not_scaled_by_an_adapter_weight(tmp_path: Path, capsys, bias: str):
    base = _base(tmp_path / "base")
    trained = np.arange(8, dtype=np.float32)
    adapter = peft_folder(tmp_path / "a", {MODULE: (8, 6)}, seed=1, extra={"bias": bias},
                          tensors={f"{PREFIX}{MODULE}.base_layer.bias": trained})
    assert main(["apply", str(base), str(adapter), "--weights", "0.5", "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "replaces base weight 'model.layers.0.self_attn.q_proj.bias' whole, and the adapter's weight is 0.5" in err
    assert "train it with bias='none'" in err and not (tmp_path / "out").exists()
    # weight 1: the trained bias is installed, as PEFT's merge does
    assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "out"), "-q"]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert np.array_equal(merged[f"{MODULE}.bias"], trained)


def test_plan_apply_of_a_generator_counts_the_adapters_bytes(tmp_path: Path):
    """plan_apply read a generator of adapters twice (prepare_apply used it up), so the adapters' bytes were not
    counted: the plan of a generator equals the plan of the list."""
    from lorafuse.ops.plan import plan_apply

    base = _base(tmp_path / "base")
    adapter = peft_folder(tmp_path / "a", {MODULE: (8, 6)}, seed=1)
    listed = plan_apply(base, [adapter], out=tmp_path / "out")
    generated = plan_apply(base, (a for a in [adapter]), out=tmp_path / "out")
    stored = (adapter / "adapter_model.safetensors").stat().st_size
    assert generated.bytes_read == listed.bytes_read >= stored - 1024  # the factors' bytes, less the small header
    assert generated.size == listed.size and generated.bytes_written == listed.bytes_written


def test_info_tries_a_bounded_number_of_parameter_assignments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A module's LoRA-on-parameter wrappers are matched to target_parameters by trying every assignment
    (k! for k nested wrappers): past info._MAX_WAYS (a crafted nesting) the wrappers are left unresolved
    (rank and scale None, as where only the base tells), instead of iterating for hours."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    import lorafuse
    from lorafuse.ops import info

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                         vocab_size=96, max_position_embeddings=32, head_dim=8)
    config = LoraConfig(target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                        init_lora_weights=False)
    get_peft_model(Qwen3MoeForCausalLM(cfg), config).save_pretrained(str(tmp_path / "ad"))

    def experts(d: dict) -> dict:
        return {m["name"]: (m["rank"], m["scale"]) for m in d["module_details"] if "experts" in m["name"]}

    resolved = experts(lorafuse.describe(tmp_path / "ad"))
    assert len(resolved) == 2 and all(r == (8, 1.0) for r in resolved.values())  # PEFT's defaults: r 8, alpha 8
    monkeypatch.setattr(info, "_MAX_WAYS", 1)  # the 2 wrappers have 2 assignments
    assert set(experts(lorafuse.describe(tmp_path / "ad")).values()) == {(None, None)}

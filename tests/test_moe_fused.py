"""MoE experts and fused projections against transformers and PEFT.

- PEFT LoRAs on fused expert parameters (`target_parameters`, PEFT's lora.ParamWrapper) on tiny
  transformers MoE models: Qwen3-MoE ([E, out, in] in memory, saved one weight per expert),
  GPT-OSS ([E, in, out], is_transposed) and Llama 4 text ([E, in, out] without the flag: PEFT swaps
  in / out), merged by lorafuse vs PEFT's merge_and_unload.
- LoRAs on per-expert 2-D layers (`experts.{e}.w1`, `experts.{e}.gate_proj`).
- Refusals: a delta that finds no weight stops the run.
- Separate q/k/v and gate/up adapters merged into a Phi-3 checkpoint's fused qkv_proj / gate_up_proj,
  against PEFT's merge on the same weights split into a Llama (whose logits equal Phi-3's: the split is
  transformers' own), in float64.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file
from torch import nn

import lorafuse
from lorafuse.errors import LorafuseError, MissingModuleError, ShapeMismatchError, UnsupportedError
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.ops.apply_plan import plan_apply
from lorafuse.ops.stages import RowBlock, build_stages, row_pieces, slice_stages

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

E = 4


def _randomize(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _merged_state(base: nn.Module, adapter_dir: Path) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().float().numpy().copy() for k, v in merged.state_dict().items()}


def _read(path: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in load_file(str(path / "model.safetensors")).items()}


# ------------------------------------------------------------------------------------------ fused experts


def _moe_model(kind: str) -> tuple[nn.Module, str]:
    """A tiny float32 MoE model of transformers and the module path of its experts."""
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                             num_experts=E, num_experts_per_tok=2)
        return Qwen3MoeForCausalLM(cfg).eval(), "mlp.experts"
    if kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=E,
                            num_experts_per_tok=2)
        return MixtralForCausalLM(cfg).eval(), "mlp.experts"
    if kind == "gpt_oss":  # intermediate == hidden: down_proj [E, 16, 16] is square, only the model type tells
        from transformers import GptOssConfig, GptOssForCausalLM

        cfg = GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=E,
                           num_experts_per_tok=2)
        return GptOssForCausalLM(cfg).eval(), "mlp.experts"
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(vocab_size=64, hidden_size=16, intermediate_size=16, intermediate_size_mlp=20,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                           num_local_experts=E, num_experts_per_tok=1)
    return Llama4ForCausalLM(cfg).eval(), "feed_forward.experts"


def _moe_case(tmp: Path, kind: str, fused_on_disk: bool = False) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(base folder, adapter folder, PEFT's merged state dict) for a LoRA on the experts' fused parameters
    (different ranks / alphas for the two, through rank_pattern / alpha_pattern) plus a q_proj LoRA."""
    model, experts = _moe_model(kind)
    base_dir, adapter_dir = tmp / "base", tmp / "adapter"
    model.save_pretrained(str(base_dir))
    if fused_on_disk:  # the tensors as the model holds them, [E, 2I, H] (a checkpoint written as loaded)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        (base_dir / "model.safetensors").unlink()
        save_file(state, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"],
                        target_parameters=[f"{experts}.gate_up_proj", f"{experts}.down_proj"],
                        rank_pattern={"down_proj": 3}, alpha_pattern={"down_proj": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    _randomize(peft_model, 1)
    peft_model.save_pretrained(str(adapter_dir))
    fresh, _ = _moe_model(kind)  # the same seed: the same base weights
    return base_dir, adapter_dir, _merged_state(fresh, adapter_dir)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_fused_experts_equal_peft_merge(kind: str, tmp_path: Path) -> None:
    fused_on_disk = kind == "qwen3_moe"  # the others are saved fused by transformers anyway
    base_dir, adapter_dir, merged = _moe_case(tmp_path, kind, fused_on_disk)
    adapter = lorafuse.load(adapter_dir)
    keys = sorted(adapter.updates)
    assert any(k.endswith("experts.base_layer") for k in keys) and any(k.endswith("experts") for k in keys)
    report = lorafuse.apply(base_dir, [adapter_dir], out=tmp_path / "out", progress=False)
    out = _read(tmp_path / "out")
    base = _read(base_dir)
    changed = [k for k in out if "experts" in k and k.endswith("_proj")]
    assert changed and set(changed) <= set(report.merged)
    for key, value in out.items():
        ref = merged[key]
        assert value.shape == ref.shape, key
        np.testing.assert_allclose(value, ref, rtol=0, atol=2e-6, err_msg=key)
        if key in changed or key.endswith("q_proj.weight"):
            assert not np.allclose(value, base[key]), f"{key} did not change"


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_fused_experts_onto_per_expert_checkpoint(kind: str, tmp_path: Path) -> None:
    """transformers 5 saves Qwen3-MoE and Mixtral one weight per expert (experts.{e}.gate_proj / up_proj /
    down_proj; block_sparse_moe.experts.{e}.w1 / w3 / w2) and fuses them when it loads: the fused-parameter
    LoRA lands on those weights by rows."""
    base_dir, adapter_dir, merged = _moe_case(tmp_path, kind)
    on_disk = _read(base_dir)
    names = ("gate_proj", "up_proj", "down_proj") if kind == "qwen3_moe" else ("w1", "w3", "w2")
    owner = "mlp" if kind == "qwen3_moe" else next(
        k.split(".")[3] for k in on_disk if k.endswith(f"experts.1.{names[0]}.weight"))
    assert f"model.layers.0.{owner}.experts.1.{names[0]}.weight" in on_disk
    lorafuse.apply(base_dir, [adapter_dir], out=tmp_path / "out", progress=False)
    out = _read(tmp_path / "out")
    for layer in range(2):
        p, q = f"model.layers.{layer}.mlp.experts", f"model.layers.{layer}.{owner}.experts"
        gate_up, down = merged[f"{p}.gate_up_proj"], merged[f"{p}.down_proj"]
        for e in range(E):
            np.testing.assert_allclose(out[f"{q}.{e}.{names[0]}.weight"], gate_up[e, :12], rtol=0, atol=2e-6)
            np.testing.assert_allclose(out[f"{q}.{e}.{names[1]}.weight"], gate_up[e, 12:], rtol=0, atol=2e-6)
            np.testing.assert_allclose(out[f"{q}.{e}.{names[2]}.weight"], down[e], rtol=0, atol=2e-6)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    for key, value in loaded.items():
        if key in merged:
            np.testing.assert_allclose(value.float().numpy(), merged[key], rtol=0, atol=2e-6, err_msg=key)


def test_expert_rows_cost_nothing_elsewhere(tmp_path: Path) -> None:
    """Each expert is a row block of its own: a row piece of expert e gets only expert e's factors
    (d1 rows, not E * d1), and pieces end at the experts' edges."""
    base_dir, adapter_dir, _ = _moe_case(tmp_path, "qwen3_moe", fused_on_disk=True)
    plan = plan_apply(Checkpoint(base_dir), [lorafuse.load(adapter_dir)], [1.0], None, None)
    t = next(t for _, ts in plan.shards for t in ts if t.name == "model.layers.0.mlp.experts.gate_up_proj")
    assert t.shape == (E, 24, 16) and t.rows == E * 24
    stages = build_stages(t.updates, t.rows, 1)
    assert all(isinstance(s, RowBlock) and s.hi - s.lo == 24 for s in stages) and len(stages) == E
    pieces = row_pieces(t.updates, t.rows, 1000)
    assert pieces == [(24 * e, 24 * (e + 1)) for e in range(E)]
    for e, (r0, r1) in enumerate(pieces):
        got = slice_stages(stages, r0, r1)
        assert len(got) == 1 and got[0].b.shape == (24, 2), e
    assert slice_stages(stages, 0, 10)[0].b.shape == (10, 2)  # a piece inside one expert: its rows only


def test_expert_delta_is_peft_layout() -> None:
    """The per-expert factors PEFT's ParamWrapper uses (A.reshape(E, r, in), B.reshape(out, r, E)),
    checked on PEFT's own get_delta_weight."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=32, hidden_size=8, intermediate_size=8, moe_intermediate_size=6,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                         num_experts=3, num_experts_per_tok=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(Qwen3MoeForCausalLM(cfg), LoraConfig(r=2, target_modules=[],
                                                                    target_parameters=["experts.gate_up_proj"]))
    _randomize(pm, 3)
    layer = pm.base_model.model.model.layers[0].mlp.experts
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    delta = layer.get_delta_weight("default").detach()
    for e in range(3):
        mine = layer.scaling["default"] * b[:, e::3] @ a[2 * e : 2 * e + 2]
        torch.testing.assert_close(delta[e], mine)


# ------------------------------------------------------------------------------------------ per-expert 2-D


class _Experts(nn.Module):
    def __init__(self, names: tuple[str, str, str]) -> None:
        super().__init__()
        g, u, d = names
        self.experts = nn.ModuleList(
            nn.ModuleDict({g: nn.Linear(8, 12, bias=False), u: nn.Linear(8, 12, bias=False),
                           d: nn.Linear(12, 8, bias=False)}) for _ in range(E))


@pytest.mark.parametrize("names", [("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")])
def test_per_expert_linear_layers(names: tuple[str, str, str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.block_sparse_moe = _Experts(names)  # type: ignore[assignment]
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base_dir.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base_dir / "model.safetensors"))
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=list(names)))
    _randomize(pm, 2)
    pm.save_pretrained(str(adapter_dir))
    merged = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    lorafuse.apply(base_dir, [adapter_dir], out=tmp_path / "out", progress=False)
    out = _read(tmp_path / "out")
    assert len(out) == 3 * E
    for key, value in out.items():
        np.testing.assert_allclose(value, merged[key], rtol=0, atol=2e-6, err_msg=key)


# ------------------------------------------------------------------------------------------ refusals


def test_expert_lora_without_its_weights_stops_the_run(tmp_path: Path) -> None:
    base_dir, adapter_dir, _ = _moe_case(tmp_path, "gpt_oss")
    state = load_file(str(base_dir / "model.safetensors"))
    other = tmp_path / "renamed"
    other.mkdir()
    (other / "config.json").write_text((base_dir / "config.json").read_text())
    save_file({k.replace("mlp.experts.", "mlp.moe."): v for k, v in state.items()}, str(other / "model.safetensors"))
    with pytest.raises(MissingModuleError) as err:
        lorafuse.apply(other, [adapter_dir], out=tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "model.layers.0.mlp.experts.base_layer" in msg and "target_parameters" in msg
    assert not (tmp_path / "out").exists()

    # one of the two parameters gone: the wrapper that adapts it fits nothing left
    save_file({k: v for k, v in state.items() if "down_proj" not in k}, str(other / "model.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"fits none of the base's targeted parameters"):
        lorafuse.apply(other, [adapter_dir], out=tmp_path / "out", progress=False)


def test_square_experts_need_the_model_type(tmp_path: Path) -> None:
    """GPT-OSS's down_proj [E, 16, 16] fits both orientations: without config.json's model_type lorafuse
    cannot tell is_transposed, and refuses."""
    base_dir, adapter_dir, _ = _moe_case(tmp_path, "gpt_oss")
    cfg = json.loads((base_dir / "config.json").read_text())
    del cfg["model_type"]
    (base_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="cannot tell"):
        lorafuse.apply(base_dir, [adapter_dir], out=tmp_path / "out", progress=False)


def test_expert_lora_is_refused_outside_apply(tmp_path: Path) -> None:
    _, adapter_dir, _ = _moe_case(tmp_path, "llama4_text")
    adapter = lorafuse.load(adapter_dir)
    with pytest.raises(UnsupportedError, match="target_parameters"):
        adapter.norm()
    with pytest.raises(LorafuseError, match="only apply"):
        lorafuse.combine([adapter, adapter], method="cat")


def test_info_lists_expert_loras_without_a_norm(tmp_path: Path) -> None:
    """info describes an adapter with parameter LoRAs: their norm needs the base (None in JSON, 'n/a' in
    text), every other module's norm is the float64 one."""
    import subprocess
    import sys

    _, adapter_dir, _ = _moe_case(tmp_path, "llama4_text")
    adapter = lorafuse.load(adapter_dir)
    info = lorafuse.describe(adapter_dir)
    details = {m["name"]: m for m in info["module_details"]}
    params = {n for n, u in adapter.updates.items() if type(u).__name__ == "ParamLoraUpdate"}
    assert params and set(details) == set(adapter.updates)
    for name, m in details.items():
        if name in params:
            assert m["delta_norm"] is None and "target_parameters" in m["kind"]
        else:
            u = adapter.updates[name]
            b, a = (x.astype(np.float64) for x in u.factors())
            assert m["delta_norm"] == pytest.approx(u.scale * np.linalg.norm(b @ a), rel=1e-5)
    run = subprocess.run([sys.executable, "-m", "lorafuse", "info", str(adapter_dir)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "n/a (needs the base)" in run.stdout
    run = subprocess.run([sys.executable, "-m", "lorafuse", "info", "--json", str(adapter_dir)], capture_output=True,
                         text=True)
    assert run.returncode == 0 and any(m["delta_norm"] is None for m in json.loads(run.stdout)["module_details"])


# ------------------------------------------------------------------------------------------ fused projections


def _phi3_and_llama(tmp: Path) -> tuple[Path, nn.Module, nn.Module]:
    """A tiny Phi-3 checkpoint (fused qkv_proj, gate_up_proj) and a Llama holding the same weights split."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    dims = dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    phi = Phi3ForCausalLM(Phi3Config(**dims, pad_token_id=0)).eval()
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0, 0.2)
    base_dir = tmp / "phi3"
    phi.save_pretrained(str(base_dir))
    llama = LlamaForCausalLM(LlamaConfig(**dims)).eval()
    sd = phi.state_dict()
    split: dict[str, torch.Tensor] = {}
    q, kv, inter = 4 * 8, 2 * 8, 24
    for k, v in sd.items():
        if k.endswith("qkv_proj.weight"):
            p = k[: -len("qkv_proj.weight")]
            split[p + "q_proj.weight"], split[p + "k_proj.weight"], split[p + "v_proj.weight"] = (
                v[:q], v[q : q + kv], v[q + kv :])
        elif k.endswith("gate_up_proj.weight"):
            p = k[: -len("gate_up_proj.weight")]
            split[p + "gate_proj.weight"], split[p + "up_proj.weight"] = v[:inter], v[inter:]
        else:
            split[k] = v
    llama.load_state_dict(split)
    return base_dir, phi, llama


def test_split_llama_is_transformers_split(tmp_path: Path) -> None:
    """The row blocks lorafuse uses are the ones transformers' Phi-3 slices: the split Llama computes the
    same logits as the Phi-3."""
    _, phi, llama = _phi3_and_llama(tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, phi(ids).logits, rtol=1e-4, atol=2e-4)


def test_qkv_and_gate_up_adapters_onto_fused_phi3(tmp_path: Path) -> None:
    base_dir, phi, llama = _phi3_and_llama(tmp_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomize(pm, 5)
    adapter_dir = tmp_path / "adapter"
    pm.save_pretrained(str(adapter_dir))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft_logits = pm(ids).logits
    lorafuse.apply(base_dir, [adapter_dir], out=tmp_path / "out", progress=False)
    out = _read(tmp_path / "out")
    base = _read(base_dir)

    # float64 reference: each block of the fused weight plus its adapter's delta
    ad = {k: v.double().numpy() for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}

    def delta(module: str) -> np.ndarray:
        pre = f"base_model.model.{module}"
        return 2.0 * ad[pre + ".lora_B.weight"] @ ad[pre + ".lora_A.weight"]

    for layer in range(2):
        att, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        ref_qkv = base[f"{att}.qkv_proj.weight"].astype(np.float64) + np.concatenate(
            [delta(f"{att}.{n}") for n in ("q_proj", "k_proj", "v_proj")])
        ref_gu = base[f"{mlp}.gate_up_proj.weight"].astype(np.float64) + np.concatenate(
            [delta(f"{mlp}.{n}") for n in ("gate_proj", "up_proj")])
        np.testing.assert_allclose(out[f"{att}.qkv_proj.weight"], ref_qkv, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(out[f"{mlp}.gate_up_proj.weight"], ref_gu, rtol=1e-6, atol=1e-7)

    # PEFT's merge of the split model, fused again, is the same; and the merged Phi-3 computes PEFT's logits
    merged = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    for layer in range(2):
        att, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        np.testing.assert_allclose(out[f"{att}.qkv_proj.weight"], np.concatenate(
            [merged[f"{att}.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]), rtol=0, atol=2e-6)
        np.testing.assert_allclose(out[f"{mlp}.gate_up_proj.weight"], np.concatenate(
            [merged[f"{mlp}.{n}.weight"] for n in ("gate_proj", "up_proj")]), rtol=0, atol=2e-6)
    from transformers import Phi3ForCausalLM

    with torch.no_grad():
        got = Phi3ForCausalLM.from_pretrained(str(tmp_path / "out")).eval()(ids).logits
    torch.testing.assert_close(got, peft_logits, rtol=0, atol=1e-4)


def _fake(tmp: Path, config: dict[str, object], weights: dict[str, tuple[int, int]],
          modules: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    base, adapter = tmp / "base", tmp / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    save_np({k: rng.standard_normal(s).astype(np.float32) for k, s in weights.items()}, str(base / "model.safetensors"))
    tensors = {}
    for m, (out, inp) in modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = rng.standard_normal((2, inp)).astype(np.float32)
        tensors[f"base_model.model.{m}.lora_B.weight"] = rng.standard_normal((out, 2)).astype(np.float32)
    save_np(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                             "target_modules": ["q_proj", "k_proj", "v_proj"]}))
    return base, adapter


def test_interleaved_and_unknown_fused_layouts_are_refused(tmp_path: Path) -> None:
    modules = {f"gpt_neox.layers.0.attention.{n}": (8, 8) for n in ("q_proj", "k_proj", "v_proj")}
    base, adapter = _fake(tmp_path / "neox", {"model_type": "gpt_neox", "num_attention_heads": 2, "hidden_size": 8},
                          {"gpt_neox.layers.0.attention.query_key_value.weight": (24, 8)}, modules)
    with pytest.raises(MissingModuleError, match="interleaves q, k, v per head"):
        lorafuse.apply(base, [adapter], out=tmp_path / "o1", progress=False)

    modules = {f"model.layers.0.self_attn.{n}": (8, 8) for n in ("q_proj", "k_proj", "v_proj")}
    base, adapter = _fake(tmp_path / "other", {"model_type": "mystery", "num_attention_heads": 2, "hidden_size": 8},
                          {"model.layers.0.self_attn.qkv_proj.weight": (24, 8)}, modules)
    with pytest.raises(MissingModuleError, match="row layout of qkv_proj only for model types"):
        lorafuse.apply(base, [adapter], out=tmp_path / "o2", progress=False)


def test_fused_sizes_must_match_the_config(tmp_path: Path) -> None:
    modules = {f"model.layers.0.self_attn.{n}": (8, 8) for n in ("q_proj", "k_proj", "v_proj")}
    base, adapter = _fake(tmp_path, {"model_type": "phi3", "num_attention_heads": 4, "num_key_value_heads": 1,
                                     "hidden_size": 8},
                          {"model.layers.0.self_attn.qkv_proj.weight": (24, 8)}, modules)
    with pytest.raises(ShapeMismatchError, match=r"config.json's sizes give 8 \+ 2 \+ 2 = 12"):
        lorafuse.apply(base, [adapter], out=tmp_path / "o", progress=False)


# ------------------------------------------------------------------------------------------ row blocks


def test_row_blocks_match_dense_deltas() -> None:
    """Mapped updates of every kind (LoRA, LoHa, LoKr; on base rows, or delta rows onto a whole weight)
    merged through row blocks, piece by piece, equal the dense float64 deltas placed on their rows."""
    from lorafuse.backends import MergeJob, get_backend
    from lorafuse.io.tensor import Tensor
    from lorafuse.model import LoraUpdate, LycorisUpdate
    from lorafuse.ops.resolve import Contribution

    rng = np.random.default_rng(0)

    def t(*shape: int) -> Tensor:
        return Tensor.from_array(rng.standard_normal(shape).astype(np.float32))

    rows, cols = 12, 5
    lora = LoraUpdate("a", t(2, cols), t(4, 2), 0.5)
    loha = LycorisUpdate("b", "loha", "linear", (4, cols), 0.7, {"hada_w1_a": t(4, 2), "hada_w1_b": t(2, cols),
                                                                 "hada_w2_a": t(4, 2), "hada_w2_b": t(2, cols)})
    lokr = LycorisUpdate("c", "lokr", "linear", (6, cols), 2.0, {"lokr_w1": t(3, 1), "lokr_w2": t(2, cols)})
    whole = LoraUpdate("d", t(3, cols), t(rows, 3), 1.5)
    contribs = [Contribution(lora, 2.0 * lora.scale, "x", (0, 4)),
                Contribution(loha, loha.scale, "x", (4, 8)),
                Contribution(lokr, lokr.scale, "x", (8, 12), (2, 6)),
                Contribution(lora, lora.scale, "x", (4, 8)),
                Contribution(whole, whole.scale, "x")]
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    ref = w.astype(np.float64) + whole.delta()
    ref[0:4] += 2.0 * lora.delta()
    ref[4:8] += loha.delta() + lora.delta()
    ref[8:12] += lokr.delta()[2:6]
    stages = build_stages(contribs, rows, 1)
    for step in (12, 5, 3, 1):
        pieces = row_pieces(contribs, rows, step)
        assert all(r1 - r0 <= step for r0, r1 in pieces) and {4, 8} <= {r0 for r0, _ in pieces}
        out = np.empty_like(w)
        jobs = [MergeJob("w", w[r0:r1], "F32", out[r0:r1], "F32", slice_stages(stages, r0, r1)) for r0, r1 in pieces]
        get_backend("cpu").merge_batch(jobs, 1)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        # one piece over every row: blocks padded inside the piece, same result
        out2 = np.empty_like(w)
        get_backend("cpu").merge_batch([MergeJob("w", w, "F32", out2, "F32", slice_stages(stages, 0, rows))], 1)
        np.testing.assert_allclose(out2, ref, rtol=1e-5, atol=1e-5)

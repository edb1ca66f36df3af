"""Round-10 red-team findings on GGUF export of MoE models: a Mixtral base config (which llama.cpp converts as a
`llama` model, its LlamaModel registering MixtralForCausalLM) was refused as 'not an architecture lorafuse exports',
and per-expert LoRA modules (Mixtral's `experts.<e>.w1`, Qwen-MoE's `experts.<e>.gate_proj`) were refused with a
false hint ('--arch names another architecture'). References: the written file read back with gguf's GGUFReader,
in float64, against scale * B @ A of the adapter's own factors, with llama.cpp's q / k row permutation done here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import PREFIX, peft_folder, run_cli
from safetensors.numpy import load_file

gguf = pytest.importorskip("gguf")

_L = "model.layers.0."
_HEADS, _KV, _HIDDEN, _FFN = 4, 2, 16, 32


def _config(folder: Path, **extra: object) -> Path:
    folder.mkdir(parents=True)
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_attention_heads": _HEADS,
           "num_key_value_heads": _KV, "hidden_size": _HIDDEN, "intermediate_size": _FFN, "num_hidden_layers": 1,
           "num_local_experts": 2, "tie_word_embeddings": False, **extra}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "config.json"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute of a q / k weight's rows (per head, the rotary halves interleaved)."""
    rows = w.shape[0]
    out = np.empty_like(w)
    half = rows // heads // 2
    for h in range(heads):  # written out row by row: an independent reference of the reshape / swapaxes
        for i in range(half):
            out[h * 2 * half + 2 * i] = w[h * 2 * half + i]
            out[h * 2 * half + 2 * i + 1] = w[h * 2 * half + half + i]
    return out


def _read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arrays = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(
        [int(x) for x in reversed(t.shape)]) for t in reader.tensors}
    return meta, arrays


def test_a_mixtral_base_config_converts_as_llama_with_q_and_k_permuted(tmp_path: Path) -> None:
    shapes = {_L + "self_attn.q_proj": (_HIDDEN, _HIDDEN), _L + "self_attn.k_proj": (_HIDDEN * _KV // _HEADS, _HIDDEN),
              _L + "self_attn.v_proj": (_HIDDEN * _KV // _HEADS, _HIDDEN), _L + "self_attn.o_proj": (_HIDDEN, _HIDDEN),
              _L + "block_sparse_moe.gate": (2, _HIDDEN)}  # the router: llama.cpp's ffn_gate_inp
    adapter = peft_folder(tmp_path / "adapter", shapes, seed=4, rank=2, alpha=6)
    cfg = _config(tmp_path / "base")
    out = tmp_path / "mixtral-lora.gguf"
    code, _, err = run_cli(["convert", str(adapter), "--to", "gguf", "--base-config", str(cfg), "-o", str(out)])
    assert code == 0, err
    meta, arrays = _read(out)
    assert meta["general.architecture"] == "llama"  # convert_hf_to_gguf's LlamaModel writes Mixtral as llama
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert float(meta["adapter.lora.alpha"]) == 6.0  # type: ignore[arg-type]
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "block_sparse_moe.gate": "ffn_gate_inp"}
    assert set(arrays) == {f"blk.0.{g}.weight.lora_{s}" for g in names.values() for s in "ab"}
    for module, gname in names.items():
        a = sd[f"{PREFIX}{_L}{module}.lora_A.weight"].astype(np.float64)
        b = sd[f"{PREFIX}{_L}{module}.lora_B.weight"].astype(np.float64)
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            b = _permute(b, _HEADS if module == "self_attn.q_proj" else _KV)
        la, lb = arrays[f"blk.0.{gname}.weight.lora_a"], arrays[f"blk.0.{gname}.weight.lora_b"]
        assert la.shape == a.shape and lb.shape == b.shape
        np.testing.assert_allclose(6.0 / lb.shape[1] * lb @ la, 3.0 * b @ a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("module", "base"), [
    ("block_sparse_moe.experts.1.w1", "mixtral"),  # transformers < 5's per-expert Linear layers of Mixtral
    ("mlp.experts.0.gate_proj", "qwen2"),  # Qwen2-MoE's, with --arch qwen2
])
def test_per_expert_loras_are_refused_as_moe_experts(module: str, base: str, tmp_path: Path) -> None:
    shapes = {_L + "self_attn.v_proj": (_HIDDEN, _HIDDEN), _L + module: (_FFN, _HIDDEN)}
    adapter = peft_folder(tmp_path / "adapter", shapes, seed=5)
    out = tmp_path / "out.gguf"
    where = ["--base-config", str(_config(tmp_path / "base"))] if base == "mixtral" else ["--arch", base]
    code, stdout, err = run_cli(["convert", str(adapter), "--to", "gguf", *where, "-o", str(out)])
    assert code == 1, err
    assert "experts" in err and repr(_L + module) in err and "ffn_gate_exps" in err
    assert "names another architecture" not in err  # the old, false hint
    assert "Traceback" not in err and not out.exists()


# ----------------------------------------------------------------- info on GGUF LoRAs lorafuse did not write


def _lora_gguf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A GGUF LoRA adapter as llama.cpp's converter lays it out (numpy-order arrays), written by gguf's writer."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    for name, x in tensors.items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _info(path: Path) -> dict[str, object]:
    code, out, err = run_cli(["info", "--json", str(path)])
    assert code == 0, err
    return json.loads(out)


def test_info_describes_a_stacked_experts_lora(tmp_path: Path) -> None:
    # convert_lora_to_gguf.py stacks a Mixtral's per-expert LoRAs: lora_a [experts, r, in], lora_b [experts, out, r]
    rng = np.random.default_rng(1)
    path = _lora_gguf(tmp_path / "moe.gguf", {
        "blk.0.attn_q.weight.lora_a": rng.standard_normal((4, 16)).astype(np.float32),
        "blk.0.attn_q.weight.lora_b": rng.standard_normal((16, 4)).astype(np.float32),
        "blk.0.ffn_gate_exps.weight.lora_a": rng.standard_normal((3, 4, 16)).astype(np.float32),
        "blk.0.ffn_gate_exps.weight.lora_b": rng.standard_normal((3, 32, 4)).astype(np.float32)})
    d = _info(path)
    assert d["modules"] == [
        {"name": "blk.0.attn_q.weight", "rank": 4, "shape": [16, 16], "types": ["F32"]},
        {"name": "blk.0.ffn_gate_exps.weight", "rank": 4, "shape": [3, 32, 16], "types": ["F32"]}]
    assert d["ranks"] == {"4": 2} and d["notes"] == []


def test_info_names_lora_halves_llama_cpp_would_refuse(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = _lora_gguf(tmp_path / "odd.gguf", {
        "blk.0.attn_q.weight.lora_a": rng.standard_normal((4, 16)).astype(np.float32),
        "blk.0.attn_q.weight.lora_b": rng.standard_normal((16, 3)).astype(np.float32),  # rank 3 against lora_a's 4
        "blk.0.attn_v.weight.lora_b": rng.standard_normal((8, 4)).astype(np.float32),  # no lora_a
        "blk.0.ffn_up.weight.lora_a": rng.standard_normal((4, 16)).astype(np.float32),
        "blk.0.ffn_up.weight.lora_b": rng.standard_normal((32, 4)).astype(np.float32)})
    d = _info(path)
    assert d["modules"] == [{"name": "blk.0.ffn_up.weight", "rank": 4, "shape": [32, 16], "types": ["F32"]}]
    notes = " | ".join(d["notes"])  # type: ignore[arg-type]
    assert "'blk.0.attn_v.weight'" in notes and "'blk.0.attn_q.weight' (lora_a (4, 16), lora_b (16, 3))" in notes
    code, out, err = run_cli(["info", str(path)])
    assert code == 0 and "note:" in out and "blk.0.attn_v.weight" in out and "r=3" not in out


# ----------------------------------------------------------------- Phi-3: fused qkv_proj / gate_up_proj


def test_phi3_lora_is_written_with_its_fused_qkv_and_gate_up(tmp_path: Path) -> None:
    """llama.cpp's Phi3MiniModel keeps Phi-3's fused layers (attn_qkv, ffn_up holding gate and up) and has no
    tensor rewriting: the LoRA of each goes over as it is, under general.architecture 'phi3'."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=0, tie_word_embeddings=False)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj",
                                                                             "down_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    deltas = {name.removeprefix("base_model.model."): layer.get_delta_weight("default").detach().double().numpy()
              for name, layer in pm.named_modules() if isinstance(layer, LoraLayer) and "default" in layer.scaling}
    out = tmp_path / "phi3.gguf"
    code, _, err = run_cli(["convert", str(tmp_path / "adapter"), "--to", "gguf", "--base-config",
                            str(tmp_path / "base"), "-o", str(out)])
    assert code == 0, err
    meta, arrays = _read(out)
    assert meta["general.architecture"] == "phi3" and meta["general.type"] == "adapter"
    names = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    want = {f"model.layers.{i}.{m}": f"blk.{i}.{g}.weight" for i in range(2) for m, g in names.items()}
    want["lm_head"] = "output.weight"
    assert set(arrays) == {f"{g}.lora_{s}" for g in want.values() for s in "ab"}
    assert set(deltas) == set(want)
    for module, g in want.items():
        a, b = arrays[g + ".lora_a"], arrays[g + ".lora_b"]
        assert a.shape == (4, deltas[module].shape[1]) and b.shape == (deltas[module].shape[0], 4)
        np.testing.assert_allclose(8.0 / 4 * b @ a, deltas[module], rtol=1e-5, atol=1e-7)

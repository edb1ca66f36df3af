"""Round 7 red team, quantized and unusual bases for apply: FP8, bitsandbytes, MoE experts, fused projections,
GGUF. Every expected value is computed here, independently of lorafuse (torch float64, the real packages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorafuse.cli import main

F8 = torch.float8_e4m3fn
P = "base_model.model."
BLOCK_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _read(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _peft(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    folder.mkdir(parents=True)
    save_file({P + k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))


def _block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (out, in) -> (e4m3 codes, float32 scale_inv grid), amax / 448 per block (whole blocks only)."""
    o, i = w.shape
    blocks = w.reshape(o // block, block, i // block, block)
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    codes = (blocks / scale[:, None, :, None]).clamp(-448, 448).reshape(o, i).to(F8)
    return codes, scale


def _dequant_blocks(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    o, i = codes.shape
    bm, bn = o // scale.shape[0], i // scale.shape[1]  # transformers' Fp8Dequantize: the block from the grid
    return codes.double() * scale.double().repeat_interleave(bm, 0).repeat_interleave(bn, 1)


# ---------------------------------------------------------------- FP8: a per-tensor scale inside a block checkpoint


def _fp8_with_per_tensor_embedding(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A block-FP8 checkpoint (128x128 weight_scale_inv) whose embedding (300 x 256: a 3 x 2 grid of blocks) is
    float8 with ONE scale (shape []), and a PEFT LoRA on q_proj and on the embedding. Returns (base, deltas)."""
    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    codes, scale = _block_quantize(torch.randn(256, 256, generator=g) * 0.05)
    base["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight_scale_inv"] = (
        codes, scale)
    e = torch.randn(300, 256, generator=g)
    es = e.abs().max() / 448
    base["model.embed_tokens.weight"], base["model.embed_tokens.weight_scale_inv"] = (e / es).to(F8), es.reshape(())
    base["model.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    (root / "base" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "torch_dtype": "bfloat16", "quantization_config": BLOCK_FP8}))
    a, b = torch.randn(4, 256, generator=g) * 0.1, torch.randn(256, 4, generator=g) * 0.1
    ea, eb = torch.randn(4, 300, generator=g) * 0.1, torch.randn(256, 4, generator=g) * 0.1
    _peft(root / "adapter", {"model.layers.0.self_attn.q_proj.lora_A.weight": a,
                             "model.layers.0.self_attn.q_proj.lora_B.weight": b,
                             "model.embed_tokens.lora_embedding_A": ea, "model.embed_tokens.lora_embedding_B": eb},
          {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "embed_tokens"]})
    deltas = {"model.layers.0.self_attn.q_proj.weight": 2 * (b.double() @ a.double()),
              "model.embed_tokens.weight": 2 * (eb.double() @ ea.double()).T}  # PEFT's Embedding delta
    return base, deltas


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_fp8_embedding_with_a_per_tensor_scale_in_a_block_checkpoint_is_read_per_tensor(tmp_path: Path,
                                                                                          dtype: str | None) -> None:
    """transformers' Fp8Dequantize derives the block from the scale's grid: one scale is one block for the whole
    tensor. lorafuse refused such an embedding (even untargeted, with --dtype) as a misshapen scale."""
    base, deltas = _fp8_with_per_tensor_embedding(tmp_path)
    out = tmp_path / "out"
    argv = ["apply", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(out)]
    assert main(argv + (["--dtype", dtype] if dtype else [])) == 0
    got = _read(out)
    emb = "model.embed_tokens.weight"
    ref = base[emb].double() * base[emb + "_scale_inv"].double() + deltas[emb]
    q = "model.layers.0.self_attn.q_proj.weight"
    ref_q = _dequant_blocks(base[q], base[q + "_scale_inv"]) + deltas[q]
    if dtype is None:  # kept FP8: a fresh per-tensor scale of the same shape, within e4m3's rounding
        s = got[emb + "_scale_inv"]
        assert s.shape == () and s.dtype == torch.float32
        torch.testing.assert_close(s.double(), ref.abs().max() / 448, rtol=1e-6, atol=0)
        back = got[emb].double() * s.double()
        assert ((back - ref).abs() <= ref.abs() / 16 + s.double() * 2.0**-9).all()
        back_q = _dequant_blocks(got[q], got[q + "_scale_inv"])
        assert ((back_q - ref_q).norm() / ref_q.norm()).item() < 0.05
    else:
        assert set(got) == {emb, q, "model.norm.weight"} and got[emb].dtype == torch.bfloat16
        torch.testing.assert_close(got[emb].double(), ref, rtol=2.0**-8, atol=1e-30)
        torch.testing.assert_close(got[q].double(), ref_q, rtol=2.0**-8, atol=1e-30)


# ---------------------------------------------------------------- a tied lm_head untied from a quantized embedding


def _tied_fp8_embedding(root: Path, per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-FP8 checkpoint (tie_word_embeddings) whose embedding (256 x 128) is FP8 (one scale, or a 2 x 1 grid)
    and a PEFT LoRA on lm_head. Returns (the embedding dequantized in float64, the lm_head delta)."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(256, 128, generator=g)
    if per_tensor:
        s = e.abs().max() / 448
        codes, scale, full = (e / s).to(F8), s.reshape(()), s.double()
    else:
        codes, scale = _block_quantize(e)
        full = scale.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
    (root / "base").mkdir(parents=True)
    save_file({"model.embed_tokens.weight": codes, "model.embed_tokens.weight_scale_inv": scale,
               "model.norm.weight": torch.ones(128, dtype=torch.bfloat16)}, str(root / "base" / "model.safetensors"))
    (root / "base" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "torch_dtype": "bfloat16", "tie_word_embeddings": True,
         "quantization_config": BLOCK_FP8}))
    a, b = torch.randn(4, 128, generator=g) * 0.1, torch.randn(256, 4, generator=g) * 0.1
    _peft(root / "adapter", {"lm_head.lora_A.weight": a, "lm_head.lora_B.weight": b},
          {"r": 4, "lora_alpha": 8, "target_modules": ["lm_head"]})
    return codes.double() * full, 2 * (b.double() @ a.double())


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_lm_head_untied_from_an_fp8_embedding_is_the_dequantized_embedding_plus_the_delta(
        tmp_path: Path, per_tensor: bool, dtype: str | None) -> None:
    """lorafuse unties lm_head and writes it apart; it merged the LoRA into the embedding's raw float8 CODES (no
    scale: 100x off) and wrote that as BF16. The new lm_head is the embedding dequantized plus the delta,
    unquantized (transformers' FP8 quantizer leaves the output layer in 16 bits); the embedding is unchanged."""
    emb, delta = _tied_fp8_embedding(tmp_path, per_tensor)
    out = tmp_path / "out"
    argv = ["apply", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(out)]
    assert main(argv + (["--dtype", dtype] if dtype else [])) == 0
    got = _read(out)
    ref = emb + delta
    head = got["lm_head.weight"]
    assert head.dtype == (torch.float32 if dtype else torch.bfloat16) and tuple(head.shape) == (256, 128)
    if dtype:  # a float32 merge: a few float32 roundings of the largest term
        torch.testing.assert_close(head.double(), ref, rtol=0, atol=2.0**-20 * float(ref.abs().max()))
    else:  # one bf16 rounding
        torch.testing.assert_close(head.double(), ref, rtol=2.0**-8, atol=2.0**-20 * float(ref.abs().max()))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    if dtype is None:  # the embedding and its scale copied byte for byte, still FP8
        base = _read(tmp_path / "base")
        for k in ("model.embed_tokens.weight", "model.embed_tokens.weight_scale_inv"):
            assert torch.equal(got[k].reshape(-1).view(torch.uint8), base[k].reshape(-1).view(torch.uint8))
    else:
        torch.testing.assert_close(got["model.embed_tokens.weight"].double(), emb, rtol=2.0**-23, atol=1e-30)


def test_lm_head_untied_from_a_scaled_fp8_embedding_without_config_is_refused(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]
                                                                             ) -> None:
    """No quantization_config, a ComfyUI-style `scale_weight` beside a float8 embedding: merging into the codes is
    refused for the embedding itself, and must be for the lm_head written from it too (not codes as values)."""
    emb, _ = _tied_fp8_embedding(tmp_path, per_tensor=True)
    base = _read(tmp_path / "base")
    save_file({"model.embed_tokens.weight": base["model.embed_tokens.weight"],
               "model.embed_tokens.scale_weight": base["model.embed_tokens.weight_scale_inv"],
               "model.norm.weight": base["model.norm.weight"]}, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    out = tmp_path / "out"
    assert main(["apply", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "model.embed_tokens.weight" in err and "scale_weight" in err and "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------- extract's advice for a quantized checkpoint


def test_extract_refusing_a_quantized_checkpoint_gives_advice_that_works(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """extract said 'write it in bf16 first (`lorafuse apply` with --dtype bf16)', which apply refuses without an
    adapter (exit 2). The advice names a command that runs, and what it writes is the checkpoint dequantized."""
    base, deltas = _fp8_with_per_tensor_embedding(tmp_path)
    fp8, adapter = tmp_path / "base", tmp_path / "adapter"
    assert main(["apply", str(fp8), str(adapter), "-o", str(tmp_path / "tuned"), "--dtype", "bf16"]) == 0
    capsys.readouterr()
    assert main(["extract", str(tmp_path / "tuned"), str(fp8), "-o", str(tmp_path / "x"), "--rank", "4"]) == 1
    err = capsys.readouterr().err
    assert "--weights 0 --dtype bf16" in err and "ADAPTER" in err
    # the advice, followed: the FP8 checkpoint dequantized, every value rounded once to bf16
    b16 = tmp_path / "b16"
    assert main(["apply", str(fp8), str(adapter), "--weights", "0", "--dtype", "bf16", "-o", str(b16)]) == 0
    got = _read(tmp_path / "b16")
    q, emb = "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"
    want = {q: _dequant_blocks(base[q], base[q + "_scale_inv"]),
            emb: base[emb].double() * base[emb + "_scale_inv"].double()}
    for k, w in want.items():
        assert torch.equal(got[k], w.float().to(torch.bfloat16)), k
    assert main(["extract", str(tmp_path / "b16"), str(tmp_path / "tuned"), "-o", str(tmp_path / "x"),
                 "--rank", "4"]) == 0


# ---------------------------------------------------------------- GGUF: --arch against an unmapped base config


@pytest.mark.parametrize("model_type, arch", [("qwen3_moe", "qwen3"), ("qwen2_moe", "qwen2"), ("phi3", "llama")])
def test_gguf_arch_that_contradicts_the_base_configs_llama_cpp_architecture_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], model_type: str, arch: str) -> None:
    """--base-config of a Qwen3-MoE model and --arch qwen3: lorafuse wrote general.architecture 'qwen3', which
    llama.cpp refuses to load onto the 'qwen3moe' model (an arch mismatch). Contradictory options: exit 2."""
    cfg = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
           "num_hidden_layers": 1, "vocab_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    _peft(tmp_path / "adapter", {"model.layers.0.self_attn.v_proj.lora_A.weight": torch.randn(4, 64, generator=g),
                                 "model.layers.0.self_attn.v_proj.lora_B.weight": torch.randn(64, 4, generator=g)},
          {"r": 4, "lora_alpha": 8, "target_modules": ["v_proj"]})
    out = tmp_path / "lora.gguf"
    argv = ["convert", str(tmp_path / "adapter"), "--to", "gguf", "-o", str(out)]
    assert main(argv + ["--arch", arch, "--base-config", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert f"--arch {arch}" in err and model_type in err and "Traceback" not in err
    assert not out.exists()
    assert main(argv + ["--arch", arch]) == 0  # --arch alone is the user's word


# ------------------------------------------------- against transformers' own FP8 loader (CPU: dequantize)


def _load_fp8_dequantized(path: Path) -> dict[str, torch.Tensor]:
    """transformers' FP8 loader, dequantizing on CPU (FineGrainedFP8Config(dequantize=True)): its reading of the
    codes and scales, as float64."""
    import transformers

    qc = transformers.FineGrainedFP8Config(weight_block_size=[64, 64], dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), quantization_config=qc, device_map="cpu",
                                                              dtype=torch.float32)
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def test_tied_fp8_llama_with_a_per_tensor_embedding_matches_transformers(tmp_path: Path) -> None:
    """A tiny tied Llama, block-FP8 (64x64) with an FP8 embedding scaled per tensor: transformers reads the embedding
    with its one scale; lorafuse's outputs (kept FP8, and --dtype fp32) load in transformers and hold its base
    weights plus the deltas, lm_head untied."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "b16"))
    sd = _read(tmp_path / "b16")
    fp8: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if v.dim() == 2 and k.endswith("proj.weight"):
            fp8[k], fp8[k + "_scale_inv"] = _block_quantize(v.float(), 64)
        elif k == "model.embed_tokens.weight":
            s = v.float().abs().max() / 448
            fp8[k], fp8[k + "_scale_inv"] = (v.float() / s).to(F8), s.reshape(())
        else:
            fp8[k] = v
    base = tmp_path / "fp8"
    base.mkdir()
    save_file(fp8, str(base / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "b16" / "config.json").read_text())
    config["quantization_config"] = {**BLOCK_FP8, "weight_block_size": [64, 64]}
    (base / "config.json").write_text(json.dumps(config))
    theirs = _load_fp8_dequantized(base)
    emb = fp8["model.embed_tokens.weight"].double() * fp8["model.embed_tokens.weight_scale_inv"].double()
    torch.testing.assert_close(theirs["model.embed_tokens.weight"], emb, rtol=2.0**-24, atol=0)  # float32 products
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 128, generator=g) * 0.1, torch.randn(256, 4, generator=g) * 0.1
    qa, qb = torch.randn(4, 128, generator=g) * 0.1, torch.randn(128, 4, generator=g) * 0.1
    _peft(tmp_path / "adapter", {"lm_head.lora_A.weight": a, "lm_head.lora_B.weight": b,
                                 "model.layers.0.self_attn.q_proj.lora_A.weight": qa,
                                 "model.layers.0.self_attn.q_proj.lora_B.weight": qb},
          {"r": 4, "lora_alpha": 8, "target_modules": ["lm_head", "q_proj"]})
    q = "model.layers.0.self_attn.q_proj.weight"
    head = emb + 2 * (b.double() @ a.double())
    merged_q = theirs[q] + 2 * (qb.double() @ qa.double())
    out = tmp_path / "out32"
    assert main(["apply", str(base), str(tmp_path / "adapter"), "-o", str(out), "--dtype", "fp32"]) == 0
    got = _read(out)
    scale = float(head.abs().max())
    torch.testing.assert_close(got["lm_head.weight"].double(), head, rtol=0, atol=2.0**-20 * scale)
    torch.testing.assert_close(got[q].double(), merged_q, rtol=0, atol=2.0**-20 * float(merged_q.abs().max()))
    torch.testing.assert_close(got["model.embed_tokens.weight"].double(), emb, rtol=2.0**-24, atol=0)
    out8 = tmp_path / "out8"  # kept FP8: transformers loads it, lm_head a 16-bit layer of its own
    assert main(["apply", str(base), str(tmp_path / "adapter"), "-o", str(out8)]) == 0
    loaded = _load_fp8_dequantized(out8)
    torch.testing.assert_close(loaded["lm_head.weight"], head, rtol=2.0**-8, atol=2.0**-20 * scale)
    torch.testing.assert_close(loaded["model.embed_tokens.weight"], emb, rtol=2.0**-24, atol=0)
    assert ((loaded[q] - merged_q).norm() / merged_q.norm()).item() < 0.05

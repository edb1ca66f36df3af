"""apply against the real PEFT: merge_and_unload() on adapters PEFT itself saved, and logits in transformers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import peft_fixtures as pf
import pytest
import torch
from safetensors.numpy import load_file

import lorafuse

F32_EPS = float(np.finfo(np.float32).eps)


def read_checkpoint(directory: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_close_f32(got: np.ndarray, ref: np.ndarray, name: str, ulps: float = 8) -> None:
    """Within a few float32 roundings of the reference (one rounding of the output dtype plus sums)."""
    tol = ulps * F32_EPS * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


CASES: dict[str, Callable[[Path], pf.Case]] = {
    "linear": lambda t: pf.llama_case(t),
    "rslora": lambda t: pf.llama_case(t, use_rslora=True, r=8, lora_alpha=4),
    "rank_alpha_patterns": lambda t: pf.llama_case(
        t, rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2}, alpha_pattern={"down_proj": 3, "v_proj": 32}
    ),
    "dora": lambda t: pf.llama_case(t, use_dora=True),
    "embedding": lambda t: pf.llama_case(t, target_modules=("q_proj", "embed_tokens", "lm_head")),
    "embedding_dora": lambda t: pf.llama_case(t, target_modules=("q_proj", "embed_tokens"), use_dora=True),
    "lora_bias": lambda t: pf.llama_case(t, lora_bias=True),
    "modules_to_save": lambda t: pf.llama_case(t, modules_to_save=["lm_head"]),
    "sharded": lambda t: pf.llama_case(t, max_shard_size="100KB"),
    "gpt2_fan_in_fan_out": lambda t: pf.gpt2_case(t),
    "gpt2_dora": lambda t: pf.gpt2_case(t, use_dora=True),
    "gpt2_bias_rslora": lambda t: pf.gpt2_case(t, lora_bias=True, use_rslora=True),
    "conv_3x3": lambda t: pf.conv_case(t),
    "conv_1x1_5x5_bias": lambda t: pf.conv_case(t, kernel_size=5, lora_bias=True),
    "conv_dora": lambda t: pf.conv_case(t, use_dora=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_apply_equals_peft_merge_and_unload(name: str, tmp_path: Path) -> None:
    case = CASES[name](tmp_path)
    out = tmp_path / "merged"
    report = lorafuse.apply(case.base_dir, [case.adapter_dir], out=out, progress=False)
    got = read_checkpoint(out)
    assert set(got) == set(case.merged_state)
    for key, ref in case.merged_state.items():
        assert got[key].dtype == np.float32
        assert_close_f32(got[key], ref, key)
    assert report.merged, "nothing was merged"
    if name == "sharded":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        base_index = json.loads((case.base_dir / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == base_index["weight_map"]
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in got.values())


@pytest.mark.parametrize("name", ["dora", "conv_dora"])
def test_dora_weights_split_into_row_blocks_still_match_peft(name: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights larger than CHUNK_BYTES are merged in row blocks; each block takes its rows' DoRA
    magnitudes (before, the whole magnitude vector went with every block and the core refused it)."""
    import lorafuse.ops.apply as apply_mod

    case = CASES[name](tmp_path)
    monkeypatch.setattr(apply_mod, "CHUNK_BYTES", 512)
    out = tmp_path / "merged"
    lorafuse.apply(case.base_dir, [case.adapter_dir], out=out, progress=False)
    got = read_checkpoint(out)
    sizes = [v.nbytes for k, v in got.items() if k in case.merged_state]
    assert max(sizes) > 4 * 512, "the test needs weights that are split into several row blocks"
    for key, ref in case.merged_state.items():
        assert_close_f32(got[key], ref, key)


def _outputs(model: torch.nn.Module, case: pf.Case) -> torch.Tensor:
    with torch.no_grad():
        if case.input_ids is not None:
            return model(case.input_ids).logits
        return model(case.example_input)


@pytest.mark.parametrize("name", ["linear", "dora", "embedding_dora", "gpt2_dora", "lora_bias", "conv_dora",
                                  "modules_to_save"])
def test_merged_checkpoint_loads_and_matches_peft_logits(name: str, tmp_path: Path) -> None:
    case = CASES[name](tmp_path)
    out = tmp_path / "merged"
    lorafuse.apply(case.base_dir, [case.adapter_dir], out=out, progress=False)
    merged = case.model_cls.from_pretrained(str(out)).eval()
    got, ref = _outputs(merged, case), _outputs(case.peft_model, case)
    base = _outputs(case.model_cls.from_pretrained(str(case.base_dir)).eval(), case)
    assert (ref - base).abs().max() > 1e-3, "the adapter must change the outputs for this test to mean anything"
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("targets", [("q_proj", "lm_head"), ("q_proj", "embed_tokens"), ("embed_tokens", "lm_head")])
def test_tied_embeddings_are_untied_and_match_the_unmerged_model(targets: tuple[str, ...], tmp_path: Path) -> None:
    """PEFT merges into the shared tensor (its merged model no longer computes what the adapter computed);
    lorafuse unties lm_head from embed_tokens so the merged model equals the unmerged PEFT model."""
    case = pf.llama_case(tmp_path, tie_word_embeddings=True, target_modules=targets)
    assert not case.merge_matches_forward  # PEFT's own merge is off here
    out = tmp_path / "merged"
    report = lorafuse.apply(case.base_dir, [case.adapter_dir], out=out, progress=False)
    assert any("untied" in n for n in report.notes)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    got = read_checkpoint(out)
    assert "lm_head.weight" in got and "lm_head.weight" not in read_checkpoint(case.base_dir)
    merged = case.model_cls.from_pretrained(str(out)).eval()
    torch.testing.assert_close(_outputs(merged, case), _outputs(case.peft_model, case), rtol=0, atol=1e-4)


def test_bf16_base_is_rounded_once_from_float64(tmp_path: Path) -> None:
    """A bf16 base: every merged value is the float64 merge rounded to bf16 (at most one rounding off)."""
    case = pf.llama_case(tmp_path, dtype=torch.bfloat16)
    out = tmp_path / "merged"
    lorafuse.apply(case.base_dir, [case.adapter_dir], out=out, progress=False)
    adapter = load_file(str(case.adapter_dir / "adapter_model.safetensors"))
    cfg = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    from safetensors.torch import load_file as load_torch

    base = load_torch(str(case.base_dir / "model.safetensors"))
    merged = load_torch(str(out / "model.safetensors"))
    checked = 0
    for key, w in base.items():
        module = "base_model.model." + key.removesuffix(".weight")
        ref = w.double()
        if module + ".lora_A.weight" in adapter:
            b = adapter[module + ".lora_B.weight"].astype(np.float64)
            a = adapter[module + ".lora_A.weight"].astype(np.float64)
            ref = ref + torch.from_numpy(scale * (b @ a))
            checked += 1
        assert merged[key].dtype == torch.bfloat16
        rounded = ref.to(torch.bfloat16)  # correctly rounded reference
        diff = (merged[key].view(torch.int16).int() - rounded.view(torch.int16).int()).abs()
        assert int(diff.max()) <= 1, f"{key}: more than one bf16 ulp from the float64 merge"
        assert float((diff == 0).double().mean()) > 0.99, f"{key}: not rounded once"
    assert checked == 14
    # and transformers loads it with logits close to PEFT's (bf16 arithmetic)
    model = case.model_cls.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    torch.testing.assert_close(_outputs(model, case).float(), _outputs(case.peft_model, case).float(),
                               rtol=0, atol=0.1)


def test_two_adapters_with_weights_against_numpy(tmp_path: Path) -> None:
    first = pf.llama_case(tmp_path / "a", seed=0)
    second = pf.llama_case(tmp_path / "b", seed=0, target_modules=("q_proj", "v_proj", "down_proj"), r=2,
                           lora_alpha=5, use_rslora=True)
    # same seed -> identical base weights; the adapters differ in targets, ranks and scaling
    out = tmp_path / "merged"
    lorafuse.apply(first.base_dir, [first.adapter_dir, second.adapter_dir], weights=[0.75, -1.5], out=out,
                   progress=False)
    got = read_checkpoint(out)
    base = read_checkpoint(first.base_dir)
    for key, w in base.items():
        ref = w.astype(np.float64)
        for case, weight in ((first, 0.75), (second, -1.5)):
            ad = load_file(str(case.adapter_dir / "adapter_model.safetensors"))
            cfg = json.loads((case.adapter_dir / "adapter_config.json").read_text())
            scale = cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
            module = "base_model.model." + key.removesuffix(".weight")
            if module + ".lora_A.weight" in ad:
                ref = ref + weight * scale * (ad[module + ".lora_B.weight"].astype(np.float64)
                                              @ ad[module + ".lora_A.weight"].astype(np.float64))
        assert_close_f32(got[key], ref, key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_stored_in_half_precision(dtype: torch.dtype, tmp_path: Path) -> None:
    """Adapters saved in BF16/F16 merge with their exact stored values (checked against numpy float64)."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    case = pf.llama_case(tmp_path)
    weights = case.adapter_dir / "adapter_model.safetensors"
    half = {k: v.to(dtype) for k, v in load_torch(str(weights)).items()}
    save_torch(half, str(weights), metadata={"format": "pt"})
    adapter = lorafuse.load(case.adapter_dir)
    assert {u.A.dtype for u in adapter.updates.values()} == {"BF16" if dtype == torch.bfloat16 else "F16"}
    out = tmp_path / "merged"
    lorafuse.apply(case.base_dir, [adapter], out=out, progress=False)
    got, base = read_checkpoint(out), read_checkpoint(case.base_dir)
    cfg = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    for key, w in base.items():
        module = "base_model.model." + key.removesuffix(".weight")
        ref = w.astype(np.float64)
        if module + ".lora_A.weight" in half:
            b = half[module + ".lora_B.weight"].double().numpy()
            a = half[module + ".lora_A.weight"].double().numpy()
            ref = ref + cfg["lora_alpha"] / cfg["r"] * (b @ a)
        assert_close_f32(got[key], ref, key)


def test_thread_count_does_not_change_a_bit(tmp_path: Path) -> None:
    case = pf.llama_case(tmp_path, use_dora=True, target_modules=("q_proj", "v_proj", "embed_tokens", "down_proj"))
    outs = []
    for threads in (1, 2, 3):
        out = tmp_path / f"merged_{threads}"
        lorafuse.apply(case.base_dir, [case.adapter_dir], out=out, threads=threads, progress=False)
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_progress_bar_reports_bytes(tmp_path: Path) -> None:
    import io

    from lorafuse._progress import Progress

    stream = io.StringIO()
    bar = Progress(2048, "apply", enabled=True, stream=stream)
    bar.update(1024, "a")
    bar.update(1024, "b")
    bar.close()
    text = stream.getvalue()
    assert "100.0%" in text and "2.0 KiB/2.0 KiB" in text and text.endswith("\n")


def test_progress_bar_counts_modules() -> None:
    import io

    from lorafuse._progress import Progress

    stream = io.StringIO()
    bar = Progress(154, "resize", enabled=True, stream=stream, unit="modules")
    bar.update(154, "last")
    assert "154/154 modules" in stream.getvalue()

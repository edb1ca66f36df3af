"""Round 15 red team, PEFT merge parity: trainable_token_indices (PEFT's TrainableTokens rows) merged as PEFT's
merge_and_unload() merges them, and exact arithmetic (scaling, sums) on adapters with lora_bias."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file as load_pt
from transformers import LlamaConfig, LlamaForCausalLM

import lorafuse
from lorafuse.errors import AdapterNote, LorafuseError, UnsupportedError

EMB = "model.embed_tokens.weight"


def _base(folder: Path, tie: bool = False, dtype: torch.dtype = torch.float32, bias: bool = False) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=64, tie_word_embeddings=tie, attention_bias=bias)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder)
    return folder


def _adapter(base: Path, folder: Path, seed: int = 1, **kw: object) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**kw))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, t in p.named_parameters():
                if "lora_" in n or "trainable_tokens_delta" in n:
                    t.copy_(torch.randn(t.shape, generator=g))
        p.save_pretrained(folder)
    return folder


def _peft_merged(base: Path, adapter: Path) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        merged = m.merge_and_unload()
    return {k: v.detach().double().numpy() for k, v in merged.state_dict().items()}


def _check_against(out: Path, ref: dict[str, np.ndarray], stored: set[str]) -> None:
    got = load_np(str(out / "model.safetensors"))
    assert set(got) == stored
    for k in stored:
        g = got[k].astype(np.float64)
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            np.testing.assert_array_equal(g, ref[k], err_msg=k)  # rows copied, not computed
        else:
            np.testing.assert_allclose(g, ref[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _base(tmp_path_factory.mktemp("untied") / "base")


def test_trainable_tokens_list_merged_as_peft(untied: Path, tmp_path: Path) -> None:
    ad = _adapter(untied, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[1, 5, 63])
    ref = _peft_merged(untied, ad)
    rep = lorafuse.apply(untied, [ad], out=tmp_path / "o")
    _check_against(tmp_path / "o", ref, set(load_np(str(untied / "model.safetensors"))))
    base = load_np(str(untied / "model.safetensors"))[EMB]
    changed = np.flatnonzero((load_np(str(tmp_path / "o" / "model.safetensors"))[EMB] != base).any(axis=1))
    assert changed.tolist() == [1, 5, 63]
    assert EMB in rep.replaced


def test_trainable_tokens_dict_two_modules_merged_as_peft(untied: Path, tmp_path: Path) -> None:
    ad = _adapter(untied, tmp_path / "a", target_modules=["v_proj"],
                  trainable_token_indices={"embed_tokens": [2, 3], "lm_head": [0, 7, 40]})
    ref = _peft_merged(untied, ad)
    lorafuse.apply(untied, [ad], out=tmp_path / "o")
    _check_against(tmp_path / "o", ref, set(load_np(str(untied / "model.safetensors"))))


def test_trainable_tokens_tied_model_stays_tied_as_peft(tmp_path: Path) -> None:
    """PEFT ties the output layer's token adapter to the embedding's: both get the rows, the model stays tied."""
    base = _base(tmp_path / "b", tie=True)
    ad = _adapter(base, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[4, 9])
    ref = _peft_merged(base, ad)
    np.testing.assert_array_equal(ref["lm_head.weight"], ref[EMB])
    lorafuse.apply(base, [ad], out=tmp_path / "o")
    _check_against(tmp_path / "o", ref, set(load_np(str(base / "model.safetensors"))))
    assert json.loads((tmp_path / "o" / "config.json").read_text()).get("tie_word_embeddings") is True


def test_trainable_tokens_rows_cast_to_bf16_embedding_as_peft(tmp_path: Path) -> None:
    """PEFT's merge: W.index_copy(0, ids, delta.to(W)): the rows rounded to the embedding's dtype once."""
    base = _base(tmp_path / "b", dtype=torch.bfloat16)
    ad = _adapter(base, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[0, 33])
    w = load_pt(str(base / "model.safetensors"))[EMB]
    delta = load_pt(str(ad / "adapter_model.safetensors"))[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    expected = w.index_copy(0, torch.tensor([0, 33]), delta.to(w))
    lorafuse.apply(base, [ad], out=tmp_path / "o")
    got = load_pt(str(tmp_path / "o" / "model.safetensors"))[EMB]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_trainable_tokens_weight_refused_with_reason(untied: Path, tmp_path: Path) -> None:
    ad = _adapter(untied, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[1])
    with pytest.raises(UnsupportedError, match="cannot be scaled") as e:
        lorafuse.apply(untied, [ad], weights=[0.5], out=tmp_path / "o")
    assert "trainable" in str(e.value) and EMB in str(e.value)
    assert not (tmp_path / "o").exists()


def test_trainable_tokens_out_of_range_refused(untied: Path, tmp_path: Path) -> None:
    ad = _adapter(untied, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[1, 2])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = [1, 64]  # a vocabulary of 64 rows
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LorafuseError, match="64"):
        lorafuse.apply(untied, [ad], out=tmp_path / "o")


def test_trainable_tokens_combine_refused_naming_them(untied: Path, tmp_path: Path) -> None:
    ad = _adapter(untied, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[1])
    with pytest.raises(UnsupportedError, match="trainable token rows"):
        lorafuse.load(ad) * 2.0


# ---- lora_bias: scaling and sums are exact (a merge adds scale * bias beside scale * B @ A) ----------------


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("biased")
    base = _base(root / "base", bias=True)
    a = _adapter(base, root / "a", target_modules=["q_proj", "v_proj"], lora_bias=True, r=4, lora_alpha=8)
    b = _adapter(base, root / "b", seed=3, target_modules=["q_proj", "k_proj"], lora_bias=True, r=2, lora_alpha=4)
    return base, a, b


def _deltas(base: Path, adapter: Path) -> dict[str, np.ndarray]:
    ref = _peft_merged(base, adapter)
    w = load_np(str(base / "model.safetensors"))
    return {k: ref[k] - w[k].astype(np.float64) for k in w}


@pytest.mark.parametrize("c", [0.5, -3.0])
def test_lora_bias_scaled_merges_as_c_times_peft(biased: tuple[Path, Path, Path], tmp_path: Path, c: float) -> None:
    base, a, _ = biased
    (lorafuse.load(a) * c).save(tmp_path / "s", format="peft")
    lorafuse.apply(base, [tmp_path / "s"], out=tmp_path / "o")
    w, got, d = load_np(str(base / "model.safetensors")), load_np(str(tmp_path / "o" / "model.safetensors")), \
        _deltas(base, a)
    assert any(k.endswith("q_proj.bias") and np.abs(d[k]).max() > 0 for k in d)
    for k in w:
        np.testing.assert_allclose(got[k], w[k] + c * d[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_lora_bias_difference_merges_as_peft(biased: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, a, b = biased
    (lorafuse.load(a) - 0.25 * lorafuse.load(b)).save(tmp_path / "d", format="peft")
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["lora_bias"] is True
    lorafuse.apply(base, [tmp_path / "d"], out=tmp_path / "o")
    w, got = load_np(str(base / "model.safetensors")), load_np(str(tmp_path / "o" / "model.safetensors"))
    da, db = _deltas(base, a), _deltas(base, b)
    for k in w:
        np.testing.assert_allclose(got[k], w[k] + da[k] - 0.25 * db[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_lora_bias_svd_combine_still_refused_with_reason(biased: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, a, b = biased
    with pytest.raises(UnsupportedError, match="lora_B bias.*exact adapter arithmetic carries it"):
        lorafuse.combine([a, b], method="svd", rank=2)


def _token_delta(adapter: Path, module: str = "model.embed_tokens") -> np.ndarray:
    key = f"base_model.model.{module}.token_adapter.trainable_tokens_delta"
    return load_np(str(adapter / "adapter_model.safetensors"))[key].astype(np.float64)


def test_trainable_tokens_tied_rows_reach_lm_head_when_another_adapter_unties(tmp_path: Path) -> None:
    """Tokens on a tied embedding and another adapter's LoRA on the embedding: the model is written untied (the
    LoRA changes the embedding alone), and the tied output layer still gets the token rows (PEFT ties them)."""
    base = _base(tmp_path / "b", tie=True)
    tokens = _adapter(base, tmp_path / "t", target_modules=["q_proj"], trainable_token_indices=[4, 9])
    lora = _adapter(base, tmp_path / "l", seed=5, target_modules=["embed_tokens"], r=2, lora_alpha=4)
    lorafuse.apply(base, [tokens, lora], out=tmp_path / "o")
    out = load_np(str(tmp_path / "o" / "model.safetensors"))
    rows = load_np(str(base / "model.safetensors"))[EMB].astype(np.float64)
    rows[[4, 9]] = _token_delta(tokens)
    f = load_np(str(lora / "adapter_model.safetensors"))
    a = f["base_model.model.model.embed_tokens.lora_embedding_A"].astype(np.float64)
    b = f["base_model.model.model.embed_tokens.lora_embedding_B"].astype(np.float64)
    np.testing.assert_allclose(out[EMB], rows + 2.0 * (b @ a).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["lm_head.weight"].astype(np.float64), rows)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is False


def test_trainable_tokens_of_two_adapters(untied: Path, tmp_path: Path) -> None:
    one = _adapter(untied, tmp_path / "a1", target_modules=["q_proj"], trainable_token_indices=[4, 9])
    two = _adapter(untied, tmp_path / "a2", seed=7, target_modules=["q_proj"], trainable_token_indices=[10, 11])
    lorafuse.apply(untied, [one, two], out=tmp_path / "o")
    rows = load_np(str(untied / "model.safetensors"))[EMB].astype(np.float64)
    rows[[4, 9]], rows[[10, 11]] = _token_delta(one), _token_delta(two)
    np.testing.assert_array_equal(load_np(str(tmp_path / "o" / "model.safetensors"))[EMB], rows)
    three = _adapter(untied, tmp_path / "a3", seed=8, target_modules=["q_proj"], trainable_token_indices=[9, 12])
    with pytest.raises(UnsupportedError, match=r"both replace rows \[9\]"):
        lorafuse.apply(untied, [one, three], out=tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_trainable_tokens_stored_tied_lm_head_gets_the_rows(tmp_path: Path) -> None:
    """A tied model whose checkpoint stores lm_head.weight too: transformers ties them, PEFT's merged model has the
    rows in both; the output keeps them equal (and tied)."""
    from safetensors.numpy import save_file

    base = _base(tmp_path / "b", tie=True)
    ad = _adapter(base, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[3])
    ref = _peft_merged(base, ad)
    st = load_np(str(base / "model.safetensors"))
    st["lm_head.weight"] = st[EMB].copy()
    save_file(st, str(base / "model.safetensors"), metadata={"format": "pt"})
    lorafuse.apply(base, [ad], out=tmp_path / "o")
    out = load_np(str(tmp_path / "o" / "model.safetensors"))
    np.testing.assert_array_equal(out["lm_head.weight"].astype(np.float64), ref["lm_head.weight"])
    np.testing.assert_array_equal(out[EMB].astype(np.float64), ref[EMB])


def test_trainable_tokens_dry_run_and_resize(untied: Path, tmp_path: Path) -> None:
    ad = _adapter(untied, tmp_path / "a", target_modules=["q_proj"], r=4,
                  trainable_token_indices={"embed_tokens": [1, 5], "lm_head": [2]})
    from lorafuse.ops.plan import plan_apply

    plan = plan_apply(untied, [ad], out=tmp_path / "o")
    assert sorted(plan.details["replaced"]) == ["lm_head.weight", EMB]
    assert plan.details["copied"] == len(load_np(str(untied / "model.safetensors"))) - 4
    lorafuse.resize(ad, 4, out=tmp_path / "r")  # the LoRA resized, the token rows kept as they are
    assert json.loads((tmp_path / "r" / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "embed_tokens": [1, 5], "lm_head": [2]}
    ref = _peft_merged(untied, tmp_path / "r")
    lorafuse.apply(untied, [tmp_path / "r"], out=tmp_path / "o")
    _check_against(tmp_path / "o", ref, set(load_np(str(untied / "model.safetensors"))))


def test_trainable_tokens_of_a_tied_output_layer_alone_untie_as_the_forward(tmp_path: Path) -> None:
    """Token rows of lm_head alone in a tied model (PEFT does not tie them to the embedding): written apart, the
    merged model computes what the unmerged PEFT model computes (PEFT's own merge writes them into the shared
    tensor, the embedding too)."""
    base = _base(tmp_path / "b", tie=True)
    ad = _adapter(base, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices={"lm_head": [3, 4]})
    lorafuse.apply(base, [ad], out=tmp_path / "o")
    out = load_np(str(tmp_path / "o" / "model.safetensors"))
    emb = load_np(str(base / "model.safetensors"))[EMB]
    np.testing.assert_array_equal(out[EMB], emb)
    rows = emb.astype(np.float64)
    rows[[3, 4]] = _token_delta(ad, "lm_head")
    np.testing.assert_array_equal(out["lm_head.weight"].astype(np.float64), rows)
    ids = torch.tensor([[1, 3, 4, 7, 9]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), ad).eval()
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "o").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(ids).logits.numpy(), peft_model(ids).logits.numpy(), atol=1e-4)


@pytest.mark.parametrize("bad", [[1, 1], [-1], {"embed_tokens": "x"}, "abc", [True]])
def test_trainable_token_indices_checked_as_config(untied: Path, tmp_path: Path, bad: object) -> None:
    ad = _adapter(untied, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[1])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = bad
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(lorafuse.FormatError, match="'trainable_token_indices' must be a list of distinct token ids"):
        lorafuse.load(ad)


def test_trainable_tokens_config_naming_no_saved_module_refused(untied: Path, tmp_path: Path) -> None:
    ad = _adapter(untied, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices={"lm_head": [3]})
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = {"embed_tokens": [3]}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="no trainable_token_indices entry that module 'lm_head' ends with"):
        lorafuse.apply(untied, [ad], out=tmp_path / "o")


@pytest.mark.parametrize("value, dtype", [(float("nan"), torch.float32), (1e6, torch.float16)])
def test_trainable_token_rows_not_finite_are_named(tmp_path: Path, value: float, dtype: torch.dtype) -> None:
    """A NaN row value, or one beyond the F16 embedding's range (PEFT's cast makes it Inf): the error names the
    adapter's token rows, not the base weight."""
    from safetensors.numpy import save_file

    base = _base(tmp_path / "b", dtype=dtype)
    ad = _adapter(base, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[2, 3])
    f = load_np(str(ad / "adapter_model.safetensors"))
    f["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"][1, 4] = value
    save_file(f, str(ad / "adapter_model.safetensors"))
    with pytest.raises(lorafuse.NonFiniteError, match=r"trainable token rows .* in row 3") as e:
        lorafuse.apply(base, [ad], out=tmp_path / "o")
    assert "base weight" not in str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("variant", ["velora_config", "monteclora_config"])
def test_plain_merging_lora_variants_merged_as_peft(untied: Path, tmp_path: Path, variant: str) -> None:
    """VeLoRA (a custom backward) and MonteCLoRA (Monte Carlo sampling while training): PEFT's merge_and_unload
    merges both as plain LoRAs; their files also hold training-time tensors, left out with a note."""
    from peft import MontecloraConfig, VeloraConfig

    sub = VeloraConfig() if variant == "velora_config" else MontecloraConfig()
    ad = _adapter(untied, tmp_path / "a", target_modules=["q_proj", "v_proj"], r=4, **{variant: sub})
    assert any("velora" in k or "monteclora" in k for k in load_np(str(ad / "adapter_model.safetensors")))
    ref = _peft_merged(untied, ad)
    with pytest.warns(AdapterNote, match=f"{variant}: merged as a plain LoRA.*(4|16) tensors"):
        lorafuse.apply(untied, [ad], out=tmp_path / "o")
    _check_against(tmp_path / "o", ref, set(load_np(str(untied / "model.safetensors"))))


def test_trainable_tokens_list_form_with_rows_of_two_modules_refused(untied: Path, tmp_path: Path) -> None:
    """A list names one module (the input embedding, which PEFT wraps); a file holding rows of two modules under a
    list (hand-edited: PEFT never writes one) is refused rather than applied to both."""
    ad = _adapter(untied, tmp_path / "a", target_modules=["q_proj"],
                  trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [3, 4]})
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = [1, 2]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="token rows of 2 modules"):
        lorafuse.apply(untied, [ad], out=tmp_path / "o")
    assert not (tmp_path / "o").exists()

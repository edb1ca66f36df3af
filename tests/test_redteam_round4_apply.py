"""Red-team round 4, `apply` on real model layouts (transformers 5, PEFT-saved adapters): tied output layers not
named lm_head, --weights with modules_to_save, layouts transformers renames as it loads, and T5 / BART layers tied
to `shared`. References: transformers' loading of the output, the unmerged PEFT model's logits, PEFT's
merge_and_unload, and float64 numpy on the adapter's factors."""

from __future__ import annotations

import copy
import json
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import MissingModuleError, UnsupportedError
from lorafuse.ops.match import checkpoint_keys
from lorafuse.ops.tied import TIED_OUTPUTS

VOCAB = 96
BERT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=70)
WHISPER = dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=16,
               max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0)
TXT = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, head_dim=8)
VIS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=32,
           patch_size=8)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
           num_attention_heads=4)


def _state(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@torch.no_grad()
def _case(folder: Path, model: Any, lora: LoraConfig, seed: int = 0) -> tuple[Path, Path, PeftModel]:
    """The base (save_pretrained, weights nudged off their init) and a PEFT adapter with random factors (and
    trained modules_to_save copies) saved by PEFT; returns them and the unmerged PeftModel."""
    torch.manual_seed(seed)
    model = model.eval()
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(folder / "base"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(model), lora)
        for name, p in pm.named_parameters():
            if any(f".{r}." in name for r in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
                p.copy_(torch.randn_like(p) * 0.1)
            elif ".modules_to_save." in name:
                p.add_(1.0)
        pm.save_pretrained(str(folder / "adapter"))
    return folder / "base", folder / "adapter", pm.eval()


def _peft_merged(pm: PeftModel, folder: Path) -> dict[str, np.ndarray]:
    """PEFT's merge_and_unload, saved by transformers (the checkpoint's own names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy.deepcopy(pm).merge_and_unload().save_pretrained(str(folder))
    return _state(folder)


def _lora(adapter: Path, module: str) -> tuple[np.ndarray, float]:
    """B @ A (float64) of a PEFT module and its scale alpha / r."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(str(adapter / "adapter_model.safetensors"))
    pre = f"base_model.model.{module}."
    if pre + "lora_embedding_A" in t:  # an embedding: delta = (B @ A)^T, (num_embeddings, dim)
        delta = (t[pre + "lora_embedding_B"].astype(np.float64) @ t[pre + "lora_embedding_A"].astype(np.float64)).T
    else:
        delta = t[pre + "lora_B.weight"].astype(np.float64) @ t[pre + "lora_A.weight"].astype(np.float64)
    return delta, cfg["lora_alpha"] / cfg["r"]


def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------- 1. tied output layers not named lm_head

_TIED = {  # model, the auto class, the embedding module, inputs, the output layer's keys
    "bert_mlm": (lambda: tf.BertForMaskedLM(tf.BertConfig(**BERT)), tf.AutoModelForMaskedLM,
                 "bert.embeddings.word_embeddings", lambda: {"input_ids": torch.randint(0, VOCAB, (2, 7))},
                 {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                  "cls.predictions.decoder.bias": "cls.predictions.bias"}),
    "roberta_mlm": (lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(**BERT, pad_token_id=1)), tf.AutoModelForMaskedLM,
                    "roberta.embeddings.word_embeddings",
                    lambda: {"input_ids": torch.randint(3, VOCAB, (2, 7))},
                    {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                     "lm_head.decoder.bias": "lm_head.bias"}),
    "distilbert_mlm": (lambda: tf.DistilBertForMaskedLM(tf.DistilBertConfig(
                           vocab_size=VOCAB, dim=32, hidden_dim=48, n_layers=1, n_heads=4, max_position_embeddings=64)),
                       tf.AutoModelForMaskedLM, "distilbert.embeddings.word_embeddings",
                       lambda: {"input_ids": torch.randint(0, VOCAB, (2, 7))},
                       {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}),
    "whisper": (lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(**WHISPER)),
                tf.AutoModelForSpeechSeq2Seq, "model.decoder.embed_tokens",
                lambda: {"input_features": torch.randn(1, 16, 32),
                         "decoder_input_ids": torch.randint(0, VOCAB, (1, 5))},
                {"proj_out.weight": "model.decoder.embed_tokens.weight"}),
}


@pytest.mark.parametrize("name", list(_TIED))
def test_an_embedding_lora_unties_the_output_layer_the_architecture_names(name: str, tmp_path: Path) -> None:
    """A LoRA on the input embedding of a model whose tied output layer is not lm_head (BERT's
    cls.predictions.decoder, RoBERTa's lm_head.decoder, DistilBERT's vocab_projector, Whisper's proj_out): the
    output layer is written under its own name (with the bias BERT ties alongside), nothing else is added, and
    the merged model loads without missing keys and equals the unmerged PEFT model (it wrote a stray
    lm_head.weight, and transformers gave the real head random weights)."""
    make, auto, emb, inputs, outputs = _TIED[name]
    base, adapter, pm = _case(tmp_path, make(), LoraConfig(r=4, lora_alpha=8, target_modules=[emb.rsplit(".", 1)[-1]],
                                                            init_lora_weights=False))
    report = lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    got, was = _state(tmp_path / "out"), _state(base)
    assert set(got) - set(was) == set(outputs)
    for layer, src in outputs.items():  # the output layer keeps the base's weight, byte for byte
        assert np.array_equal(got[layer], was[src]), layer
    delta, scale = _lora(adapter, emb)
    ref = was[f"{emb}.weight"].astype(np.float64) + scale * delta
    assert np.abs(got[f"{emb}.weight"] - ref).max() <= 1e-6 * np.abs(ref).max()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("untied" in n and next(iter(outputs)) in n for n in report.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, info = auto.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.manual_seed(5)
    x = inputs()
    torch.testing.assert_close(_logits(merged.eval(), x), _logits(pm, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["bert_mlm", "whisper"])
def test_the_output_layer_table_works_without_transformers(name: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers is optional at run time: the table alone names the tied output layer."""
    make, _, emb, _, outputs = _TIED[name]
    base, adapter, _ = _case(tmp_path, make(), LoraConfig(r=2, target_modules=[emb.rsplit(".", 1)[-1]],
                                                          init_lora_weights=False))
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    assert set(_state(tmp_path / "out")) - set(_state(base)) == set(outputs)


def test_the_output_layer_table_agrees_with_transformers() -> None:
    """TIED_OUTPUTS is transformers' `_tied_weights_keys` of each architecture it lists (where installed)."""
    checked = 0
    for arch, ties in TIED_OUTPUTS.items():
        cls = getattr(tf, arch, None)
        if cls is None:
            continue
        assert cls._tied_weights_keys == ties, arch
        checked += 1
    assert checked >= 60


def test_a_head_without_a_tied_output_gets_no_stray_lm_head(tmp_path: Path) -> None:
    """BertForSequenceClassification ties nothing to its embedding (config.json still says
    tie_word_embeddings=true): the embedding is merged, no lm_head.weight appears and config.json keeps its tie."""
    base, adapter, pm = _case(tmp_path, tf.BertForSequenceClassification(tf.BertConfig(**BERT, num_labels=3)),
                              LoraConfig(r=4, target_modules=["word_embeddings", "query"], init_lora_weights=False))
    report = lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    assert set(_state(tmp_path / "out")) == set(_state(base))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert not any("untied" in n for n in report.notes)
    merged = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    x = {"input_ids": torch.randint(0, VOCAB, (2, 7))}
    torch.testing.assert_close(_logits(merged, x), _logits(pm, x), rtol=0, atol=1e-5)


def test_an_output_layer_that_cannot_be_known_is_refused(tmp_path: Path) -> None:
    """A tied config whose architecture lorafuse cannot name the output layer of (no `architectures`, a model
    type whose heads differ; an architecture neither the table nor transformers knows): an embedding LoRA is
    refused, naming the module and the reason, instead of guessing lm_head."""
    base, adapter, _ = _case(tmp_path, tf.BertForMaskedLM(tf.BertConfig(**BERT)),
                             LoraConfig(r=2, target_modules=["word_embeddings"], init_lora_weights=False))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "architectures"}))
    with pytest.raises(UnsupportedError, match=re.escape(
            f"{adapter}: module 'bert.embeddings.word_embeddings' changes 'bert.embeddings.word_embeddings.weight', "
            "the input embedding, and config.json ties the model's output layer to it (tie_word_embeddings), but "
            "config.json names no architecture, and 'bert' models name their tied output layer by their head")):
        lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["MyBertForMaskedLM"]}))
    with pytest.raises(UnsupportedError, match=r"lorafuse does not know which output layer MyBertForMaskedLM ties"):
        lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 2. --weights and modules_to_save


def _seq_cls(tmp_path: Path) -> tuple[Path, Path]:
    base, adapter, _ = _case(tmp_path, tf.BertForSequenceClassification(tf.BertConfig(**BERT, num_labels=3)),
                             LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS", init_lora_weights=False))
    return base, adapter


@pytest.mark.parametrize("weight", [0.0, -1.0, 0.5])
def test_a_weight_other_than_1_on_modules_to_save_is_refused(weight: float, tmp_path: Path) -> None:
    """A modules_to_save tensor replaces the base weight whole: a weight cannot scale it (0 still installed the
    trained classifier, -1 'subtracted' the LoRA and installed it too). Refused like DoRA, in Python and the CLI."""
    base, adapter = _seq_cls(tmp_path)
    with pytest.raises(UnsupportedError, match=re.escape(
            f"{adapter}: modules_to_save tensor 'classifier.bias' replaces base weight 'classifier.bias' whole, and "
            f"the adapter's weight is {weight:g}: a replacement cannot be scaled")):
        lorafuse.apply(base, [adapter], weights=[weight], out=tmp_path / "out", progress=False)
    assert main(["apply", str(base), str(adapter), "--weights", f"{weight:g}", "-o", str(tmp_path / "o"), "-q"]) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
    lorafuse.apply(base, [adapter], weights=[1.0], out=tmp_path / "w1", progress=False)
    assert not np.array_equal(_state(tmp_path / "w1")["classifier.weight"], _state(base)["classifier.weight"])


def test_peft_saved_embedding_copies_take_any_weight(tmp_path: Path) -> None:
    """PEFT's `<embedding>.base_layer.weight` (saved with an embedding LoRA) is the base's own weight: a weight of
    0.5 scales the LoRA (float64 reference) and the copy stays as it is."""
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**TXT, "vocab_size": VOCAB}, tie_word_embeddings=False))
    base, adapter, _ = _case(tmp_path, model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                         init_lora_weights=False))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved
    lorafuse.apply(base, [adapter], weights=[0.5], out=tmp_path / "out", progress=False)
    got, was = _state(tmp_path / "out"), _state(base)
    for module in ("model.embed_tokens", "model.layers.0.self_attn.q_proj"):
        delta, scale = _lora(adapter, module)
        ref = was[f"{module}.weight"].astype(np.float64) + 0.5 * scale * delta
        assert np.abs(got[f"{module}.weight"] - ref).max() <= 1e-6 * np.abs(ref).max(), module


# ---------------------------------------------------------------- 3. layouts transformers renames as it loads

_RENAMED: dict[str, tuple[Callable[[], Any], LoraConfig]] = {
    "llava": (lambda: tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        text_config=tf.LlamaConfig(**TXT), vision_config=tf.CLIPVisionConfig(**VIS), image_token_index=299)),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
    "gemma3": (lambda: tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
        text_config=tf.Gemma3TextConfig(**TXT), vision_config=tf.SiglipVisionConfig(**VIS), mm_tokens_per_image=4,
        image_token_index=299, boi_token_index=297, eoi_token_index=298)),
        LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)),
    "qwen2_vl": (lambda: tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(
        text_config=dict(**{k: v for k, v in TXT.items() if k != "head_dim"},
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=299, video_token_id=298, vision_start_token_id=297)),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "qkv"], init_lora_weights=False)),
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(**VIT, num_labels=5)),
            LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "fc1", "fc2"], init_lora_weights=False)),
    "mixtral_router": (lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**TXT, num_local_experts=2,
                                                                     num_experts_per_tok=1)),
                       LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["mlp.gate.weight"],
                                  init_lora_weights=False)),
}


@pytest.mark.parametrize("name", list(_RENAMED))
def test_renamed_layouts_merge_as_peft_does(name: str, tmp_path: Path) -> None:
    """transformers 5 loads Llava / Gemma 3 (language_model.model.* on disk), Qwen2-VL (model.*), ViT
    (encoder.layer.N.attention.attention.query) and Mixtral (block_sparse_moe.gate) under other names, and PEFT
    names the adapter's modules as loaded: lorafuse spells them back and merges what PEFT merges (it refused,
    with a message naming no reason, or a false one)."""
    make, lora = _RENAMED[name]
    base, adapter, pm = _case(tmp_path, make(), lora)
    lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    got, ref, was = _state(tmp_path / "out"), _peft_merged(pm, tmp_path / "peft"), _state(base)
    assert set(got) == set(was)
    changed = [k for k in was if not np.array_equal(ref[k], was[k])]
    assert len(changed) >= 2
    for k in was:
        assert np.abs(got[k].astype(np.float64) - ref[k]).max() <= 1e-6 * max(1.0, float(np.abs(ref[k]).max())), k


_LAYOUTS: dict[str, Callable[[], Any]] = {
    "llava": _RENAMED["llava"][0], "gemma3": _RENAMED["gemma3"][0], "qwen2_vl": _RENAMED["qwen2_vl"][0],
    "vit": _RENAMED["vit"][0], "mixtral": _RENAMED["mixtral_router"][0],
    "paligemma": lambda: tf.PaliGemmaForConditionalGeneration(tf.PaliGemmaConfig(
        text_config=tf.GemmaConfig(**TXT), vision_config=tf.SiglipVisionConfig(**VIS), image_token_index=299)),
    "deit": lambda: tf.DeiTForImageClassification(tf.DeiTConfig(**VIT, num_labels=5)),
    "beit": lambda: tf.BeitForImageClassification(tf.BeitConfig(**VIT, num_labels=5)),
    "vit_mae": lambda: tf.ViTMAEForPreTraining(tf.ViTMAEConfig(**VIT, decoder_hidden_size=32,
                                                              decoder_intermediate_size=48, decoder_num_hidden_layers=1,
                                                              decoder_num_attention_heads=4)),
    "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**VIT)),
}


@pytest.mark.parametrize("name", list(_LAYOUTS))
def test_every_loaded_name_finds_the_saved_tensor(name: str, tmp_path: Path) -> None:
    """The key chain maps every 2-D parameter name transformers loads onto the checkpoint key save_pretrained
    wrote for it (the same tensor, by value)."""
    model = _LAYOUTS[name]()
    model.save_pretrained(str(tmp_path))
    disk = _state(tmp_path)
    chain = checkpoint_keys(disk, config=json.loads((tmp_path / "config.json").read_text()))
    loaded = {k: v for k, v in model.state_dict().items() if v.ndim == 2 and k not in disk}
    assert loaded  # the layout is renamed
    for k, v in loaded.items():
        if k == "lm_head.weight" and model.config.get_text_config().tie_word_embeddings:
            continue  # tied: not stored
        found = chain(k)
        assert found is not None and np.array_equal(disk[found], v.numpy()), (k, found)


def test_a_layout_lorafuse_does_not_map_is_reported_with_a_hint_not_a_false_claim(tmp_path: Path) -> None:
    """Modules that find no target in a renamed layout lorafuse has no table for: the message points at the
    base key that ends like the module, and the init_lora_weights=false refusal (which said the file holds no
    tensors for the targeted layers, and that PEFT would merge noise there) is not made."""
    make, lora = _RENAMED["qwen2_vl"]
    base, adapter, _ = _case(tmp_path, make(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "my_qwen2_vl"}))
    with pytest.raises(MissingModuleError) as e:
        lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    text = str(e.value)
    assert (f"{adapter}: module 'model.language_model.layers.0.self_attn.q_proj' (the base has "
            "'model.layers.0.self_attn.q_proj.weight', which ends like it: the same layer in another layout?)") in text
    assert "another layout: transformers 5 loads some models under other names than their checkpoints hold" in text
    assert "init_lora_weights" not in text


# ---------------------------------------------------------------- 4. T5 / BART layers tied to `shared`


@pytest.mark.parametrize(("kind", "target", "module"), [
    ("bart", "lm_head", "lm_head"), ("bart", "embed_tokens", "model.encoder.embed_tokens"),
    ("t5", "lm_head", "lm_head"), ("t5", "embed_tokens", "encoder.embed_tokens")])
def test_a_layer_tied_to_shared_changed_alone_is_refused_by_name(kind: str, target: str, module: str,
                                                                  tmp_path: Path) -> None:
    """T5 / BART store one `shared` embedding that lm_head and both embed_tokens read: a LoRA on one of them is
    refused with what is going on (it said 'found no target' and called PEFT's saved lm_head copy a
    modules_to_save tensor)."""
    model = (tf.BartForConditionalGeneration(tf.BartConfig(**BART)) if kind == "bart"
             else tf.T5ForConditionalGeneration(tf.T5Config(**T5)))
    base, adapter, _ = _case(tmp_path, model, LoraConfig(r=2, target_modules=["q_proj" if kind == "bart" else "q",
                                                                              target]))
    shared = "model.shared.weight" if kind == "bart" else "shared.weight"
    arch = "BartForConditionalGeneration" if kind == "bart" else "T5ForConditionalGeneration"
    with pytest.raises(UnsupportedError, match=re.escape(
            f"{adapter}: module {module!r} changes '{module}.weight', which {arch} ties to {shared!r} together with ")
            + r".*lorafuse does not untie a weight several layers share"):
        lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)


def test_a_lora_on_shared_still_merges_as_peft_does(tmp_path: Path) -> None:
    base, adapter, pm = _case(tmp_path, tf.BartForConditionalGeneration(tf.BartConfig(**BART)),
                              LoraConfig(r=2, target_modules=["q_proj", "shared"], init_lora_weights=False))
    lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    got, ref = _state(tmp_path / "out"), _peft_merged(pm, tmp_path / "peft")
    assert set(got) == set(_state(base))
    for k, v in got.items():
        assert np.abs(v.astype(np.float64) - ref[k]).max() <= 1e-6 * max(1.0, float(np.abs(ref[k]).max())), k


def test_peft_saved_base_layer_copies_are_named_as_such(tmp_path: Path) -> None:
    """The lm_head copy PEFT saves with an lm_head LoRA is its `base_layer` weight, not a modules_to_save tensor:
    a bare BartModel base (no lm_head) lists it under its own name."""
    base, adapter, _ = _case(tmp_path, tf.BartForConditionalGeneration(tf.BartConfig(**BART)),
                             LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    tf.BartModel(tf.BartConfig(**BART)).save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(MissingModuleError) as e:
        lorafuse.apply(tmp_path / "bare", [adapter], out=tmp_path / "out", progress=False)
    text = str(e.value)
    assert (f"{adapter}: tensor 'lm_head.base_layer.weight' (PEFT's copy of the base layer's weight, saved with the "
            "layer's LoRA)") in text
    assert "modules_to_save" not in text

"""Round 7 red team, interop: what the consumers of lorafuse's files (transformers, PEFT, diffusers, LyCORIS, the
safetensors reader) see in them.

- A merged checkpoint whose base shards carry no safetensors metadata (what `safetensors.torch.save_file(sd, path)`
  writes) got lorafuse's `lorafuse.*` keys and no `format` key: transformers 4's `load_state_dict` (and every
  loader copied from it) refuses a file whose metadata is not None and whose `format` is not pt / tf / flax / mlx
  ("does not contain the valid metadata"), so the merged model could not be loaded where the base could.
- A merged checkpoint kept its base's `modelspec.hash_sha256` (ModelSpec: the sha256 of the model's weights, which
  SwarmUI and model managers read to identify a file) and sd-scripts' `sshs_model_hash` / `sshs_legacy_hash`: the
  merge claimed to be the base. (Adapters already drop or recompute them: nothing written describes another file.)
- Untying a composite model (Llava: `text_config` nested in config.json) set only the top-level
  `tie_word_embeddings: false` and left `text_config.tie_word_embeddings: true`: transformers 4 ties the output layer
  by the text config's flag (get_text_config), transformers 5 carries a llava-family text config's true up to the
  model's (and warns), and vLLM builds the language model from the text config: the lm_head written apart is thrown
  away and tied to the merged embedding again. And a config whose top level says false while its text config says
  true (what transformers 4 saved for the llava family) was taken as untied: an embedding LoRA was merged into the
  weight transformers then also uses as lm_head, which the PEFT model does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorafuse

# ----------------------------------------------------------------------------- helpers


def _llama(folder: Path, metadata: dict[str, str] | None = None, shards: int = 1) -> Path:
    """A tiny Llama checkpoint folder whose weights `safetensors.torch.save_file` wrote with `metadata` (None: no
    metadata at all, as a plain save_file call writes), in `shards` files with an index when more than one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder))
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata=metadata)
        return folder
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(folder / shard), metadata=metadata)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _peft_adapter(base: Path, folder: Path, seed: int = 1, **config: object) -> Path:
    """A PEFT adapter saved by PEFT on `base`, its factors drawn away from their initialisation."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    pm = get_peft_model(LlamaForCausalLM.from_pretrained(str(base)),
                        LoraConfig(init_lora_weights=False, **{"r": 2, "lora_alpha": 4,
                                                               "target_modules": ["q_proj", "v_proj"], **config}))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape) * 0.3)
    pm.save_pretrained(str(folder))
    return folder


def _transformers4_accepts(path: Path) -> bool:
    """transformers 4.x `modeling_utils.load_state_dict`'s check of a .safetensors file (4.57 and before: also
    sentence-transformers, TRL and others copy it): metadata absent, or with a known `format`."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return metadata is None or metadata.get("format") in ("pt", "tf", "flax", "mlx")


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder))
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- transformers: metadata format


@pytest.mark.parametrize("shards", [1, 2])
def test_a_merge_of_a_base_saved_without_metadata_loads_in_transformers_4(tmp_path: Path, shards: int) -> None:
    base = _llama(tmp_path / "base", metadata=None, shards=shards)
    adapter = _peft_adapter(base, tmp_path / "lora")
    for f in base.glob("*.safetensors"):
        assert _transformers4_accepts(f)
    out = tmp_path / "merged"
    lorafuse.apply(base, [adapter], out=out, progress=False)
    written = sorted(out.glob("*.safetensors"))
    assert len(written) == shards
    for f in written:
        assert _transformers4_accepts(f), f"{f.name}: transformers 4 refuses its metadata"
    # and transformers 5 (installed) loads the merge: the adapted weights changed, the others did not
    got, was = _weights(out), _weights(base)
    changed = {k for k in got if not np.array_equal(got[k], was[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"}


def test_a_resharded_or_one_file_merge_of_such_a_base_keeps_transformers_4_loading(tmp_path: Path) -> None:
    base = _llama(tmp_path / "base", metadata=None)
    adapter = _peft_adapter(base, tmp_path / "lora")
    out = tmp_path / "resharded"
    lorafuse.apply(base, [adapter], out=out, max_shard_size="64KiB", progress=False)
    written = sorted(out.glob("*.safetensors"))
    assert len(written) > 1
    assert all(_transformers4_accepts(f) for f in written)
    one = tmp_path / "merged.safetensors"
    lorafuse.apply(base / "model.safetensors", [adapter], out=one, progress=False)
    assert _transformers4_accepts(one)


def test_a_base_format_is_kept(tmp_path: Path) -> None:
    """A base whose metadata names its format keeps it (and its other keys)."""
    base = _llama(tmp_path / "base", metadata={"format": "pt", "origin": "mine"})
    adapter = _peft_adapter(base, tmp_path / "lora")
    lorafuse.apply(base, [adapter], out=tmp_path / "m", progress=False)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["origin"] == "mine"


# ----------------------------------------------------------------------------- stale hashes of the base


HASHES = {"modelspec.hash_sha256": "0x" + "ab" * 32, "sshs_model_hash": "f" * 64, "sshs_legacy_hash": "deadbeef"}


@pytest.mark.parametrize("one_file", [True, False])
def test_a_merge_drops_the_hashes_of_the_bases_weights(tmp_path: Path, one_file: bool) -> None:
    base = _llama(tmp_path / "base", metadata={"format": "pt", "modelspec.title": "my base", **HASHES})
    adapter = _peft_adapter(base, tmp_path / "lora")
    out = tmp_path / ("merged.safetensors" if one_file else "merged")
    lorafuse.apply(base / "model.safetensors" if one_file else base, [adapter], out=out, progress=False)
    with safe_open(str(out if one_file else out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert not set(HASHES) & set(meta), {k: meta[k] for k in set(HASHES) & set(meta)}
    assert meta["modelspec.title"] == "my base" and meta["format"] == "pt"  # what still holds is kept


# ----------------------------------------------------------------------------- tied embeddings in a nested text config


def _llava(folder: Path, top: bool | None) -> Path:
    """A tiny Llava whose text config ties lm_head to the embedding, saved by transformers (lm_head not stored); its
    config.json's own tie_word_embeddings set to `top` (None: left out, as transformers 4 saved it)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4)
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=63)
                                  ).save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["text_config"]["tie_word_embeddings"] is True
    cfg.pop("tie_word_embeddings", None)
    if top is not None:
        cfg["tie_word_embeddings"] = top
    (folder / "config.json").write_text(json.dumps(cfg))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lm_head" in k]  # tied: transformers stores the embedding only
    return folder


@pytest.mark.parametrize("top", [True, False, None])
def test_an_embedding_lora_on_a_llava_whose_text_config_ties_merges_as_peft_computes(tmp_path: Path,
                                                                                     top: bool | None) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlavaForConditionalGeneration

    base = _llava(tmp_path / "base", top)
    torch.manual_seed(1)
    pm = get_peft_model(LlavaForConditionalGeneration.from_pretrained(str(base)),
                        LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"],
                                   init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape) * 0.3)
    pm.save_pretrained(str(tmp_path / "lora"))
    out = tmp_path / "merged"
    lorafuse.apply(base, [tmp_path / "lora"], out=out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    # every flag a loader reads says untied: the model's and its text config's
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    ids = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(2))
    ref = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(str(base)), str(tmp_path / "lora"))
    merged = LlavaForConditionalGeneration.from_pretrained(str(out))
    assert merged.config.tie_word_embeddings is False
    with torch.no_grad():
        want, got = ref.eval()(input_ids=ids).logits, merged.eval()(input_ids=ids).logits
    assert float((want - got).abs().max()) < 1e-5 * float(want.abs().max()) + 1e-6

"""Red-team round 15, shards: what apply writes around the tensors of a Hugging Face model folder (its shards,
index, config.json and other files) and whether transformers loads the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import PREFIX, llm_base, peft_folder
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file as save_torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorafuse
from lorafuse.errors import FormatError
from lorafuse.io.checkpoint import Checkpoint

Q = "model.layers.0.self_attn.q_proj"


def _tiny_llama(folder: Path) -> dict[str, np.ndarray]:
    """A tiny Llama saved by save_pretrained (model.safetensors + config.json); its state as float32 arrays."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _named_weights(folder: Path, name: str) -> None:
    """The folder's weights moved to `name` (one file, or, for a FILE.safetensors.index.json, three shards and that
    index), named in config.json's transformers_weights, which transformers 5 loads before any other file."""
    state = load_np(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    if name.endswith(".index.json"):
        keys = sorted(state)
        stem = name[: -len(".safetensors.index.json")]
        parts = [keys[i::3] for i in range(3)]
        shards = [f"{stem}-{i + 1:05d}-of-00003.safetensors" for i in range(3)]
        for shard, part in zip(shards, parts):
            save_torch({k: torch.from_numpy(state[k]) for k in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map = {k: s for s, part in zip(shards, parts) for k in part}
        total = sum(v.nbytes for v in state.values())
        (folder / name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    else:
        save_torch({k: torch.from_numpy(v) for k, v in state.items()}, str(folder / name), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["transformers_weights"] = name
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("named", "size"), [("consolidated.safetensors", "64KiB"),
                                             ("consolidated.safetensors", "5GB"),
                                             ("weights.safetensors.index.json", "96KiB")])
def test_a_resharded_merge_of_a_folder_whose_config_names_its_weights_file_loads_in_transformers(
        tmp_path: Path, named: str, size: str) -> None:
    """config.json's transformers_weights names the file transformers 5 loads. Re-sharded (--max-shard-size), the
    output's files are model-0000i-of-0000n.safetensors + model.safetensors.index.json (or model.safetensors): a
    copied config.json still naming consolidated.safetensors made from_pretrained fail (no such file). It is left
    out of the output's config.json, as save_pretrained leaves it out, with a note."""
    base = tmp_path / "base"
    state = _tiny_llama(base)
    _named_weights(base, named)
    adapter = peft_folder(tmp_path / "ad", {Q: (64, 64)}, seed=3)
    factors = load_np(str(adapter / "adapter_model.safetensors"))
    delta = factors[f"{PREFIX}{Q}.lora_B.weight"].astype(np.float64) @ factors[f"{PREFIX}{Q}.lora_A.weight"]
    out = tmp_path / "out"
    report = lorafuse.apply(base, [adapter], out=out, max_shard_size=size, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "transformers_weights" not in config
    assert config["hidden_size"] == 64  # the rest of it kept
    assert any("transformers_weights" in n and "left out" in n for n in report.notes), report.notes
    model = AutoModelForCausalLM.from_pretrained(str(out))
    got = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_allclose(got[f"{Q}.weight"], state[f"{Q}.weight"] + delta, rtol=1e-6, atol=1e-6)
    assert np.array_equal(got["model.layers.1.mlp.up_proj.weight"], state["model.layers.1.mlp.up_proj.weight"])


def test_a_merge_that_keeps_the_shards_keeps_transformers_weights(tmp_path: Path) -> None:
    """Without --max-shard-size the output keeps the input's file names, so config.json keeps naming them; a
    one-file output has no config.json, so no note speaks of one."""
    base = tmp_path / "base"
    _tiny_llama(base)
    _named_weights(base, "weights.safetensors.index.json")
    adapter = peft_folder(tmp_path / "ad", {Q: (64, 64)}, seed=3)
    lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["transformers_weights"] == \
        "weights.safetensors.index.json"
    assert (tmp_path / "out" / "weights-00003-of-00003.safetensors").is_file()
    report = lorafuse.apply(base, [adapter], out=tmp_path / "one.safetensors", progress=False)  # no config.json there
    assert not any("transformers_weights" in n and "left out" in n for n in report.notes), report.notes


OTHER_WEIGHTS = ["tf_model.h5", "flax_model.msgpack", "rust_model.ot", "model.onnx", "model.onnx_data",
                 "64-8bits.tflite", "ggml-model-q4_0.gguf", "model.ckpt.index", "model.ckpt.data-00000-of-00001",
                 "TF_MODEL.H5", "pytorch_model.bin.index.json", "model.safetensors.index.fp16.json",
                 "tf_model.h5.index.json"]


@pytest.mark.parametrize("sharded", [False, True])
def test_other_frameworks_weight_files_are_not_copied_beside_the_merged_weights(tmp_path: Path,
                                                                                sharded: bool) -> None:
    """Hub repositories hold the model in other frameworks' files too (gpt2: tf_model.h5, flax_model.msgpack,
    rust_model.ot, 64-8bits.tflite, model.onnx; llama.cpp users keep a .gguf beside it). Those hold the unmerged
    weights: copied into the merged folder, TFAutoModel / Flax / llama.cpp would load the model unmerged from it. The
    shard indexes of other weights (pytorch_model.bin.index.json, a variant's model.safetensors.index.fp16.json) were
    copied too, listing shards the output does not hold. As the docs say of other weight files, they are left out
    with a note; configs and tokenizer files are copied."""
    shapes = {Q: (16, 16), "model.layers.0.mlp.up_proj": (32, 16)}
    base = llm_base(tmp_path / "base", shapes)
    if sharded:
        state = load_np(str(base / "model.safetensors"))
        (base / "model.safetensors").unlink()
        from safetensors.numpy import save_file
        for i, k in enumerate(sorted(state)):
            save_file({k: state[k]}, str(base / f"model-{i + 1:05d}-of-00002.safetensors"), metadata={"format": "pt"})
        (base / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f"model-{i + 1:05d}-of-00002.safetensors"
                                            for i, k in enumerate(sorted(state))}}))
    for name in OTHER_WEIGHTS:
        (base / name).write_bytes(b"unmerged weights")
    kept = ["tokenizer.model", "vocab.txt", "tokenizer.json", "special_tokens_map.json", "generation_config.json"]
    for name in kept:
        (base / name).write_text("{}")
    adapter = peft_folder(tmp_path / "ad", {Q: (16, 16)}, seed=1)
    report = lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    out_names = {p.name for p in (tmp_path / "out").iterdir()}
    assert not out_names & set(OTHER_WEIGHTS), out_names
    for name in OTHER_WEIGHTS:
        assert f"{name} holds other weights and was not copied" in report.notes
    assert set(kept) <= out_names
    assert (base / "tf_model.h5").read_bytes() == b"unmerged weights"


def test_an_index_naming_the_wrong_shard_for_a_tensor_says_where_it_is(tmp_path: Path) -> None:
    """An index whose weight_map points a tensor at another shard than the one holding it is refused (transformers
    loads every listed shard whole; lorafuse keeps to the index), and the message says which shard holds it."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    for i, name in enumerate(("a.weight", "b.weight")):
        save_file({name: rng.standard_normal((4, 4)).astype(np.float32)},
                  str(tmp_path / f"model-{i + 1:05d}-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00002-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FormatError, match=r"'a.weight' is listed in model-00002-of-00002.safetensors but is not "
                                          r"there \(it is in model-00001-of-00002.safetensors: fix the index"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors",
        "c.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FormatError, match=r"'c.weight' is listed in .* \(no shard the index lists holds it"):
        Checkpoint(tmp_path)


def test_a_folder_saved_sharded_as_a_variant_is_merged_and_loads_with_that_variant(tmp_path: Path) -> None:
    """save_pretrained(variant="fp16", max_shard_size=...) writes model.fp16-0000i-of-0000n.safetensors and
    model.safetensors.index.fp16.json, which from_pretrained(variant="fp16") loads. Such a folder was refused with
    'several .safetensors files and no index.json' (there is one). It is read through its variant index, the output
    keeps the names, and transformers loads the merge; one of its shards given alone is refused naming the folder."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    base = tmp_path / "base"
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(base), max_shard_size="100KB", variant="fp16")
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    shards = sorted(p.name for p in base.glob("model.fp16-*.safetensors"))
    assert len(shards) > 1 and (base / "model.safetensors.index.fp16.json").is_file()
    adapter = peft_folder(tmp_path / "ad", {Q: (64, 64)}, seed=5)
    factors = load_np(str(adapter / "adapter_model.safetensors"))
    delta = factors[f"{PREFIX}{Q}.lora_B.weight"].astype(np.float64) @ factors[f"{PREFIX}{Q}.lora_A.weight"]
    out = tmp_path / "out"
    report = lorafuse.apply(base, [adapter], out=out, progress=False)
    assert any("model.safetensors.index.fp16.json" in n for n in report.notes), report.notes
    assert sorted(p.name for p in out.glob("model*")) == sorted([*shards, "model.safetensors.index.fp16.json"])
    index = json.loads((out / "model.safetensors.index.fp16.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state.values())
    merged = AutoModelForCausalLM.from_pretrained(str(out), variant="fp16")
    got = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    np.testing.assert_allclose(got[f"{Q}.weight"], state[f"{Q}.weight"] + delta, rtol=1e-6, atol=1e-6)
    assert np.array_equal(got["lm_head.weight"], state["lm_head.weight"])
    with pytest.raises(FormatError, match=r"one shard of .* \(model.safetensors.index.fp16.json beside it"):
        lorafuse.apply(base / shards[0], [adapter], out=tmp_path / "one.safetensors", progress=False)


def test_a_folder_with_two_variants_indexes_is_refused_naming_them(tmp_path: Path) -> None:
    base = llm_base(tmp_path / "base", {Q: (16, 16)})
    (base / "model.safetensors").rename(base / "model.fp16-00001-of-00001.safetensors")
    for variant in ("fp16", "bf16"):
        (base / f"model.safetensors.index.{variant}.json").write_text(json.dumps(
            {"weight_map": {f"{Q}.weight": "model.fp16-00001-of-00001.safetensors"}}))
    with pytest.raises(FormatError, match=r"several variants' safetensors index files \(model.safetensors.index.bf16"
                                          r".json, model.safetensors.index.fp16.json\)"):
        Checkpoint(base)


def test_an_index_listing_no_tensor_is_refused_not_merged_into_a_model_of_no_weights(tmp_path: Path) -> None:
    """An index whose weight_map is empty (a truncated or half-written index) named no shard: apply --skip-missing
    wrote a 'merged' folder of no weights at all, saying 'the output is the base unchanged', while the folder's
    shards hold the model. It is refused naming the index and the shards beside it; nothing is written."""
    base = llm_base(tmp_path / "base", {Q: (16, 16)})
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1024},
                                                                   "weight_map": {}}))
    adapter = peft_folder(tmp_path / "ad", {Q: (16, 16)}, seed=1)
    with pytest.raises(FormatError, match=r"model.safetensors.index.json: the shard index's weight_map lists no "
                                          r"tensor, so it names no shard \(model-00001-of-00001.safetensors beside"):
        lorafuse.apply(base, [adapter], out=tmp_path / "out", skip_missing=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_pipelines_top_level_single_file_checkpoint_is_not_copied_unmerged(tmp_path: Path) -> None:
    """A cloned diffusers repository holds its single-file checkpoint at the top beside the components
    (stabilityai/stable-diffusion-xl-base-1.0: sd_xl_base_1.0.safetensors; black-forest-labs/FLUX.1-dev:
    flux1-dev.safetensors). Merging the pipeline copied it into the output unmerged, so ComfyUI or
    from_single_file pointed at the merged folder's file got the base (and the output grew by a whole model).
    docs/safety.md: a pipeline's every non-weight file is copied. Weight files at the top are left out with a note;
    the components are merged, other files and folders copied; the record lists only what was copied."""
    from safetensors.numpy import save_file
    pipe = tmp_path / "pipe"
    (pipe / "text_encoder").mkdir(parents=True)
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    w = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)
    save_file({key: w}, str(pipe / "text_encoder" / "model.safetensors"))
    (pipe / "text_encoder" / "config.json").write_text("{}")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"beta_start": 0.00085}')
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "text_encoder": ["transformers", "CLIPTextModel"],
                                                       "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    save_file({"conditioner.embedders.0.transformer." + key: w}, str(pipe / "sd_xl_base_1.0.safetensors"))
    (pipe / "model.onnx").write_bytes(b"unmerged")
    (pipe / "LICENSE.md").write_text("license")
    rng = np.random.default_rng(4)
    down, up = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
               f"{name}.alpha": np.array(2.0, np.float32)}, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "out"
    report = lorafuse.apply(pipe, [tmp_path / "lora.safetensors"], out=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["LICENSE.md", "README.md", "lorafuse_manifest.json",
                                                    "model_index.json", "scheduler", "text_encoder"]
    for left in ("sd_xl_base_1.0.safetensors", "model.onnx"):
        assert any(n.startswith(f"{left} holds other weights") for n in report.notes), report.notes
    got = load_np(str(out / "text_encoder" / "model.safetensors"))[key]
    np.testing.assert_allclose(got, w + up.astype(np.float64) @ down, rtol=1e-6, atol=1e-6)
    manifest = json.loads((out / "lorafuse_manifest.json").read_text())
    assert "sd_xl_base_1.0.safetensors" not in manifest["files"]


def test_an_adapter_config_beside_the_model_is_not_copied_into_the_merge(tmp_path: Path) -> None:
    """A model folder can hold a PEFT adapter beside the model (a training run's output, a repository shipping
    both). apply merges into the folder's model weights and left adapter_model.safetensors out, but copied
    adapter_config.json: transformers' from_pretrained, finding it, loads the adapter's base_model_name_or_path and
    then the (absent) adapter, so the merged folder failed to load (FileNotFoundError adapter_model.safetensors).
    It is left out with a note, and the merge loads as itself."""
    base = tmp_path / "base"
    state = _tiny_llama(base)
    adapter = peft_folder(tmp_path / "ad", {Q: (64, 64)}, seed=3)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update({"base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"})
    (base / "adapter_config.json").write_text(json.dumps(config))
    (base / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    out = tmp_path / "out"
    report = lorafuse.apply(base, [adapter], out=out, progress=False)
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert any(n.startswith("adapter_config.json, a PEFT adapter's config") for n in report.notes), report.notes
    factors = load_np(str(adapter / "adapter_model.safetensors"))
    delta = factors[f"{PREFIX}{Q}.lora_B.weight"].astype(np.float64) @ factors[f"{PREFIX}{Q}.lora_A.weight"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    got = model.state_dict()[f"{Q}.weight"].detach().numpy()
    np.testing.assert_allclose(got, state[f"{Q}.weight"] + delta, rtol=1e-6, atol=1e-6)

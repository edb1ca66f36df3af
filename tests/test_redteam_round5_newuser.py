"""Red-team round 5, a new user's findings (fixed).

1. extract compares tensors of any rank: a 0-d tensor (CLIP's logit_scale) crashed the comparison of the tensors a
   LoRA cannot hold (numpy views a 0-d array as another type only after a reshape).
2. An adapter given where a model checkpoint goes (apply's base, extract's base or fine-tuned model; a PEFT folder,
   a kohya file, a folder holding a diffusers LoRA) is refused at once, saying it is an adapter; before, extract
   wrote a garbage adapter and apply blamed missing modules.
3. A folder holding one adapter file (pytorch_lora_weights.safetensors, or its only .safetensors file) is that
   adapter wherever an adapter goes, as `info` and a Hub id read it (one rule: formats.held); a folder whose
   PEFT adapters are in sub-folders (save_pretrained of an adapter not named 'default') is refused naming them.
4. A module that finds no target is hinted only with a base key whose tail no other key shares; a PEFT adapter of
   one pipeline component applied to the pipeline is said to be that component's, with the folder to give.
5. combine --method cat of a Conv1D LoRA and a Linear LoRA of one GPT-2 writes fan_in_fan_out true, which PEFT
   reads per layer type (as lorafuse does); the "share no module" refusal says they may be parts of one model.
6. convert --rank / --conv-rank on an adapter without LoHa / LoKr modules (kxk convolutions), and combine
   --conv-rank without a kxk convolution, are refused (as --arch off --to gguf is), never recorded as used.
7. docs/api.md's from_state_dict example passes the result's own config, and runs.
8. combine --from-list given an adapter, a folder or a .safetensors file says what LIST must be.

Independent references: numpy float64 from the tensors written here, real PEFT (merge_and_unload) and transformers
models, hashlib.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import kohya_file, llm_base, peft_folder
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import FormatError, LorafuseValueError, MissingModuleError

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "base_model.model."
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
LLM = {Q: (12, 10), V: (12, 10)}
TAIL = "attentions.0.transformer_blocks.0.attn1.to_q"  # in a UNet's down, mid and up blocks alike
UNET_KEYS = (f"down_blocks.0.{TAIL}", f"mid_block.{TAIL}", f"up_blocks.1.{TAIL}")
MID = f"mid_block.{TAIL}"


def peft_deltas(folder: Path) -> dict[str, np.ndarray]:
    """(lora_alpha / r) B @ A per module of a PEFT folder without rank / alpha patterns, float64, from its files."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    t = load_file(str(folder / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    return {k.removeprefix(PREFIX).removesuffix(".lora_A.weight"):
            scale * (t[k.replace("lora_A", "lora_B")].astype(np.float64) @ t[k].astype(np.float64))
            for k in t if k.endswith(".lora_A.weight")}


def err_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------- 1. extract with 0-d tensors


def _checkpoints(tmp: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A base and a fine-tune whose one matrix changed by a rank-1 delta, with 0-d tensors: equal (F32), equal in
    value across dtypes (F16 vs F32), changed (F32), changed (I64)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    d = np.outer(rng.standard_normal(16), rng.standard_normal(12)).astype(np.float32)
    base = {"proj.weight": w, "logit_scale": np.array(2.6592, np.float32), "half": np.array(1.5, np.float16),
            "temp": np.array(0.5, np.float32), "step": np.array(3, np.int64)}
    ft = {"proj.weight": w + d, "logit_scale": np.array(2.6592, np.float32), "half": np.array(1.5, np.float32),
          "temp": np.array(0.75, np.float32), "step": np.array(4, np.int64)}
    save_file(base, str(tmp / "b.safetensors"))
    save_file(ft, str(tmp / "f.safetensors"))
    return tmp / "b.safetensors", tmp / "f.safetensors", w, (w + d).astype(np.float64) - w.astype(np.float64)


def test_extract_compares_0d_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ValueError 'Changing the dtype of a 0d array is only supported if the itemsize is unchanged' (a
    traceback from the CLI). Now the scalars are compared by bytes (or by value across dtypes): the changed ones
    are noted, the equal ones not, and the adapter holds the exact delta."""
    base, ft, _, delta = _checkpoints(tmp_path)
    res = lorafuse.extract(base, ft, rank=1, out=tmp_path / "x", progress=False)
    got = peft_deltas(tmp_path / "x")
    assert list(got) == ["proj"] and np.abs(got["proj"] - delta).max() <= 1e-5 * np.abs(delta).max()
    noted = " ".join(res.notes)
    assert "temp: changed" in noted and "step: changed" in noted
    assert "logit_scale" not in noted and "half" not in noted
    assert main(["extract", str(base), str(ft), "--rank", "1", "-o", str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not extracted: temp: changed" in err


def test_extract_of_a_real_clip_model(tmp_path: Path) -> None:
    """transformers' CLIPModel holds logit_scale as a 0-d parameter; one q_proj changed is extracted exactly."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config={**small, "vocab_size": 64, "max_position_embeddings": 8},
                        vision_config={**small, "image_size": 8, "patch_size": 4}, projection_dim=8)
    model = CLIPModel(config)
    model.save_pretrained(tmp_path / "base")
    name = "text_model.encoder.layers.0.self_attn.q_proj"
    with torch.no_grad():
        w = model.get_parameter(f"{name}.weight")
        w += torch.outer(torch.randn(16), torch.randn(16))
    model.save_pretrained(tmp_path / "ft")
    b, f = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("base", "ft"))
    assert b["logit_scale"].shape == ()
    res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", rank=1, out=tmp_path / "x", progress=False)
    assert [m.name for m in res.modules] == [name]
    ref = f[f"{name}.weight"].astype(np.float64) - b[f"{name}.weight"].astype(np.float64)
    got = peft_deltas(tmp_path / "x")[name]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


# ---------------------------------------------------------------- 2. an adapter where a model goes


APPLY_WORDS = "not a model checkpoint: apply merges adapters into a model checkpoint"
EXTRACT_WORDS = ("not a model checkpoint: extract compares two full model checkpoints, a base and its fine-tune "
                 "(lorafuse extract BASE FINETUNED); to subtract one adapter from another, use lorafuse combine A B "
                 "--weights 1,-1")


def _diffusers_lora_folder(folder: Path, seed: int = 5, rank: int = 2) -> Path:
    """A folder holding only pytorch_lora_weights.safetensors (what diffusers' save_lora_weights(folder) writes):
    one UNet module, mid_block's to_q (8 x 8)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    save_file({f"unet.{MID}.lora_A.weight": rng.standard_normal((rank, 8)).astype(np.float32),
               f"unet.{MID}.lora_B.weight": rng.standard_normal((8, rank)).astype(np.float32)},
              str(folder / "pytorch_lora_weights.safetensors"))
    return folder


def test_an_adapter_as_apply_base_is_refused_saying_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `apply lora_a lora_b` blamed 'adapter modules found no target in the base lora_a' (and with
    --skip-missing wrote a 'checkpoint' holding the adapter's files)."""
    a, b = peft_folder(tmp_path / "a", LLM, 1), peft_folder(tmp_path / "b", LLM, 2)
    k1 = kohya_file(tmp_path / "k1.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 1)
    k2 = kohya_file(tmp_path / "k2.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 2)
    dl = _diffusers_lora_folder(tmp_path / "dlora")
    cases = [(a, b, f"{a}: the base model is a PEFT adapter, {APPLY_WORDS}"),
             (a / "adapter_model.safetensors", b, f"{a / 'adapter_model.safetensors'}: the base model is a PEFT "
                                                  f"adapter, {APPLY_WORDS}"),
             (k1, k2, f"{k1}: the base model is a kohya / LyCORIS file, {APPLY_WORDS}"),
             (dl, dl, f"{dl}: the base model is a folder holding a diffusers LoRA "
                      f"({dl / 'pytorch_lora_weights.safetensors'}), {APPLY_WORDS}")]
    for i, (base, adapter, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(FormatError) as e:
            lorafuse.apply(base, [adapter], out=out, skip_missing=True, progress=False)
        assert str(e.value).startswith(words), e.value
        code, err = err_of(capsys, ["apply", str(base), str(adapter), "-o", str(out), "--skip-missing"])
        assert code == 1 and words in err and not out.exists()
    # the two swapped (a model given as the adapter) still says the base comes first
    llm = llm_base(tmp_path / "llm", LLM)
    with pytest.raises(FormatError, match="the base comes first"):
        lorafuse.apply(a, [llm], out=tmp_path / "sw", progress=False)


def test_an_adapter_as_extract_input_is_refused_saying_so(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `extract lora_a lora_b` wrote an adapter of modules named '...q_proj.lora_B' (exit 0), which PEFT
    refuses; with a base it said the two 'share no tensor name'."""
    a, b = peft_folder(tmp_path / "a", LLM, 1), peft_folder(tmp_path / "b", LLM, 2)
    llm = llm_base(tmp_path / "llm", LLM)
    k1 = kohya_file(tmp_path / "k1.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 1)
    k2 = kohya_file(tmp_path / "k2.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 2)
    dl = _diffusers_lora_folder(tmp_path / "dlora")
    cases = [(a, b, f"{a}: the base model is a PEFT adapter, "),
             (llm, a, f"{a}: the fine-tuned model is a PEFT adapter, "),
             (k1, k2, f"{k1}: the base model is a kohya / LyCORIS file, "),
             (llm, dl, f"{dl}: the fine-tuned model is a folder holding a diffusers LoRA "
                       f"({dl / 'pytorch_lora_weights.safetensors'}), ")]
    for i, (base, ft, words) in enumerate(cases):
        for out in (tmp_path / f"x{i}", tmp_path / f"x{i}.safetensors"):
            with pytest.raises(FormatError) as e:
                lorafuse.extract(base, ft, rank=2, out=out, progress=False)
            assert str(e.value) == words + EXTRACT_WORDS
            for dry in ([], ["--dry-run"]):
                code, err = err_of(capsys, ["extract", str(base), str(ft), "--rank", "2", "-o", str(out), *dry])
                assert code == 1 and words + EXTRACT_WORDS in err and not out.exists()


def test_a_model_folder_that_also_holds_its_adapter_is_a_base(tmp_path: Path) -> None:
    """A folder with adapter_config.json and model weights besides (a repository with the merged model and its
    adapter) is still read as the checkpoint it holds: the merge is W + s B A (numpy float64)."""
    both = llm_base(tmp_path / "both", LLM)
    adapter = peft_folder(tmp_path / "a", LLM, 1)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (both / name).write_bytes((adapter / name).read_bytes())
    w = load_file(str(both / "model.safetensors"))
    lorafuse.apply(both, [adapter], out=tmp_path / "m", progress=False)
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    for module, delta in peft_deltas(adapter).items():
        ref = w[f"{module}.weight"].astype(np.float64) + delta
        assert np.abs(got[f"{module}.weight"] - ref).max() <= 2e-6 * np.abs(ref).max()


# ---------------------------------------------------------------- 3. a folder holding one adapter file


def _pipeline(folder: Path, seed: int = 9) -> Path:
    """A diffusers pipeline folder with a UNet whose to_q layers share their tail in the down, mid and up blocks."""
    rng = np.random.default_rng(seed)
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    save_file({f"{k}.weight": rng.standard_normal((8, 8)).astype(np.float32) for k in UNET_KEYS},
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    return folder


def _file_delta(path: Path) -> np.ndarray:
    t = load_file(str(path))
    return t[f"unet.{MID}.lora_B.weight"].astype(np.float64) @ t[f"unet.{MID}.lora_A.weight"].astype(np.float64)


def test_a_folder_holding_a_lora_file_is_that_adapter_everywhere(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Before: load, resize, similarity, convert, combine and apply refused `dlora/` ('not a recognised adapter')
    while `info dlora` and the same folder as a Hub id read its pytorch_lora_weights.safetensors."""
    dl = _diffusers_lora_folder(tmp_path / "dlora", rank=3)
    inner = dl / "pytorch_lora_weights.safetensors"
    ref = _file_delta(inner)
    a = lorafuse.load(dl)
    assert a.path == inner and lorafuse.detect_format(dl) == "diffusers"
    assert np.abs(a[f"unet.{MID}"].delta().astype(np.float64) - ref).max() <= 1e-6 * np.abs(ref).max()
    assert lorafuse.similarity([dl, inner])[0, 1] == pytest.approx(1.0, abs=1e-6)
    # resize: the truncated SVD of the delta (numpy), from the folder as from the file
    lorafuse.resize(dl, 1, out=tmp_path / "r1.safetensors", progress=False)
    u, s, vt = np.linalg.svd(ref)
    got = _file_delta(tmp_path / "r1.safetensors")
    assert np.abs(got - s[0] * np.outer(u[:, 0], vt[0])).max() <= 1e-5 * s[0]
    # the record names the file read and its sha256
    made = lorafuse.load(tmp_path / "r1.safetensors").provenance
    assert made is not None and made.inputs[0].name == str(inner)
    assert made.inputs[0].sha256 == hashlib.sha256(inner.read_bytes()).hexdigest()
    # convert, combine and apply into a pipeline, on the command line
    assert main(["convert", str(dl), "--to", "kohya", "--family", "sd1", "-o", str(tmp_path / "k.safetensors")]) == 0
    k = load_file(str(tmp_path / "k.safetensors"))
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    kd = k[f"{name}.lora_up.weight"].astype(np.float64) @ k[f"{name}.lora_down.weight"].astype(np.float64)
    assert np.abs(kd * float(k[f"{name}.alpha"]) / 3 - ref).max() <= 1e-6 * np.abs(ref).max()
    assert main(["combine", str(dl), str(inner), "--weights", "1,-1", "--method", "cat",
                 "-o", str(tmp_path / "c.safetensors")]) == 0
    assert np.abs(_file_delta(tmp_path / "c.safetensors")).max() <= 1e-5 * np.abs(ref).max()
    pipe = _pipeline(tmp_path / "pipe")
    assert main(["apply", str(pipe), str(dl), "-o", str(tmp_path / "merged")]) == 0
    w = load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors"))
    want = w[f"{MID}.weight"].astype(np.float64) + ref
    assert np.abs(merged[f"{MID}.weight"] - want).max() <= 2e-6 * np.abs(want).max()
    capsys.readouterr()


def test_a_folder_with_a_lone_kohya_file_and_the_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder whose only .safetensors file is a kohya LoRA is it; a folder whose one file is no adapter is refused
    naming what that file holds."""
    folder = tmp_path / "k"
    folder.mkdir()
    kohya_file(folder / "style.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 4)
    assert lorafuse.load(folder).path == folder / "style.safetensors"
    stray = tmp_path / "stray"
    stray.mkdir()
    save_file({"encoder.weight": np.ones((4, 4), np.float32)}, str(stray / "weights.safetensors"))
    with pytest.raises(FormatError) as e:
        lorafuse.load(stray)
    assert str(e.value).startswith(f"{stray}: not a recognised adapter; its weights.safetensors holds 1 tensor "
                                   "('encoder.weight'), none named as an adapter's: expected ")


def test_peft_adapters_in_sub_folders_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PEFT's save_pretrained of an adapter named 'style' writes named/style/. Before: 'not a recognised adapter'
    (load, apply) and 'no .safetensors checkpoint found' (info), neither naming named/style."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]),
                           adapter_name="style")
    model.save_pretrained(tmp_path / "named")
    sub = tmp_path / "named" / "style"
    assert (sub / "adapter_config.json").is_file()
    hint = (f"it holds a PEFT adapter in a sub-folder ({sub}: PEFT's save_pretrained writes an adapter not named "
            "'default' in a sub-folder named after it): give that folder")
    with pytest.raises(FormatError) as e:
        lorafuse.load(tmp_path / "named")
    assert str(e.value) == f"{tmp_path / 'named'}: not an adapter itself; {hint}"
    with pytest.raises(FormatError) as e:
        lorafuse.describe(tmp_path / "named")
    assert str(e.value).endswith(hint)
    assert lorafuse.load(sub).path == sub
    llm = llm_base(tmp_path / "llm", LLM)
    with pytest.raises(FormatError) as e:
        lorafuse.apply(llm, [tmp_path / "named"], out=tmp_path / "o", progress=False)
    assert hint in str(e.value)
    with pytest.raises(FormatError, match=re.escape(f"the base model holds no model checkpoint, only PEFT adapters "
                                                    f"in sub-folders ({sub}): apply merges")):
        lorafuse.apply(tmp_path / "named", [sub], out=tmp_path / "o", progress=False)


# ---------------------------------------------------------------- 4. hints for modules without a target


def test_a_component_adapter_on_its_pipeline_is_said_to_be_the_components(tmp_path: Path) -> None:
    """Before: '(the base has unet/down_blocks.0...to_q.weight, which ends like it: the same layer in another
    layout?)' for a mid_block module, although the pipeline holds unet/mid_block...to_q.weight exactly."""
    pipe = _pipeline(tmp_path / "pipe")
    adapter = peft_folder(tmp_path / "peft_unet", {MID: (8, 8)}, 4, alpha=4)
    with pytest.raises(MissingModuleError) as e:
        lorafuse.apply(pipe, [adapter], out=tmp_path / "o", progress=False)
    text = str(e.value)
    assert (f"{adapter}: module '{MID}' (the base holds unet/{MID}.weight: an adapter of that component alone?)"
            in text)
    assert f"give that component's folder as the base ({pipe / 'unet'})" in text
    assert "ends like it" not in text and "down_blocks" not in text
    # what the message says works, and is W + s B A (numpy float64)
    lorafuse.apply(pipe / "unet", [adapter], out=tmp_path / "u", progress=False)
    w = load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))[f"{MID}.weight"].astype(np.float64)
    got = load_file(str(tmp_path / "u" / "diffusion_pytorch_model.safetensors"))[f"{MID}.weight"]
    want = w + peft_deltas(adapter)[MID]
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def test_a_tail_several_base_keys_share_is_no_hint(tmp_path: Path) -> None:
    """A module whose tail ends two base keys gets no 'the base has X, which ends like it' (X would be a guess)."""
    base = tmp_path / "base"
    base.mkdir()
    rng = np.random.default_rng(1)
    save_file({f"{k}.weight": rng.standard_normal((8, 8)).astype(np.float32) for k in UNET_KEYS},
              str(base / "model.safetensors"))
    adapter = peft_folder(tmp_path / "a", {f"other_block.{TAIL}": (8, 8)}, 2)
    with pytest.raises(MissingModuleError) as e:
        lorafuse.apply(base, [adapter], out=tmp_path / "o", progress=False)
    assert "ends like it" not in str(e.value) and f"module 'other_block.{TAIL}'" in str(e.value)


# ---------------------------------------------------------------- 5. fan_in_fan_out per layer type


def _gpt2(tmp: Path) -> tuple[Path, Path, Path]:
    """A GPT-2 base (lm_head stored apart), a PEFT LoRA on its Conv1D c_attn layers (fan_in_fan_out) and one on its
    Linear lm_head, both random (init_lora_weights=False), saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16, tie_word_embeddings=False)
    GPT2LMHeadModel(config).save_pretrained(tmp / "base")
    for name, targets, fan in (("conv1d", ["c_attn"], True), ("head", ["lm_head"], False)):
        model = GPT2LMHeadModel.from_pretrained(tmp / "base")
        get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, fan_in_fan_out=fan,
                                         init_lora_weights=False)).save_pretrained(tmp / name)
    return tmp / "base", tmp / "conv1d", tmp / "head"


def test_cat_of_a_conv1d_and_a_linear_lora_loads_in_peft(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'UnsupportedError: <in-memory adapter>: linear modules mix fan_in_fan_out layouts; PEFT cannot store
    that'. PEFT sets fan_in_fan_out per layer (true for a Conv1D, false for a Linear): the output loads in PEFT and
    merges to W + s (B A)^T on c_attn and W + s B A on lm_head (numpy float64 from the inputs' files)."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base, conv1d, head = _gpt2(tmp_path)
    assert main(["combine", str(conv1d), str(head), "--method", "cat", "-o", str(tmp_path / "cat")]) == 0
    assert json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    w = load_file(str(base / "model.safetensors"))
    want = {f"{k}.weight": w[f"{k}.weight"].astype(np.float64) + d.T for k, d in peft_deltas(conv1d).items()}
    want |= {f"{k}.weight": w[f"{k}.weight"].astype(np.float64) + d for k, d in peft_deltas(head).items()}
    assert len(want) == 3
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                                         "Setting fan_in_fan_out to False"):  # PEFT's own rule, per layer
        peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), tmp_path / "cat")
    merged = peft.merge_and_unload()
    state = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    for key, ref in want.items():
        assert np.abs(state[key] - ref).max() <= 2e-6 * np.abs(ref).max(), key
    lorafuse.apply(base, [tmp_path / "cat"], out=tmp_path / "m", progress=False)
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    for key, ref in want.items():
        assert np.abs(got[key] - ref).max() <= 2e-6 * np.abs(ref).max(), key
    # the svd refusal of the two (no module shared) no longer says only "adapters for different models"
    code, err = err_of(capsys, ["combine", str(conv1d), str(head), "-o", str(tmp_path / "svd")])
    assert code == 1 and "or adapters of different parts of one model (its output head and its blocks" in err


# ---------------------------------------------------------------- 6. ranks that cannot act


def test_convert_rank_without_loha_or_lokr_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: exit 0, the output identical to a run without --rank, and its record saying rank=1."""
    src = kohya_file(tmp_path / "k.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 1)
    for flag, option in (("--rank", "rank"), ("--conv-rank", "conv_rank")):
        out = tmp_path / f"{option}.safetensors"
        code, err = err_of(capsys, ["convert", str(src), "--to", "peft", flag, "1", "-o", str(out)])
        assert code == 2 and not out.exists()
        assert (f"{src}: {flag} (Python: {option}=) applies to LoHa / LoKr " in err
                and "and it has no LoHa / LoKr module: its LoRA modules are written with the ranks they have; leave "
                    f"{flag} out (lorafuse resize changes a LoRA's rank)" in err), err
        with pytest.raises(LorafuseValueError, match=f"{option}=\\) applies to LoHa / LoKr"):
            lorafuse.convert(src, out, to="peft", **{option: 1})
    adapter = peft_folder(tmp_path / "p", LLM, 1)
    llm = llm_base(tmp_path / "llm", LLM)
    (llm / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                 "num_attention_heads": 2, "num_key_value_heads": 2,
                                                 "hidden_size": 10}))
    with pytest.raises(LorafuseValueError, match="rank=\\) applies to LoHa / LoKr modules"):
        lorafuse.convert(adapter, tmp_path / "x.gguf", to="gguf", base_config=llm, rank=2)


def test_convert_conv_rank_without_a_kxk_lycoris_module_is_refused(tmp_path: Path) -> None:
    """A LoHa of a Linear layer takes --rank, and no --conv-rank: it has no kxk convolution."""
    rng = np.random.default_rng(2)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    t = {f"{name}.hada_w1_a": rng.standard_normal((8, 2)), f"{name}.hada_w1_b": rng.standard_normal((2, 8)),
         f"{name}.hada_w2_a": rng.standard_normal((8, 2)), f"{name}.hada_w2_b": rng.standard_normal((2, 8)),
         f"{name}.alpha": np.array(2.0)}
    src = tmp_path / "loha.safetensors"
    save_file({k: v.astype(np.float32) for k, v in t.items()}, str(src))
    with pytest.raises(LorafuseValueError, match="applies to LoHa / LoKr kxk convolutions \\(k > 1\\), and none of its "
                                                 "LoHa / LoKr modules is one"):
        lorafuse.convert(src, tmp_path / "o.safetensors", to="kohya", rank=2, conv_rank=1)
    rep = lorafuse.convert(src, tmp_path / "o.safetensors", to="kohya", rank=2)
    assert rep.ranks == {name: 2}


@pytest.mark.parametrize("engine", ["memory", "stream"])
def test_combine_conv_rank_without_a_kxk_convolution_is_refused(tmp_path: Path, engine: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    a, b = peft_folder(tmp_path / "a", LLM, 1), peft_folder(tmp_path / "b", LLM, 2)
    words = ("conv_rank (--conv-rank) applies to kxk convolutions (k > 1), and no module of the adapters is one: "
             "leave it out (rank, --rank, sets every module's rank here)")
    for dry in ([], ["--dry-run"]):
        code, err = err_of(capsys, ["combine", str(a), str(b), "--conv-rank", "2", "--engine", engine, *dry,
                                    "-o", str(tmp_path / "c")])
        assert code == 2 and words in err and not (tmp_path / "c").exists()
    with pytest.raises(LorafuseValueError, match=re.escape(words)):
        lorafuse.combine([a, b], rank=2, conv_rank=2)


# ---------------------------------------------------------------- 7. docs/api.md's from_state_dict example


def test_the_api_page_example_of_from_state_dict_runs(tmp_path: Path) -> None:
    """Before: from_state_dict(state, {"r": 16, "lora_alpha": 16}) raised ShapeMismatchError for a module whose
    stacked rank is below 16 (to_rank keeps lower ranks)."""
    text = (ROOT / "docs" / "api.md").read_text()
    assert "e = lorafuse.Adapter.from_state_dict(state, d.config)" in text
    a = peft_folder(tmp_path / "a", LLM, 1, rank=4)
    b = peft_folder(tmp_path / "b", LLM, 2, rank=8)
    c = peft_folder(tmp_path / "c", {**LLM, "model.layers.0.mlp.gate_proj": (12, 10)}, 3, rank=4)
    a, b, c = (lorafuse.load(p) for p in (a, b, c))
    d = (a + 0.5 * b - c / 3).to_rank(16)
    e = lorafuse.Adapter.from_state_dict(d.state_dict("torch"), d.config)
    assert d.updates["model.layers.0.mlp.gate_proj"].rank == 4
    for name, u in d.updates.items():
        assert np.array_equal(e[name].delta(), u.delta())


# ---------------------------------------------------------------- 8. --from-list given something else


def test_from_list_given_an_adapter_says_what_a_list_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'cannot read: it is a directory, not a file', or 'not UTF-8 text (byte 0)' for the adapter's file."""
    a = peft_folder(tmp_path / "a", LLM, 1)
    llm = llm_base(tmp_path / "llm", LLM)
    dl = _diffusers_lora_folder(tmp_path / "dlora")
    (tmp_path / "x.bin").write_bytes(b"\x80\x81 not text")
    is_list = "an adapter list (--from-list LIST) is a text file of `PATH [WEIGHT]` lines, one adapter a line"
    given = "give adapters as arguments instead (lorafuse combine A B ... -o OUT), or list their paths in such a file"
    cases = {a: f"{a} is a PEFT adapter, not an adapter list: {is_list}; {given}",
             a / "adapter_model.safetensors": f"{a / 'adapter_model.safetensors'} is a PEFT adapter, not an adapter "
                                              f"list: {is_list}; {given}",
             dl: f"{dl} is a folder holding a diffusers LoRA ({dl / 'pytorch_lora_weights.safetensors'}), not an "
                 f"adapter list: {is_list}; {given}",
             llm: f"{llm} is a folder, not an adapter list: {is_list}",
             llm / "model.safetensors": f"{llm / 'model.safetensors'} is a .safetensors file, not an adapter list: "
                                        f"{is_list}",
             tmp_path / "x.bin": f"adapter list {tmp_path / 'x.bin'}: not UTF-8 text (byte 0): {is_list}"}
    for listed, words in cases.items():
        code, err = err_of(capsys, ["combine", "--from-list", str(listed), "-o", str(tmp_path / "o")])
        assert code == 1 and f"FormatError: {words}" in err, err

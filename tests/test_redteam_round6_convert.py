"""Red-team round 6, convert: a PEFT adapter's model card (README.md) whose YAML front matter gguf cannot write
(a license or base_model of another type than a string) crashed `convert --to gguf` with a traceback after the
dry run had passed, and a diffusers file's lora_adapter_metadata refusal named three options at once, saying
diffusers (not lorafuse) cannot hold them.

References: gguf's own GGUFReader on the written file, numpy float64 deltas of the adapter's factors, and the
llama.cpp converter's permutation of q_proj / k_proj rows (LlamaModel.permute), written out here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorafuse.cli import main

gguf = pytest.importorskip("gguf")

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _llama_adapter(tmp: Path, card: str | None = None) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A PEFT LoRA folder of a 2-layer Llama (hidden 64, 4 heads, 2 kv heads) on q/k/v/o_proj with random
    factors, its base config.json, and its factors by tensor name."""
    rng = np.random.default_rng(0)
    folder, base = tmp / "adapter", tmp / "base"
    folder.mkdir()
    base.mkdir()
    sizes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}
    tensors: dict[str, np.ndarray] = {}
    for layer in range(2):
        for proj, (rows, cols) in sizes.items():
            p = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[p + ".lora_A.weight"] = rng.standard_normal((4, cols)).astype(np.float32)
            tensors[p + ".lora_B.weight"] = rng.standard_normal((rows, 4)).astype(np.float32)
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": list(sizes), "base_model_name_or_path": ""}))
    (base / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100,
         "tie_word_embeddings": False}))
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder, base, tensors


# ----------------------------------------------------------------------------- 1. a model card gguf cannot write


@pytest.mark.parametrize("front", ["license: [1, 2]", "license: 3", "base_model: [{name: 3}]"])
def test_a_model_card_gguf_cannot_write_is_refused_by_name_dry_run_too(tmp_path: Path, front: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder, base, _ = _llama_adapter(tmp_path, f"---\n{front}\n---\n\n# card\n")
    out = tmp_path / "lora.gguf"
    for extra in (["--dry-run"], []):  # the dry run refuses what the run refuses, with the same status
        rc, _, err = _run(capsys, "convert", folder, "--to", "gguf", "--base-config", base, "-o", out, *extra)
        assert rc == 1, err
        assert "Traceback" not in err
        line = err.strip()
        assert "\n" not in line and str(folder / "README.md") in line and "model card" in line, line
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_a_broken_yaml_card_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, base, _ = _llama_adapter(tmp_path, "---\nbase_model: [unclosed\n---\n")
    rc, _, err = _run(capsys, "convert", folder, "--to", "gguf", "--base-config", base, "-o", tmp_path / "x.gguf",
                      "--dry-run")
    assert rc == 1 and "\n" not in err.strip() and "README.md" in err, err


def test_a_plain_card_still_gives_the_deltas_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The checked card changes nothing of the output: the deltas (q / k rows permuted as llama.cpp's converter
    does), alpha and the card's keys, read with gguf's reader."""
    folder, base, t = _llama_adapter(tmp_path, "---\nlicense: apache-2.0\ntags:\n- lora\n---\n")
    out = tmp_path / "lora.gguf"
    rc, _, err = _run(capsys, "convert", folder, "--to", "gguf", "--base-config", base, "-o", out, "-q")
    assert rc == 0, err
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.license"].contents() == "apache-2.0"
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert alpha == 8.0
    arrays = {x.name: np.asarray(x.data, np.float64) for x in reader.tensors}

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"q_proj": ("attn_q", 4), "k_proj": ("attn_k", 2), "v_proj": ("attn_v", None),
             "o_proj": ("attn_output", None)}
    for layer in range(2):
        for proj, (g, heads) in names.items():
            p = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            ref = 2.0 * t[p + ".lora_B.weight"].astype(np.float64) @ t[p + ".lora_A.weight"].astype(np.float64)
            ref = permute(ref, heads) if heads else ref
            a, b = arrays[f"blk.{layer}.{g}.weight.lora_a"], arrays[f"blk.{layer}.{g}.weight.lora_b"]
            np.testing.assert_allclose(alpha / 4 * (b @ a), ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- 2. diffusers metadata refusals


@pytest.mark.parametrize("field, named, not_named", [
    ("use_dora", "use_dora", ("lora_bias", "fan_in_fan_out")),
    ("lora_bias", "lora_bias", ("DoRA", "fan_in_fan_out")),
])  # (fan_in_fan_out on a diffusers model's Linear layers is read as PEFT does since round 7: ignored)
def test_diffusers_metadata_refusal_names_the_option_set(tmp_path: Path, field: str, named: str,
                                                         not_named: tuple[str, ...],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    meta = {"unet.r": 4, "unet.lora_alpha": 4.0, "unet.target_modules": ["to_q"], f"unet.{field}": True}
    src = tmp_path / "d.safetensors"
    save_file({Q + ".lora_A.weight": torch.ones(4, 320), Q + ".lora_B.weight": torch.ones(320, 4)}, str(src),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    rc, _, err = _run(capsys, "convert", src, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert rc == 1 and "Traceback" not in err
    assert named in err and "lorafuse does not read" in err, err
    assert not any(n in err for n in not_named), err
    assert "not supported in diffusers" not in err  # diffusers loads DoRA and lora_bias LoRAs; lorafuse does not
    assert not (tmp_path / "k.safetensors").exists()


# ----------------------------------------------------------------------------- 3. -o ADAPTER/ of the adapter itself


def test_output_folder_refusal_never_suggests_a_path_it_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`convert ./adapter --to gguf -o ./adapter/` is refused; its example was ./adapter/adapter.gguf, inside the
    input folder, which is refused in turn. An example it gives (-o ./) must be one a run accepts."""
    folder, base, _ = _llama_adapter(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, "convert", "adapter", "--to", "gguf", "--base-config", base, "-o", "adapter/")
    assert rc == 1 and "is the input adapter" in err, err
    assert "e.g. adapter/adapter.gguf" not in err and "inside" not in err.split("is the input", 1)[1], err
    rc, _, err = _run(capsys, "convert", "adapter", "--to", "gguf", "--base-config", base, "-o", "./")
    assert rc == 1 and "e.g. adapter.gguf" in err, err
    rc, _, err = _run(capsys, "convert", "adapter", "--to", "gguf", "--base-config", base, "-o", "adapter.gguf", "-q")
    assert rc == 0 and (tmp_path / "adapter.gguf").is_file(), err
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ----------------------------------------------------------------------------- 4. --family sdxl of an SD 1.x file


SD1_ONLY = {  # SD 1.x UNet layers SDXL's UNet does not have (its down_blocks.0 has no attention)
    "kohya": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "ldm": "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
}


@pytest.mark.parametrize("naming", sorted(SD1_ONLY))
def test_kohya_to_peft_refuses_a_family_whose_unet_lacks_the_layer(tmp_path: Path, naming: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """peft -> kohya refused a module that is no layer of the named family's UNet; kohya -> peft wrote it under
    'sdxl names' (and recorded sdxl), though SDXL's UNet has no such layer, so diffusers finds no target for it."""
    m = SD1_ONLY[naming]
    src = tmp_path / "sd1.safetensors"
    save_file({m + ".lora_down.weight": torch.ones(4, 320), m + ".lora_up.weight": torch.ones(320, 4),
               m + ".alpha": torch.tensor(4.0)}, str(src))
    out = tmp_path / "out.safetensors"
    rc, _, err = _run(capsys, "convert", src, "--to", "peft", "--family", "sdxl", "-o", out)
    assert rc == 1 and "Traceback" not in err and m in err and "SDXL UNet" in err, err
    assert not out.exists()
    rc, _, err = _run(capsys, "convert", src, "--to", "peft", "--family", "sd1", "-o", out, "-q")
    assert rc == 0 and out.is_file(), err

"""Round-5 red-team findings on GGUF: a multimodal adapter's vision-tower / projector modules (left out, as
llama.cpp's converter leaves them out, instead of a false 'not made for this base' / '--arch names another
architecture'), a GGUF file given where an adapter is read (named as GGUF), and the wording of the lora_alpha=0
and single-element-row notes. References: PEFT's own get_delta_weight, and the written file read back with
gguf's GGUFReader and dequantize, in float64."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

import lorafuse  # noqa: E402
import lorafuse.formats.gguf as lf_gguf  # noqa: E402
from lorafuse.cli import main  # noqa: E402
from lorafuse.errors import FormatError, MissingModuleError, UnsupportedError  # noqa: E402
from lorafuse.ops.convert import convert  # noqa: E402

_GGUF_NAMES = {"q_proj": "attn_q", "v_proj": "attn_v", "down_proj": "ffn_down"}
_VISION_NOTE = ("llama.cpp's text GGUF has no vision tower or multimodal projector: its converter writes them into "
                "the separate mmproj file (--mmproj), and llama.cpp applies --lora to the text model only")


def _gemma3_vl(tmp: Path, targets: object, **lora: object) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A tiny Gemma3ForConditionalGeneration (text hidden 64, SigLIP hidden 32) saved as a base, and a PEFT LoRA
    on `targets` with random factors; PEFT's deltas (get_delta_weight, float64) by module name."""
    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=299, boi_token_index=297, eoi_token_index=298)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    base, adapter = tmp / "base", tmp / "adapter"
    model.save_pretrained(base)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **lora))  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    pm.save_pretrained(adapter)
    deltas = {name.removeprefix("base_model.model."): layer.get_delta_weight("default").detach().double().numpy()
              for name, layer in pm.named_modules() if isinstance(layer, LoraLayer) and "default" in layer.scaling}
    return base, adapter, deltas


def _gguf_deltas(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """The file's metadata, and per base tensor alpha / r * lora_b @ lora_a (r from lora_b) in float64."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arrays = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(
        [int(x) for x in reversed(t.shape)]) for t in reader.tensors}
    alpha = float(meta["adapter.lora.alpha"])  # type: ignore[arg-type]
    out = {}
    for name in arrays:
        if name.endswith(".lora_a"):
            a, b = arrays[name], arrays[name[:-2] + "_b"]
            out[name[: -len(".lora_a")]] = (alpha / b.shape[1] if alpha else 1.0) * (b @ a)
    return meta, out


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- 1: vision-tower modules


def test_gemma3_vision_modules_are_left_out_and_the_text_model_written(tmp_path, capsys):
    base, adapter, deltas = _gemma3_vl(tmp_path, ["q_proj", "v_proj"])
    vision = sorted(m for m in deltas if ".vision_tower." in m)
    text = sorted(m for m in deltas if ".language_model." in m)
    assert len(vision) == 2 and len(text) == 4 and len(deltas) == 6  # q_proj / v_proj match the SigLIP tower too
    want = {f"blk.{m.split('.')[3]}.{_GGUF_NAMES[m.rsplit('.', 1)[-1]]}.weight": deltas[m] for m in text}
    for how, extra in (("base-config", ("--base-config", base)), ("arch", ("--arch", "gemma3"))):
        out = tmp_path / f"{how}.gguf"
        rc, stdout, err = _run(capsys, "convert", adapter, "--to", "gguf", *extra, "-o", out)
        assert rc == 0, err
        assert (f"note: left out 2 vision-tower / projector modules ({vision[0]!r}, {vision[1]!r}), as llama.cpp's "
                f"converter does: {_VISION_NOTE}; the GGUF holds the text model's modules, whose deltas are the "
                "adapter's") in err
        assert "converted 6 modules" in stdout and "(gemma3): 4 modules" in stdout
        meta, got = _gguf_deltas(out)
        assert meta["general.architecture"] == "gemma3"
        assert sorted(got) == sorted(want)
        for name, delta in want.items():
            np.testing.assert_allclose(got[name], delta, rtol=0, atol=1e-6)


def test_vision_full_tensors_left_out_and_vision_only_adapters_refused(tmp_path):
    base, adapter, deltas = _gemma3_vl(tmp_path / "a", ["q_proj"], modules_to_save=["mm_soft_emb_norm"])
    a = lorafuse.load(adapter)
    assert any(".multi_modal_projector." in k for k in a.full)
    rep = convert(a, tmp_path / "a.gguf", to="gguf", base_config=base)
    assert any(n.startswith("left out 1 full tensor of the vision tower / projector ('model.multi_modal_projector"
                            ".mm_soft_emb_norm.weight')") for n in rep.notes), rep.notes
    _, got = _gguf_deltas(tmp_path / "a.gguf")
    assert sorted(got) == ["blk.0.attn_q.weight", "blk.1.attn_q.weight"]
    np.testing.assert_allclose(got["blk.1.attn_q.weight"], deltas["model.language_model.layers.1.self_attn.q_proj"],
                               rtol=0, atol=1e-6)

    base, adapter, _ = _gemma3_vl(tmp_path / "v", r".*vision_tower.*\.(q_proj|v_proj)")
    with pytest.raises(UnsupportedError) as e:
        convert(lorafuse.load(adapter), tmp_path / "v.gguf", to="gguf", base_config=base)
    assert str(e.value) == (
        f"{adapter}: no LoRA module to write: its 2 modules ('model.vision_tower.encoder.layers.0.self_attn.q_proj', "
        "'model.vision_tower.encoder.layers.0.self_attn.v_proj') are in the vision tower / multimodal projector, "
        f"and {_VISION_NOTE}; nothing was written")
    assert not (tmp_path / "v.gguf").exists()


def test_unmapped_modules_outside_the_text_layers_do_not_only_blame_arch(tmp_path):
    rng = np.random.default_rng(0)
    sd = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 64), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((64, 4), np.float32),
        "base_model.model.model.image_encoder.layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 32), np.float32),
        "base_model.model.model.image_encoder.layers.0.q_proj.lora_B.weight": rng.standard_normal((32, 4), np.float32),
    }
    with pytest.raises(MissingModuleError) as e:
        convert(lorafuse.Adapter.from_state_dict(sd), tmp_path / "x.gguf", to="gguf", arch="qwen2")
    assert str(e.value).endswith(
        "1 module has no tensor in llama.cpp's 'qwen2' architecture: 'model.image_encoder.layers.0.q_proj' (32, 32); "
        "nothing was written ('model.image_encoder.layers.0.q_proj' is outside the text model's layers: llama.cpp "
        "applies --lora to the text model's tensors only (a multimodal model's vision tower and projector are in its "
        "separate mmproj file); or --arch, Python: arch=, names another architecture)")


# ----------------------------------------------------------------------------- 2: a GGUF file read as an adapter


def _a_gguf_lora(tmp: Path) -> Path:
    rng = np.random.default_rng(1)
    sd = {"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": rng.standard_normal((4, 64), np.float32),
          "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": rng.standard_normal((32, 4), np.float32)}
    out = tmp / "lora.gguf"
    convert(lorafuse.Adapter.from_state_dict(sd), out, to="gguf", arch="qwen2")
    return out


def test_a_gguf_file_given_as_an_adapter_is_named_as_gguf(tmp_path, capsys):
    path = _a_gguf_lora(tmp_path)
    why = (f"{path}: a GGUF file (llama.cpp; magic 'GGUF'), which lorafuse does not read as an adapter: it writes "
           "GGUF LoRAs (lorafuse convert ADAPTER --to gguf) and describes GGUF files (lorafuse info), but reads "
           "adapters as safetensors: expected ")
    with pytest.raises(FormatError) as e:
        lorafuse.load(path)
    assert str(e.value).startswith(why)
    base = tmp_path / "base"
    base.mkdir()
    for argv in (("convert", path, "--to", "peft", "-o", tmp_path / "o.safetensors"),
                 ("apply", base, path, "-o", tmp_path / "merged"),
                 ("combine", path, path, "-o", tmp_path / "c.safetensors"),
                 ("similarity", path, path),
                 ("resize", path, "--rank", "2", "-o", tmp_path / "r.safetensors")):
        rc, _, err = _run(capsys, *argv)
        assert rc == 1 and f"error: FormatError: {why}" in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "lora.gguf"]


def test_gguf_check_is_on_the_error_path_only(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    sd = {"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": rng.standard_normal((4, 64), np.float32),
          "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": rng.standard_normal((32, 4), np.float32)}
    folder = tmp_path / "peft"
    lorafuse.Adapter.from_state_dict(sd, {"r": 4, "lora_alpha": 8}).save(folder, format="peft")
    other = tmp_path / "notes.dat"
    other.write_bytes(b"\x00" * 64)

    def no_io(path: Path) -> bool:
        raise AssertionError(f"is_gguf({path}) on the success path")

    monkeypatch.setattr(lf_gguf, "is_gguf", no_io)
    assert lorafuse.load(folder).updates  # recognised: no GGUF probe
    monkeypatch.undo()
    with pytest.raises(FormatError, match=r"notes\.dat: not a recognised adapter"):
        lorafuse.load(other)


# ----------------------------------------------------------------------------- 3: note wording


def test_alpha_zero_and_single_element_rows_notes(tmp_path):
    rng = np.random.default_rng(3)
    sd = {f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight":
          rng.standard_normal((1, 64) if ab == "A" else (rows, 1), np.float32)
          for m, rows in (("q_proj", 64), ("v_proj", 32)) for ab in "AB"}
    a = lorafuse.Adapter.from_state_dict(sd, {"r": 1, "lora_alpha": 0})
    out = tmp_path / "a0.gguf"
    rep = convert(a, out, to="gguf", arch="qwen2", gguf_type="q8_0")
    assert rep.notes == [
        "2 modules have a scale other than alpha / r with the file's one alpha 0 (llama.cpp reads it as a scale of "
        "1): their scale / (alpha / r) is folded into lora_b, exactly ('model.layers.0.self_attn.q_proj', "
        "'model.layers.0.self_attn.v_proj')",
        "2 tensors written F16, not Q8_0, as llama.cpp's converter does: their rows (1 element) are not a multiple "
        "of 32 ('blk.0.attn_q.weight.lora_b', 'blk.0.attn_v.weight.lora_b')",
    ]
    meta, got = _gguf_deltas(out)
    assert meta["adapter.lora.alpha"] == 0.0
    for name in ("blk.0.attn_q.weight", "blk.0.attn_v.weight"):  # PEFT's scale 0 / 1 = 0: the delta is zero
        assert not got[name].any()

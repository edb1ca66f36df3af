"""Round 15 red team, loose ends of earlier rounds (leftovers2):

- (4) the Python API's `progress=False` (combine's default) still drew huggingface_hub's own download bars for a
  Hub id (only the CLI's -q / --json / --no-progress silenced them);
- (5) the recipe JSON schema (`lorafuse run --print-schema`) listed only lower-case values for fields the loader
  takes in any case (merge_method, dtype, format, split), so a schema-checking editor flagged recipes that run; and
  the loader refused other cases of the names the CLI takes in any case (engine, majority_sign, embeddings);
- (1) a streamed combination whose weighted terms cancel (an adapter with itself at weights 1 and -1) wrote
  float32 rounding noise as its update, with a relative error estimate above 1 (noise over noise);
- (3) F64 factors beyond float32's range in opposite directions (A of 2^-160, B of 2^120: a delta float32 holds)
  were narrowed to zeros by every operation (load's norms, combine, resize, apply, arithmetic; LoHa / LoKr too);
- (6) a diffusers LoRA (`unet.down_blocks...`) combined with --format peft gave a folder PEFT cannot load;
- (2) the streamed engine wrote a wrong delta (100% off, exit 0) for A of 2^-150 times B of 2^62 and refused
  factors of 2^61 that the in-memory engine takes.

References: huggingface_hub's own progress-bar switch, the `jsonschema` package, peft itself, numpy float64."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hub_fixtures import bar_recording_hub
from redteam_fixtures import peft_deltas, peft_folder, run_cli

import lorafuse

MODULE = "model.layers.0.self_attn.q_proj"
SHAPES = {MODULE: (48, 32)}


# ----------------------------------------------------------------------------- (4) Hub bars with progress=False


@pytest.fixture
def hub_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """org/ad in an offline cache, and snapshot_download drawing a huggingface_hub bar as a real download does:
    the list records whether bars were off during each download."""
    src = peft_folder(tmp_path / "src", SHAPES, 3)
    return bar_recording_hub(monkeypatch, tmp_path, src)


def test_api_combine_default_progress_false_draws_no_hub_bar(hub_adapter: list[bool],
                                                             capsys: pytest.CaptureFixture[str]):
    from huggingface_hub.utils import are_progress_bars_disabled

    mix = lorafuse.combine(["org/ad", "org/ad"], [0.5, 0.5], rank=2)  # progress=False by default
    assert len(mix) == 1
    assert hub_adapter and all(hub_adapter)
    assert "Fetching files" not in capsys.readouterr().err
    assert not are_progress_bars_disabled()  # back on after it


def test_api_resize_progress_false_draws_no_hub_bar(hub_adapter: list[bool], capsys: pytest.CaptureFixture[str]):
    lorafuse.resize("org/ad", rank=1, progress=False)
    assert hub_adapter and all(hub_adapter)
    assert "Fetching files" not in capsys.readouterr().err


def test_api_resize_progress_none_keeps_the_hub_bar(hub_adapter: list[bool], capsys: pytest.CaptureFixture[str]):
    lorafuse.resize("org/ad", rank=1)
    assert hub_adapter and not any(hub_adapter)
    assert "Fetching files" in capsys.readouterr().err


# ----------------------------------------------------------------------------- (5) the recipe schema and loader


def _stage(**fields: object) -> dict[str, object]:
    return {"merge_method": "svd", "models": [{"model": "a"}], **fields}


SPELLINGS = [
    ({"merge_method": "SVD"}, True), ({"merge_method": "Linear"}, True), ({"merge_method": "\u212ainear"}, False),
    ({"merge_method": "svdx"}, False), ({"dtype": "BF16"}, True), ({"dtype": "Float32"}, True),
    ({"dtype": "bf 16"}, False), ({"format": "PEFT"}, True), ({"format": "\u212aohya"}, False),
    ({"parameters": {"split": "SQRT"}}, True), ({"parameters": {"split": "b"}}, True),
    ({"parameters": {"split": "c"}}, False), ({"parameters": {"engine": "STREAM"}}, True),
    ({"parameters": {"engine": "streams"}}, False), ({"parameters": {"majority_sign": "Total"}}, True),
    ({"parameters": {"embeddings": "LoRA"}}, True), ({"parameters": {"embeddings": "\u212aip"}}, False),
]


def _loads(stage: dict[str, object], tmp_path: Path) -> bool:
    """Whether the recipe loader takes the stage: its fields (the pydantic model), and a merge_method by a dry run
    (checks.py names an unknown one) of the stage over a real adapter."""
    from pydantic import ValidationError

    from lorafuse.errors import LorafuseError
    from lorafuse.recipes.schema import Stage

    try:
        Stage.model_validate(stage)
        if stage["merge_method"] != "svd":
            a = peft_folder(tmp_path / "a", SHAPES, 1)
            lorafuse.run({**stage, "models": [{"model": str(a)}, {"model": str(a)}]}, str(tmp_path / "o"),
                         dry_run=True)
    except (ValidationError, LorafuseError):
        return False
    return True


@pytest.mark.parametrize(("fields", "ok"), SPELLINGS)
def test_recipe_schema_and_loader_agree_on_spellings(fields: dict[str, object], ok: bool, tmp_path: Path):
    """The schema `lorafuse run --print-schema` prints accepts exactly the spellings the recipe loader accepts."""
    import jsonschema

    from lorafuse.recipes.schema import schema_json

    stage = _stage(**fields)
    schema_ok = jsonschema.Draft202012Validator(schema_json()).is_valid(stage)
    assert (schema_ok, _loads(stage, tmp_path)) == (ok, ok)


def test_print_schema_is_the_schema_with_any_case_fields(capsys: pytest.CaptureFixture[str]):
    import jsonschema

    code, out, _ = run_cli(["run", "--print-schema"])
    assert code == 0
    schema = json.loads(out)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(_stage(merge_method="LINEAR", dtype="FP16", parameters={"engine": "Memory"}))
    assert not validator.is_valid(_stage(merge_method="LINEAR!"))
    pattern = schema["properties"]["merge_method"]["anyOf"][1]["pattern"]
    assert re.fullmatch(pattern, "Magnitude_Prune_SVD") and not re.fullmatch(pattern, "magnitude")


@pytest.mark.parametrize("value", ["STREAM", "Memory"])
def test_recipe_engine_takes_any_case_as_the_cli(tmp_path: Path, value: str):
    a = peft_folder(tmp_path / "a", SHAPES, 1)
    b = peft_folder(tmp_path / "b", SHAPES, 2)
    report = lorafuse.run({"merge_method": "svd", "models": [{"model": str(a)}, {"model": str(b)}],
                           "parameters": {"rank": 4, "engine": value}}, str(tmp_path / "out"))
    assert report is not None
    want = peft_deltas(a)[MODULE] + peft_deltas(b)[MODULE]
    got = peft_deltas(tmp_path / "out")[MODULE]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5  # rank 2 + 2: the sum itself


# ----------------------------------------------------------------------------- (3) F64 factors beyond float32


def _f64_adapter(folder: Path, ea: int, eb: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A PEFT adapter of float64 factors A ~ 2^ea, B ~ 2^eb (alpha = r = 4): its folder and B @ A (float64)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((4, 32)) * 2.0**ea
    b = rng.standard_normal((48, 4)) * 2.0**eb
    folder.mkdir(parents=True)
    save_file({f"base_model.model.{MODULE}.lora_A.weight": a, f"base_model.model.{MODULE}.lora_B.weight": b},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                            "target_modules": ["q_proj"]}))
    return folder, b @ a


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _delta(u: object) -> np.ndarray:
    b, a = (np.asarray(x, np.float64) for x in u.stored_factors(0))  # type: ignore[attr-defined]
    return u.scale * b @ a  # type: ignore[attr-defined]


def test_f64_tiny_a_times_large_b_is_not_narrowed_to_zero(tmp_path: Path):
    """A of 2^-160 (below float32's smallest subnormal) times B of 2^120: a delta of ~7e-11 that float32 holds;
    before, loading narrowed A to zeros and norms, combine (both engines), resize and arithmetic gave 0."""
    a, want = _f64_adapter(tmp_path / "a", -160, 120)
    loaded = lorafuse.load(a)
    assert abs(loaded.norms()[MODULE] - np.linalg.norm(want)) <= 1e-6 * np.linalg.norm(want)
    assert _rel(_delta((loaded + loaded).updates[MODULE]), 2 * want) < 1e-6
    for engine in ("memory", "stream"):
        mix = lorafuse.combine([a, a], [0.5, 0.5], rank=4, engine=engine, dtype="fp32")
        assert _rel(_delta(mix.updates[MODULE]), want) < 1e-5, engine
    res = lorafuse.resize(a, rank=4, dtype="fp32")
    assert _rel(_delta(res.adapter.updates[MODULE]), want) < 1e-5


def test_f64_unbalanced_adapter_applies_its_delta(tmp_path: Path):
    a, want = _f64_adapter(tmp_path / "a", -160, 150)  # delta ~2^-10
    from safetensors.numpy import load_file, save_file

    base = tmp_path / "base"
    base.mkdir()
    w = np.zeros((48, 32), np.float32)
    save_file({f"{MODULE}.weight": w}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run_cli(["apply", str(base), str(a), "-o", str(tmp_path / "out"), "-q"])
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))[f"{MODULE}.weight"].astype(np.float64)
    assert _rel(got, want) < 1e-6


def test_f64_state_dict_is_balanced_too():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 16)) * 2.0**-200
    b = rng.standard_normal((16, 2)) * 2.0**190
    state = {f"base_model.model.{MODULE}.lora_A.weight": a, f"base_model.model.{MODULE}.lora_B.weight": b}
    ad = lorafuse.Adapter.from_state_dict(state, {"r": 2, "lora_alpha": 2})
    assert _rel(_delta(ad.updates[MODULE]), b @ a) < 1e-6


def test_f64_factors_balanced_only_where_needed(tmp_path: Path):
    """An F64 adapter of ordinary factors stays as stored (views of its file); one of 1e-21 factors (a product
    float32 holds as factors) is not touched either."""
    a, _ = _f64_adapter(tmp_path / "a", -3, 2)
    u = lorafuse.load(a).updates[MODULE]
    assert not u.A.raw.flags.owndata  # still the file's mapping
    b, want = _f64_adapter(tmp_path / "b", -70, -70)
    assert _rel(_delta(lorafuse.load(b).updates[MODULE]), want) < 1e-6


# ----------------------------------------------------------------------------- (6) diffusers names in a PEFT folder

UNET_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _diffusers_lora(path: Path) -> Path:
    """A diffusers LoRA file (`unet.<module>.lora_A.weight`, as diffusers' save_lora_weights writes) of one 8 x 8
    attention projection of an SD 1.x UNet."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    save_file({f"unet.{UNET_Q}.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
               f"unet.{UNET_Q}.lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32)}, str(path))
    return path


def test_combine_of_a_diffusers_lora_as_peft_folder_is_refused_saying_why(tmp_path: Path):
    """Before: a folder whose target_modules were `unet.down_blocks...`, which PEFT cannot load into a UNet
    (NoMatchingPeftModuleError: test below) and diffusers' load_lora_adapter silently loads nothing from."""
    d = _diffusers_lora(tmp_path / "d.safetensors")
    out = tmp_path / "out"
    code, _, err = run_cli(["combine", str(d), str(d), "--rank", "4", "--format", "peft", "-o", str(out)])
    assert code == 2 and "Traceback" not in err
    assert f"unet.{UNET_Q}" in err and "--format diffusers" in err and str(d) in err
    assert not out.exists()
    code, _, err = run_cli(["combine", str(d), str(d), "--rank", "4", "--format", "diffusers", "-o", str(out)])
    assert code == 0, err


def test_saving_a_diffusers_lora_as_peft_is_refused(tmp_path: Path):
    a = lorafuse.load(_diffusers_lora(tmp_path / "d.safetensors"))
    with pytest.raises(lorafuse.UnsupportedError, match="pipeline path"):
        a.save(tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


def test_a_peft_folder_of_unet_prefixed_names_is_what_peft_cannot_load(tmp_path: Path):
    """The refusal's reason, from peft itself: a UNet adapter folder targeting `unet.down_blocks...` finds no module
    of the UNet; the same folder without the pipeline's `unet.` loads."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8, in_channels=4,
                                out_channels=4, layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=2)
    for name in (f"unet.{UNET_Q}", UNET_Q):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": [name]}))
        save_file({f"base_model.model.{name}.lora_A.weight": torch.ones(4, 8),
                   f"base_model.model.{name}.lora_B.weight": torch.ones(8, 4)},
                  str(folder / "adapter_model.safetensors"))
        if name.startswith("unet."):
            with pytest.raises(NoMatchingPeftModuleError):
                PeftModel.from_pretrained(unet, str(folder))
        else:
            model = PeftModel.from_pretrained(unet, str(folder))
            assert any("lora_A" in n for n, _ in model.named_parameters())


def test_a_peft_adapter_of_a_model_with_a_unet_attribute_still_round_trips(tmp_path: Path):
    """A PEFT adapter's own names (a model whose attribute is called `unet`) are PEFT's: written back as read."""
    src = peft_folder(tmp_path / "a", {"unet.proj": (8, 8)}, 1)
    a = lorafuse.load(src)
    a.save(tmp_path / "out", format="peft")
    np.testing.assert_allclose(peft_deltas(tmp_path / "out")["unet.proj"], peft_deltas(src)["unet.proj"], rtol=1e-6)


# ----------------------------------------------------------------------------- (3) F64 LyCORIS pieces


def test_f64_loha_and_lokr_pieces_far_apart_keep_their_delta(tmp_path: Path):
    """LyCORIS pieces in F64, one of 2^-160 and one of 2^120 (a delta of ~1e-10): before, read as zeros (norms 0,
    resize wrote a zero update). Reference: numpy float64 of LyCORIS' own formulas."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    m = "lora_unet_down_blocks_0_attentions_0_proj_in"
    w1a, w1b = rng.standard_normal((32, 4)) * 2.0**120, rng.standard_normal((4, 32)) * 2.0**-160
    w2a, w2b = rng.standard_normal((32, 4)), rng.standard_normal((4, 32))
    save_file({f"{m}.hada_w1_a": w1a, f"{m}.hada_w1_b": w1b, f"{m}.hada_w2_a": w2a, f"{m}.hada_w2_b": w2b,
               f"{m}.alpha": np.array(4.0)}, str(tmp_path / "h.safetensors"))
    want = (w1a @ w1b) * (w2a @ w2b)
    assert abs(lorafuse.load(tmp_path / "h.safetensors").norms()[m] / np.linalg.norm(want) - 1) < 1e-6
    res = lorafuse.resize(tmp_path / "h.safetensors", rank=16, dtype="fp32").adapter
    assert _rel(_delta(res.updates[m]), want) < 1e-5
    w1 = rng.standard_normal((4, 4)) * 2.0**-150
    w2a, w2b = rng.standard_normal((8, 2)) * 2.0**70, rng.standard_normal((2, 8)) * 2.0**70
    save_file({f"{m}.lokr_w1": w1, f"{m}.lokr_w2_a": w2a, f"{m}.lokr_w2_b": w2b, f"{m}.alpha": np.array(2.0)},
              str(tmp_path / "k.safetensors"))
    want = np.kron(w1, w2a @ w2b)  # alpha / r = 1
    assert abs(lorafuse.load(tmp_path / "k.safetensors").norms()[m] / np.linalg.norm(want) - 1) < 1e-6

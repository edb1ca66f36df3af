"""PEFT's own reading of an adapter folder is the reference (issue #13 §2, §4, §5).

Every case starts from an adapter that PEFT itself saved for a tiny Llama or GPT-2, edits its
config or tensors the way a user or another tool might, and compares lorafuse.apply (and the CLI)
with what PEFT's `PeftModel.from_pretrained(...).merge_and_unload()` makes of the same files; where
PEFT's result depends on random initial values, lorafuse must refuse, naming the reason.
The targeting and rank_pattern rules are also checked name by name against PEFT's functions.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import peft_fixtures as pf
import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse import (
    FormatError,
    MissingModuleError,
    ShapeMismatchError,
    UnsupportedError,
)
from lorafuse.cli import main as cli_main
from lorafuse.formats import peft as peft_format

F32_EPS = float(np.finfo(np.float32).eps)
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# The adapters here leave modules out on purpose; what loading tells about them is asserted where it
# is the subject (pytest.warns / Adapter.notes), and only there.
pytestmark = pytest.mark.filterwarnings("ignore::lorafuse.errors.AdapterNote")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> pf.Case:
    return pf.llama_case(tmp_path_factory.mktemp("llama"), seed=3)


@pytest.fixture(scope="module")
def llama_dora(tmp_path_factory: pytest.TempPathFactory) -> pf.Case:
    return pf.llama_case(tmp_path_factory.mktemp("llama_dora"), seed=4, use_dora=True)


@pytest.fixture(scope="module")
def llama_bias(tmp_path_factory: pytest.TempPathFactory) -> pf.Case:
    return pf.llama_case(tmp_path_factory.mktemp("llama_bias"), seed=5, lora_bias=True)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> pf.Case:
    return pf.gpt2_case(tmp_path_factory.mktemp("gpt2"), seed=6)


def edited(case: pf.Case, dst: Path, config: dict[str, object] | None = None,
           tensors: Callable[[dict[str, np.ndarray]], None] | None = None) -> Path:
    """A copy of the case's adapter folder with `config` fields replaced and `tensors` edited in place."""
    shutil.copytree(case.adapter_dir, dst)
    if config:
        cfg = json.loads((dst / CONFIG).read_text())
        cfg.update(config)
        (dst / CONFIG).write_text(json.dumps(cfg))
    if tensors:
        t = load_file(str(dst / WEIGHTS))
        tensors(t)
        save_file(t, str(dst / WEIGHTS), {"format": "pt"})
    return dst


def peft_merged(base_dir: Path, adapter_dir: Path, model_cls: type) -> dict[str, np.ndarray]:
    """PEFT's merge_and_unload of the files, keyed like the saved base checkpoint."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls.from_pretrained(str(base_dir), dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    sd = merged.state_dict()
    return {k: sd[k].detach().float().numpy().copy() for k in pf.saved_keys(base_dir)}


def base_state(base_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(base_dir / "model.safetensors"))


def assert_matches_peft(got_dir: Path, ref: dict[str, np.ndarray]) -> None:
    got = load_file(str(got_dir / "model.safetensors"))
    assert set(got) == set(ref)
    for key, r in ref.items():
        tol = 8 * F32_EPS * max(1.0, float(np.abs(r).max()))
        err = float(np.abs(got[key].astype(np.float64) - r.astype(np.float64)).max())
        assert err <= tol, f"{key}: max error {err:.3g} > {tol:.3g}"


def changed_keys(ref: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> set[str]:
    return {k for k in ref if not np.array_equal(ref[k], base[k])}


def merge_and_compare(case: pf.Case, adapter: Path, out: Path) -> tuple[lorafuse.ops.apply.ApplyReport, set[str]]:
    """lorafuse.apply against PEFT on `adapter`; returns the report and the keys PEFT changed."""
    ref = peft_merged(case.base_dir, adapter, case.model_cls)
    report = lorafuse.apply(case.base_dir, [adapter], out=out, progress=False)
    assert_matches_peft(out, ref)
    return report, changed_keys(ref, base_state(case.base_dir))


def layer_keys(changed: set[str]) -> set[str]:
    return {k.removeprefix("model.").removesuffix(".weight") for k in changed}


# ----------------------------------------------------------------------------- fan_in_fan_out


def test_fan_in_fan_out_true_on_llama_linear_merges_like_peft(llama, tmp_path):
    """PEFT resets fan_in_fan_out for nn.Linear: square (q, o) and non-square (k, v, mlp) weights
    merge untransposed; before, lorafuse transposed every delta."""
    adapter = edited(llama, tmp_path / "a", {"fan_in_fan_out": True})
    _, changed = merge_and_compare(llama, adapter, tmp_path / "out")
    assert len(changed) == 14  # every targeted weight of the two layers


def test_fan_in_fan_out_true_via_cli(llama, tmp_path):
    adapter = edited(llama, tmp_path / "a", {"fan_in_fan_out": True})
    ref = peft_merged(llama.base_dir, adapter, llama.model_cls)
    assert cli_main(["apply", str(llama.base_dir), str(adapter), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert_matches_peft(tmp_path / "out", ref)


@pytest.mark.parametrize("flag", [True, False])
def test_gpt2_conv1d_is_transposed_whatever_the_flag(gpt2, tmp_path, flag):
    """GPT-2's c_attn / c_proj / c_fc are transformers Conv1D (weight in x out): PEFT forces
    fan_in_fan_out on for them, so a config saying false merges the same as one saying true."""
    adapter = edited(gpt2, tmp_path / "a", {"fan_in_fan_out": flag})
    _, changed = merge_and_compare(gpt2, adapter, tmp_path / "out")
    assert {k.rsplit(".", 2)[-2] for k in changed} == {"c_attn", "c_proj", "c_fc"}
    assert len(changed) == 8  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in 2 layers


def test_gpt2_without_config_json_decides_non_square_by_shape_and_refuses_square(gpt2, tmp_path):
    """Without config.json the layer type of a square weight (attn.c_proj, 64 x 64) cannot be known."""
    base = tmp_path / "base"
    shutil.copytree(gpt2.base_dir, base)
    (base / "config.json").unlink()
    with pytest.raises(UnsupportedError, match=r"module 'transformer\.h\.0\.attn\.c_proj': cannot tell whether base "
                                               r"weight 'transformer\.h\.0\.attn\.c_proj\.weight' \(64 x 64\) is a "
                                               r"torch Linear .* or a transformers Conv1D .*names no model_type"):
        lorafuse.apply(base, [gpt2.adapter_dir], out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # Without the square modules, the non-square ones are placed by their shape, as PEFT does.
    cfg = {"target_modules": ["c_attn", "c_fc", "mlp.c_proj"]}
    adapter = edited(gpt2, tmp_path / "a", cfg)
    ref = peft_merged(gpt2.base_dir, adapter, gpt2.model_cls)
    lorafuse.apply(base, [adapter], out=tmp_path / "out2", progress=False)
    assert_matches_peft(tmp_path / "out2", ref)


def test_llama_square_weight_without_config_json(llama, tmp_path):
    """A Linear square weight of an unknown model: fine with fan_in_fan_out false (no sign of Conv1D),
    refused with true (it could be a Conv1D)."""
    base = tmp_path / "base"
    shutil.copytree(llama.base_dir, base)
    (base / "config.json").unlink()
    ref = peft_merged(llama.base_dir, llama.adapter_dir, llama.model_cls)
    lorafuse.apply(base, [llama.adapter_dir], out=tmp_path / "out", progress=False)
    assert_matches_peft(tmp_path / "out", ref)
    adapter = edited(llama, tmp_path / "a", {"fan_in_fan_out": True})
    with pytest.raises(UnsupportedError, match=r"self_attn\.(q|o)_proj': cannot tell whether .* \(64 x 64\)"):
        lorafuse.apply(base, [adapter], out=tmp_path / "out2", progress=False)


def test_gpt2_adapter_on_a_transposed_base_is_refused(gpt2, tmp_path):
    """A GPT-2 base whose c_fc is stored out x in (as a Linear would be) does not fit a Conv1D layer."""
    base = tmp_path / "base"
    shutil.copytree(gpt2.base_dir, base)
    state = load_file(str(base / "model.safetensors"))
    state["transformer.h.0.mlp.c_fc.weight"] = np.ascontiguousarray(state["transformer.h.0.mlp.c_fc.weight"].T)
    save_file(state, str(base / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ShapeMismatchError, match=r"module 'transformer\.h\.0\.mlp\.c_fc': base weight "
                                                 r"'transformer\.h\.0\.mlp\.c_fc\.weight' has shape \(256, 64\), the "
                                                 r"transpose of .* \(64, 256\): in a 'gpt2' model this layer is a "
                                                 r"transformers Conv1D"):
        lorafuse.apply(base, [gpt2.adapter_dir], out=tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- which modules PEFT targets


TARGETING = {
    "regex_string": {"target_modules": r".*\.layers\.1\..*(q|v)_proj"},
    "layers_to_transform_list": {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [0]},
    "layers_to_transform_int_pattern": {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 1,
                                        "layers_pattern": "layers"},
    "layers_pattern_list": {"target_modules": ["k_proj"], "layers_to_transform": [1],
                            "layers_pattern": ["blocks", "layers"]},
    "exclude_list": {"exclude_modules": ["down_proj", "layers.0.self_attn.q_proj"]},
    "exclude_regex": {"exclude_modules": r".*mlp\.(gate|up)_proj"},
    "full_name_skips_layers_to_transform": {"target_modules": ["model.layers.1.self_attn.o_proj", "v_proj"],
                                            "layers_to_transform": [0]},
    "modules_to_save_is_never_a_lora_target": {"modules_to_save": ["v_proj"]},
    "all_linear": {"target_modules": "all-linear"},
    "no_target_modules": {"target_modules": None},
}
EXPECTED = {  # module names (without 'model.') whose weights PEFT changes
    "regex_string": {"layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"},
    "layers_to_transform_list": {"layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.0.mlp.down_proj"},
    "layers_to_transform_int_pattern": {"layers.1.self_attn.q_proj", "layers.1.mlp.up_proj"},
    "layers_pattern_list": {"layers.1.self_attn.k_proj"},
    "full_name_skips_layers_to_transform": {"layers.1.self_attn.o_proj", "layers.0.self_attn.v_proj"},
}
ALL = {f"layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                    "mlp.down_proj")}
EXPECTED["exclude_list"] = ALL - {"layers.0.mlp.down_proj", "layers.1.mlp.down_proj", "layers.0.self_attn.q_proj"}
EXPECTED["exclude_regex"] = ALL - {f"layers.{i}.mlp.{m}" for i in (0, 1) for m in ("gate_proj", "up_proj")}
EXPECTED["modules_to_save_is_never_a_lora_target"] = ALL  # v_proj: replaced by the saved copy, LoRA ignored
EXPECTED["all_linear"] = ALL
EXPECTED["no_target_modules"] = ALL


def _saved_v_proj(case: pf.Case) -> Callable[[dict[str, np.ndarray]], None]:
    """modules_to_save copies of v_proj, as PEFT saves them (PEFT cannot load the folder without them)."""
    def add(t: dict[str, np.ndarray]) -> None:
        base = base_state(case.base_dir)
        for i in (0, 1):
            key = f"model.layers.{i}.self_attn.v_proj.weight"
            t["base_model.model." + key] = base[key] + np.float32(0.01)
    return add


@pytest.mark.parametrize("name", list(TARGETING))
def test_untargeted_modules_are_ignored_like_peft(llama, tmp_path, name):
    extra = _saved_v_proj(llama) if name == "modules_to_save_is_never_a_lora_target" else None
    adapter = edited(llama, tmp_path / "a", TARGETING[name], extra)
    if name == "no_target_modules":  # PEFT would use its default targets for llama (q_proj, v_proj): not comparable
        report = lorafuse.apply(llama.base_dir, [adapter], out=tmp_path / "out", progress=False)
        assert len(report.merged) == 14
        return
    report, changed = merge_and_compare(llama, adapter, tmp_path / "out")
    assert layer_keys(changed) == EXPECTED[name]
    dropped = len(ALL) - len(EXPECTED[name])
    if dropped:
        note = next(n for n in report.notes if "does not target" in n)
        assert (f"ignored {dropped} module{'' if dropped == 1 else 's'} that adapter_config.json does not target, "
                "as PEFT ignores them") in note
        assert str(adapter) in note
    replaced = {f"model.layers.{i}.self_attn.v_proj.weight" for i in (0, 1)} if extra else set()
    assert sorted(report.merged) == sorted({f"model.{m}.weight" for m in EXPECTED[name]} - replaced)
    assert sorted(report.replaced) == sorted(replaced)


def test_all_linear_leaves_out_lm_head(tmp_path):
    """'all-linear' never targets the output layer: PEFT ignores lm_head tensors in the file."""
    case = pf.llama_case(tmp_path / "c", seed=7, target_modules=("q_proj", "lm_head"))
    # init_lora_weights=true: the layers 'all-linear' adds and the file lacks start (and stay) at zero in PEFT
    adapter = edited(case, tmp_path / "a", {"target_modules": "all-linear", "init_lora_weights": True})
    report, changed = merge_and_compare(case, adapter, tmp_path / "out")
    assert changed == {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    assert any("'lm_head' (not a linear layer below the output layer ('all-linear'))" in n for n in report.notes)


def test_targeted_layers_missing_from_the_file_with_random_init_are_refused(tmp_path):
    """init_lora_weights=false (the fixtures' setting): PEFT gives the targeted layers the file lacks
    random factors and merges them; that cannot be reproduced."""
    case = pf.llama_case(tmp_path / "c", seed=8, target_modules=("q_proj",))
    adapter = edited(case, tmp_path / "a", {"target_modules": ["q_proj", "v_proj"]})
    ref = peft_merged(case.base_dir, adapter, case.model_cls)
    assert "model.layers.0.self_attn.v_proj.weight" in changed_keys(ref, base_state(case.base_dir))  # noise
    with pytest.raises(UnsupportedError, match=r"adapter_config\.json targets 2 layers of the base that have no "
                                               r"tensors in the file \('model\.layers\.0\.self_attn\.v_proj', "
                                               r"'model\.layers\.1\.self_attn\.v_proj'\), and says "
                                               r"init_lora_weights=false"):
        lorafuse.apply(case.base_dir, [adapter], out=tmp_path / "out", progress=False)
    adapter = edited(case, tmp_path / "b", {"target_modules": ["q_proj", "v_proj"], "init_lora_weights": True})
    merge_and_compare(case, adapter, tmp_path / "out")


def test_ensure_weight_tying_keeps_the_tied_lm_head(tmp_path):
    """With ensure_weight_tying PEFT also puts LoRA on lm_head (tied to embed_tokens'), although
    target_modules does not name it; lorafuse keeps it and, as for any tied embedding, unties the
    two so the merged model computes what the unmerged PEFT model computes."""
    from peft import get_peft_model

    case = pf.llama_case(tmp_path / "c", seed=9, tie_word_embeddings=True, target_modules=("q_proj",))
    torch.manual_seed(9)
    config = LoraConfig(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True, r=4, lora_alpha=8,
                        init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = get_peft_model(case.model_cls.from_pretrained(str(case.base_dir)), config)
        pf._randomize_adapter(trained)
        trained.save_pretrained(str(tmp_path / "a"))
        unmerged = PeftModel.from_pretrained(case.model_cls.from_pretrained(str(case.base_dir)),
                                             str(tmp_path / "a")).eval()
    assert "lm_head" not in json.loads((tmp_path / "a" / CONFIG).read_text())["target_modules"]
    assert "lm_head" in lorafuse.load(tmp_path / "a").updates
    report = lorafuse.apply(case.base_dir, [tmp_path / "a"], out=tmp_path / "out", progress=False)
    assert "lm_head.weight" in report.merged and not any("does not target" in n for n in report.notes)
    merged = case.model_cls.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(case.input_ids).logits, unmerged(case.input_ids).logits, rtol=0,
                                   atol=1e-4)


def test_nothing_targeted_is_refused(llama, tmp_path):
    adapter = edited(llama, tmp_path / "a", {"target_modules": ["not_a_layer"]})
    with pytest.raises(FormatError, match=r"none of the 14 LoRA modules in the file is targeted by "
                                          r"adapter_config\.json \(target_modules=\['not_a_layer'\]\).*PEFT would "
                                          "merge nothing"):
        lorafuse.load(adapter)


MODULE_NAMES = [
    "model.layers.0.self_attn.q_proj", "model.layers.12.mlp.down_proj", "layers.3.self_attn.v_proj",
    "transformer.h.0.attn.c_attn", "model.layers.1.mlp.experts.7.gate_proj", "lm_head", "model.embed_tokens",
    "model.decoder.layers.2.fc1", "encoder.blocks.4.attn.qkv", "q_proj", "model.layers.x.self_attn.q_proj",
    "vision_tower.layers.0.q_proj", "model.layers.0.self_attn.q_proj_extra",
]
TARGET_CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj", "fc1", "gate_proj"], "layers_to_transform": [0, 1, 2]},
    {"target_modules": ["q_proj", "down_proj", "c_attn"], "layers_to_transform": 12},
    {"target_modules": ["q_proj", "qkv", "gate_proj"], "layers_to_transform": [4, 1],
     "layers_pattern": ["blocks", "h"]},
    {"target_modules": ["q_proj", "gate_proj"], "layers_to_transform": [7, 1], "layers_pattern": "experts"},
    {"target_modules": r".*(q|v)_proj"},
    {"target_modules": r"model\.layers\.\d+\.(self_attn|mlp)\..*", "exclude_modules": r".*\.1\d?\..*"},
    {"target_modules": ["q_proj", "lm_head", "embed_tokens"], "exclude_modules": ["layers.0.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "c_attn", "fc1"], "modules_to_save": ["vision_tower", "decoder"]},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "down_proj"], "layers_to_transform": [3]},
]


@pytest.mark.parametrize("index", range(len(TARGET_CONFIGS)))
def test_targeting_agrees_with_peft_name_by_name(index):
    """lorafuse's rule equals peft.tuners.tuners_utils.check_target_module_exists on each name."""
    fields = TARGET_CONFIGS[index]
    config = LoraConfig(**fields)
    targeting = peft_format.Targeting(fields, "<test>")
    budget = peft_format.MatchBudget("<test>", targeting.regexes, len(MODULE_NAMES))
    for name in MODULE_NAMES:
        peft_says = check_target_module_exists(config, name)
        peft_says = bool(peft_says) and type(peft_says).__name__ != "_ExcludedModule"
        assert (targeting.why_not(name, "linear", budget) is None) == peft_says, (fields, name)


def test_full_tensors_load_where_peft_loads_them(llama, tmp_path):
    """A full tensor replaces a base tensor only where PEFT's load_state_dict finds it: `X.<p>` when X
    has no LoRA layer, `X.base_layer.<p>` when it has one; the others are ignored, as by PEFT."""
    base = base_state(llama.base_dir)

    def add(t: dict[str, np.ndarray]) -> None:
        t["base_model.model.model.norm.weight"] = base["model.norm.weight"] + np.float32(0.5)  # no LoRA: loaded
        t["base_model.model.model.layers.0.self_attn.q_proj.weight"] = base[  # has LoRA: ignored
            "model.layers.0.self_attn.q_proj.weight"] + np.float32(0.5)
        t["base_model.model.model.layers.1.self_attn.k_proj.base_layer.weight"] = base[  # has LoRA: loaded
            "model.layers.1.self_attn.k_proj.weight"] + np.float32(0.5)
        t["base_model.model.model.layers.1.mlp.gate_proj.base_layer.weight"] = base[  # not targeted: ignored
            "model.layers.1.mlp.gate_proj.weight"] + np.float32(0.5)

    adapter = edited(llama, tmp_path / "a", {"exclude_modules": ["layers.1.mlp.gate_proj"]}, add)
    report, changed = merge_and_compare(llama, adapter, tmp_path / "out")
    assert sorted(report.replaced) == ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight"]
    note = next(n for n in report.notes if "PEFT does not load" in n)
    assert "ignored 2 tensors" in note and "'model.layers.0.self_attn.q_proj.weight'" in note
    assert "'model.layers.1.mlp.gate_proj.base_layer.weight'" in note
    # written back, each full tensor goes where PEFT loads it
    lorafuse.load(adapter).save(tmp_path / "again")
    assert_matches_peft(_apply(llama, tmp_path / "again", tmp_path / "out2"),
                        peft_merged(llama.base_dir, tmp_path / "again", llama.model_cls))


# ----------------------------------------------------------------------------- DoRA and lora_B bias


def test_magnitude_without_use_dora_is_ignored_like_peft(llama_dora, tmp_path):
    adapter = edited(llama_dora, tmp_path / "a", {"use_dora": False})
    report, changed = merge_and_compare(llama_dora, adapter, tmp_path / "out")
    assert len(changed) == 14
    assert any("ignored the lora_magnitude_vector tensors of 14 modules because use_dora is false" in n
               for n in report.notes)
    # and it is not the DoRA merge
    dora = peft_merged(llama_dora.base_dir, llama_dora.adapter_dir, llama_dora.model_cls)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert float(np.abs(got[key] - dora[key]).max()) > 1e-3


def test_use_dora_with_a_missing_magnitude_is_refused(llama_dora, tmp_path):
    """PEFT would keep the magnitude it computed when building the layer (random with
    init_lora_weights=false, as in this file): no trained value exists to merge."""
    def drop(t: dict[str, np.ndarray]) -> None:
        del t["base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"]

    adapter = edited(llama_dora, tmp_path / "a", tensors=drop)
    with pytest.raises(FormatError, match=r"use_dora is true but 1 of 14 modules has no lora_magnitude_vector: "
                                          r"'model\.layers\.1\.mlp\.up_proj'\. PEFT would use the value it creates "
                                          r"when it builds the layer .*the file is incomplete"):
        lorafuse.apply(llama_dora.base_dir, [adapter], out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_lora_bias_flag_decides_like_peft(llama_bias, tmp_path):
    adapter = edited(llama_bias, tmp_path / "a", {"lora_bias": False})
    report, changed = merge_and_compare(llama_bias, adapter, tmp_path / "out")
    assert not any(k.endswith(".bias") for k in changed)  # PEFT ignores the lora_B biases
    assert any("because lora_bias is false" in n for n in report.notes)

    def drop(t: dict[str, np.ndarray]) -> None:
        del t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.bias"]

    adapter = edited(llama_bias, tmp_path / "b", tensors=drop)
    with pytest.raises(FormatError, match=r"lora_bias is true but 1 of 14 modules has no lora_B\.bias: "
                                          r"'model\.layers\.0\.self_attn\.k_proj'"):
        lorafuse.load(adapter)


# ----------------------------------------------------------------------------- the same module twice


def test_module_saved_with_and_without_model_prefix_is_refused(llama, tmp_path):
    def duplicate(t: dict[str, np.ndarray]) -> None:
        for k in [k for k in t if ".layers.0.self_attn.q_proj." in k]:
            t[k.replace("base_model.model.model.", "base_model.model.")] = t[k].copy()

    adapter = edited(llama, tmp_path / "a", tensors=duplicate)
    with pytest.raises(FormatError, match=r"modules 'layers\.0\.self_attn\.q_proj' and "
                                          r"'model\.layers\.0\.self_attn\.q_proj' both change base weight "
                                          r"'model\.layers\.0\.self_attn\.q_proj\.weight': the adapter holds the "
                                          r"same module twice"):
        lorafuse.apply(llama.base_dir, [adapter], out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_same_adapter_twice_is_still_a_sum(llama, tmp_path):
    """Two adapters on one weight add up (only modules of one adapter are checked for twins)."""
    report = lorafuse.apply(llama.base_dir, [llama.adapter_dir, llama.adapter_dir], [0.5, 0.5], out=tmp_path / "o",
                            progress=False)
    ref = peft_merged(llama.base_dir, llama.adapter_dir, llama.model_cls)
    assert_matches_peft(tmp_path / "o", ref)
    assert len(report.merged) == 14


# ----------------------------------------------------------------------------- other PEFT methods and fields


def _peft_config(kind: str) -> object:
    import peft

    targets = ["q_proj", "v_proj"]
    return {
        "IA3": lambda: peft.IA3Config(target_modules=targets, feedforward_modules=[]),
        "LOHA": lambda: peft.LoHaConfig(target_modules=targets),
        "LOKR": lambda: peft.LoKrConfig(target_modules=targets),
        "OFT": lambda: peft.OFTConfig(target_modules=targets, r=4, oft_block_size=0),
        "BOFT": lambda: peft.BOFTConfig(target_modules=targets, boft_block_size=4),
        "VERA": lambda: peft.VeraConfig(target_modules=targets),
        "ADALORA": lambda: peft.AdaLoraConfig(target_modules=targets, total_step=10),
        "PROMPT_TUNING": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }[kind]()


@pytest.mark.parametrize("kind", ["IA3", "LOHA", "LOKR", "OFT", "BOFT", "VERA", "ADALORA", "PROMPT_TUNING"])
def test_non_lora_peft_types_are_named(tmp_path, kind):
    """The config PEFT writes for another method is refused by its type, before any LoRA field."""
    folder = tmp_path / kind
    _peft_config(kind).save_pretrained(str(folder))
    assert json.loads((folder / CONFIG).read_text())["peft_type"] == kind
    save_file({"x": np.zeros(1, np.float32)}, str(folder / WEIGHTS))
    article = "an" if kind[0] in "AEIOU" else "a"
    with pytest.raises(UnsupportedError, match=rf"this is {article} {kind} adapter \(peft_type '{kind}' is not a "
                                               r"LoRA adapter\); lorafuse reads LoRA adapters \(peft_type LORA\)") as e:
        lorafuse.load(folder)
    assert "'r' is missing" not in str(e.value)
    if kind == "PROMPT_TUNING":
        assert "no weights to merge" in str(e.value)


UNMERGEABLE = {
    "init_lora_weights": ("pissa", r"init_lora_weights='pissa': PiSSA .* path_initial_model_for_weight_conversion"),
    "init_lora_weights ": ("pissa_niter_4", r"init_lora_weights='pissa_niter_4': PiSSA"),
    " init_lora_weights": ("olora", r"init_lora_weights='olora': OLoRA"),
    "  init_lora_weights": ("corda", r"init_lora_weights='corda': CorDA"),
    "   init_lora_weights": ("loftq", r"init_lora_weights='loftq': LoftQ replaces the base weights"),
    "    init_lora_weights": ("lora_ga", r"init_lora_weights='lora_ga': LoRA-GA"),
    "     init_lora_weights": ("new_method", r"init_lora_weights='new_method' is not a LoRA initialization"),
    "layer_replication": ([[0, 2], [1, 2]], r"layer_replication=\[\[0, 2\], \[1, 2\]\]: PEFT stacks repeated"),
    "use_qalora": (True, r"use_qalora=True: QALoRA"),
    "alora_invocation_tokens": ([1, 2], r"alora_invocation_tokens=\[1, 2\]: Activated LoRA"),
    "kasa_config": ({"x": 1}, r"kasa_config=.*KaSA"),
    "arrow_config": ({"x": 1}, r"arrow_config=.*Arrow"),
    "use_bdlora": ({"nblocks": 2}, r"use_bdlora=.*BD-LoRA"),
    "megatron_config": ({"x": 1}, r"megatron_config=.*Megatron"),
}


@pytest.mark.parametrize("field", list(UNMERGEABLE))
def test_fields_lorafuse_cannot_merge_are_refused_by_name(llama, tmp_path, field):
    value, message = UNMERGEABLE[field]
    adapter = edited(llama, tmp_path / "a", {field.strip(): value})
    with pytest.raises(UnsupportedError, match=message):
        lorafuse.load(adapter)


def test_target_parameters_elsewhere_leave_the_module_loras_plain(llama, tmp_path):
    """target_parameters (LoRA on fused MoE expert parameters, merged by apply: tests/test_moe_fused.py)
    naming parameters of modules this adapter's LoRAs are not on: its modules stay plain LoRAs."""
    from lorafuse.model.param_lora import ParamLoraUpdate

    adapter = lorafuse.load(edited(llama, tmp_path / "a", {"target_parameters": ["mlp.experts.down_proj"]}))
    assert len(adapter) == 14
    assert not any(isinstance(u, ParamLoraUpdate) for u in adapter.updates.values())


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_initializations_that_keep_the_base_are_accepted(llama, tmp_path, init):
    adapter = edited(llama, tmp_path / "a", {"init_lora_weights": init})
    assert len(lorafuse.load(adapter)) == 14


# ----------------------------------------------------------------------------- rank_pattern: bounded by counts


def test_rank_pattern_agrees_with_peft_first_match():
    patterns = {"q_proj": 1, r"layers\.1\..*": 2, "model.layers.0.mlp.down_proj": 3, r"mlp\.(up|gate)_proj": 4,
                r"model\.layers\.0\.self_attn\.v_proj": 5, ".*attn.*": 6, "^(?!.*lm_head).*": 7, "k_proj": 8}
    table = peft_format.PatternTable(patterns, "rank_pattern", "<test>")
    budget = peft_format.MatchBudget("<test>", len(table.regex), len(MODULE_NAMES))
    keys = list(patterns)
    for name in MODULE_NAMES + ["model.layers.1.self_attn.k_proj", "model.layers.0.self_attn.v_proj", "lm_head"]:
        ref = get_pattern_key(keys, name)
        got = table.first(name, budget)
        assert (keys[got] if got is not None else name) == ref, name


def _adapter_with_modules(folder: Path, n: int, cfg: dict[str, object]) -> Path:
    folder.mkdir()
    tensors = {}
    for i in range(n):
        tensors[f"base_model.model.model.layers.{i}.proj.lora_A.weight"] = np.ones((2, 3), np.float32)
        tensors[f"base_model.model.model.layers.{i}.proj.lora_B.weight"] = np.ones((3, 2), np.float32)
    save_file(tensors, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({"r": 2, "lora_alpha": 2, **cfg}))
    return folder


def test_huge_rank_pattern_is_refused_by_count_at_once(tmp_path):
    # 250,000 entries (8 MB) fit the config size limit: the count bound refuses them
    patterns = {f"model.layers.{i}.x_proj": 2 for i in range(250_000)}
    folder = _adapter_with_modules(tmp_path / "a", 2, {"rank_pattern": patterns})
    start = time.monotonic()
    with pytest.raises(FormatError, match=r"adapter_config\.json: rank_pattern has 250000 entries \(at most 200000"):
        lorafuse.load(folder)
    assert time.monotonic() - start < 10  # reading the JSON; nothing is compiled or matched
    # the 1.5 M entries (50 MB) are refused before they are parsed: the config is too large
    patterns = {f"model.layers.{i}.x_proj": 2 for i in range(1_500_000)}
    folder = _adapter_with_modules(tmp_path / "b", 2, {"rank_pattern": patterns})
    start = time.monotonic()
    with pytest.raises(FormatError, match=r"adapter_config\.json: the adapter config is [\d,]+ bytes, more than"):
        lorafuse.load(folder)
    assert time.monotonic() - start < 10


def test_many_plain_patterns_are_looked_up_not_matched(tmp_path):
    """What lorafuse writes (an escaped name per module) costs no regular-expression test at all."""
    n = 20_000
    patterns = {rf"model\.layers\.{i}\.proj": 2 for i in range(n)}
    alphas = {f"model.layers.{n - 1}.proj": 6}  # unescaped dots: a (fixed-width) regular expression
    folder = _adapter_with_modules(tmp_path / "a", 300, {"rank_pattern": patterns, "alpha_pattern": alphas})
    start = time.monotonic()
    adapter = lorafuse.load(folder)
    assert time.monotonic() - start < 10
    assert {u.scale for u in adapter.updates.values()} == {1.0}  # alpha 2 / r 2; the alpha pattern names no module


def test_too_many_regular_expressions_are_refused_before_compiling(tmp_path):
    patterns = {f"layers\\.{i}\\..*": 2 for i in range(peft_format.MAX_REGEX_PATTERNS + 1)}
    folder = _adapter_with_modules(tmp_path / "a", 2, {"rank_pattern": patterns})
    with pytest.raises(FormatError, match=rf"rank_pattern and alpha_pattern hold {peft_format.MAX_REGEX_PATTERNS + 1} "
                                          rf"regular expressions \(at most {peft_format.MAX_REGEX_PATTERNS}"):
        lorafuse.load(folder)


def test_regex_tests_are_counted_deterministically(tmp_path, monkeypatch):
    """The bound is a count: the same files stop at the same module and pattern every time."""
    monkeypatch.setattr(peft_format, "MAX_MATCH_TESTS", 1000)
    patterns = {f"nothing{i}.*": 2 for i in range(20)}  # never match: every module tests all 20
    folder = _adapter_with_modules(tmp_path / "a", 100, {"alpha_pattern": patterns})
    messages = set()
    for _ in range(2):
        with pytest.raises(FormatError, match=r"matching the 20 regular expressions of adapter_config\.json "
                                              r"\(rank_pattern, alpha_pattern, target_modules, \.\.\.\) against 100 "
                                              r"modules needs more than 1001 tests \(at most 1000\), stopped at module "
                                              r"'model\.layers\.54\.proj' and pattern 'nothing0\.\*'") as e:
            lorafuse.load(folder)
        messages.add(str(e.value))
    assert len(messages) == 1


def test_target_modules_regex_is_checked_for_backtracking(llama, tmp_path):
    adapter = edited(llama, tmp_path / "a", {"target_modules": "(a+)+b"})
    with pytest.raises(FormatError, match=r"target_modules pattern '\(a\+\)\+b' has a quantifier inside a quantifier"):
        lorafuse.load(adapter)


# ----------------------------------------------------------------------------- writing: every module targeted


def test_written_config_targets_every_written_module(llama, tmp_path):
    """An adapter whose config narrows the targets (kept from an input) is written so that PEFT loads
    every module lorafuse writes."""
    adapter = lorafuse.load(llama.adapter_dir)
    adapter.config = dict(adapter.config, target_modules=["q_proj"], layers_to_transform=[0],
                          exclude_modules=["v_proj"])
    adapter.path = None
    adapter.save(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / CONFIG).read_text())
    assert cfg["layers_to_transform"] is None and cfg["exclude_modules"] is None
    assert cfg["init_lora_weights"] is True
    again = lorafuse.load(tmp_path / "out")
    assert set(again.updates) == set(adapter.updates) and not again.notes
    ref = peft_merged(llama.base_dir, llama.adapter_dir, llama.model_cls)
    assert_matches_peft(_apply(llama, tmp_path / "out", tmp_path / "merged"), ref)
    assert_matches_peft(tmp_path / "merged", peft_merged(llama.base_dir, tmp_path / "out", llama.model_cls))


def test_combined_adapter_is_written_so_peft_loads_every_module(llama, tmp_path):
    """cat of an adapter narrowed to layer 0 (layers_to_transform, kept as the output's config) and one
    of layer 1: the written config must target both layers, and must not let PEFT add random
    factors for the layers it targets beyond the file (init_lora_weights false in the inputs)."""
    first = edited(llama, tmp_path / "first", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]})
    second = edited(llama, tmp_path / "second", {"target_modules": ["q_proj"], "layers_to_transform": [1]})
    combined = lorafuse.combine([first, second], [1.0, 0.5], method="cat")
    assert sorted(combined.updates) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                        "model.layers.1.self_attn.q_proj"]
    combined.save(tmp_path / "combined")
    cfg = json.loads((tmp_path / "combined" / CONFIG).read_text())
    assert cfg["init_lora_weights"] is True and cfg["layers_to_transform"] is None
    ref = peft_merged(llama.base_dir, tmp_path / "combined", llama.model_cls)
    assert layer_keys(changed_keys(ref, base_state(llama.base_dir))) == {
        "layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.1.self_attn.q_proj"}
    assert_matches_peft(_apply(llama, tmp_path / "combined", tmp_path / "out"), ref)
    lorafuse.apply(llama.base_dir, [first, second], [1.0, 0.5], out=tmp_path / "direct", progress=False)
    assert_matches_peft(tmp_path / "direct", ref)


def test_rslora_with_rank_and_alpha_patterns_like_peft(tmp_path):
    """use_rslora scales each module by its own alpha / sqrt(r) after rank_pattern / alpha_pattern
    (plain names, fixed-width and variable regular expressions mixed, first match wins)."""
    case = pf.llama_case(tmp_path / "c", seed=10, use_rslora=True, r=4, lora_alpha=6,
                         rank_pattern={"model.layers.1.self_attn.q_proj": 8, r"layers\.0\..*_proj": 2},
                         alpha_pattern={r"mlp\.(up|down)_proj": 3, "k_proj": 12})
    report = lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "out", progress=False)
    assert len(report.merged) == 14
    assert_matches_peft(tmp_path / "out", case.merged_state)
    adapter = lorafuse.load(case.adapter_dir)
    assert adapter["model.layers.1.self_attn.q_proj"].rank == 8
    assert adapter["model.layers.0.mlp.up_proj"].rank == 2
    assert adapter["model.layers.0.mlp.up_proj"].scale == pytest.approx(3 / 2 ** 0.5)
    assert adapter["model.layers.1.self_attn.k_proj"].scale == pytest.approx(12 / 2)


def _apply(case: pf.Case, adapter: Path, out: Path) -> Path:
    lorafuse.apply(case.base_dir, [adapter], out=out, progress=False)
    return out


# ----------------------------------------------------------------------------- Unicode normalization


def test_nfd_module_against_nfc_base_says_so(tmp_path):
    nfc = unicodedata.normalize("NFC", "model.café.proj")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    base = tmp_path / "base"
    base.mkdir()
    save_file({f"{nfc}.weight": np.ones((3, 4), np.float32)}, str(base / "model.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({f"base_model.model.{nfd}.lora_A.weight": np.ones((2, 4), np.float32),
               f"base_model.model.{nfd}.lora_B.weight": np.ones((3, 2), np.float32)}, str(adapter / WEIGHTS))
    (adapter / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(MissingModuleError) as e:
        lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    text = str(e.value)
    assert repr(nfd) in text and f"base key {nfc + '.weight'!r} differs from it only in Unicode normalization" in text
    assert "(NFC)" in text and "(NFD)" in text
    # and the other way round: an NFC adapter against an NFD base
    save_file({f"{nfd}.weight": np.ones((3, 4), np.float32)}, str(base / "model.safetensors"))
    save_file({f"base_model.model.{nfc}.lora_A.weight": np.ones((2, 4), np.float32),
               f"base_model.model.{nfc}.lora_B.weight": np.ones((3, 2), np.float32)}, str(adapter / WEIGHTS))
    with pytest.raises(MissingModuleError, match=r"differs from it only in Unicode normalization"):
        lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)


def test_extract_from_gpt2_writes_conv1d_layers_peft_loads(gpt2, tmp_path):
    """GPT-2 keeps Conv1D weights (in x out): the extracted adapter must hold them in PEFT's
    (out x in) terms with fan_in_fan_out, so that PEFT loads it and merges back the fine-tuned model."""
    from lorafuse.ops.extract import extract
    from lorafuse.ops.rank import RankRule

    ft = tmp_path / "ft"
    shutil.copytree(gpt2.base_dir, ft)
    merged = peft_merged(gpt2.base_dir, gpt2.adapter_dir, gpt2.model_cls)
    save_file(merged, str(ft / "model.safetensors"), metadata={"format": "pt"})
    res = extract(gpt2.base_dir, ft, RankRule(rank=4), progress=False)
    assert {m for m in res.adapter.updates if m.endswith("c_attn")}  # square and non-square Conv1D
    res.adapter.save(tmp_path / "x")
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    back = peft_merged(gpt2.base_dir, tmp_path / "x", gpt2.model_cls)
    for key, want in merged.items():
        np.testing.assert_allclose(back[key], want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_extract_without_config_json_refuses_conv1d_names(gpt2, tmp_path):
    from lorafuse.ops.extract import extract
    from lorafuse.ops.rank import RankRule

    base = tmp_path / "base"
    shutil.copytree(gpt2.base_dir, base)
    (base / "config.json").unlink()
    with pytest.raises(UnsupportedError, match=r"c_attn.weight is a torch Linear .* or a transformers Conv1D"):
        extract(base, gpt2.base_dir, RankRule(rank=4), progress=False)


def test_every_command_tells_what_loading_left_out(llama, tmp_path, capsys):
    """The notes of loading (tensors PEFT ignores) reach the user of every command and of the API."""
    adapter = edited(llama, tmp_path / "a", {"target_modules": "model\\.layers\\.0\\..*"})
    expected = "that adapter_config.json does not target, as PEFT ignores them"
    with pytest.warns(lorafuse.AdapterNote, match=re.escape(expected)):
        loaded = lorafuse.load(adapter)
    assert any(expected in n for n in loaded.notes)
    for argv in (["resize", str(adapter), "--rank", "2", "-o", str(tmp_path / "r")],
                 ["combine", str(adapter), str(adapter), "-o", str(tmp_path / "c")],
                 ["info", str(adapter)],
                 ["similarity", str(adapter), str(adapter)]):
        assert cli_main(argv) == 0
        err = capsys.readouterr().err
        assert f"note: {adapter}: ignored" in err and expected in err, argv
    assert cli_main(["resize", str(adapter), "--rank", "2", "-q", "-o", str(tmp_path / "r2")]) == 0
    assert capsys.readouterr().err == ""

"""What a new user trips over (issue #18): the natural forms of arguments, suggestions for typos, grammar,
messages that name what is missing, and a Python API that behaves like other Python objects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lorafuse
from lorafuse.cli import _negative_values, build_parser, main

PREFIX = "base_model.model.model.layers.0."
SHAPES = {"self_attn.q_proj": (12, 10), "mlp.up_proj": (16, 10)}


def _peft(path: Path, seed: int, modules: dict[str, tuple[int, int]] = SHAPES, prefix: str = PREFIX) -> Path:
    g = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors = {}
    for name, (o, i) in modules.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = g.standard_normal((4, i)).astype(np.float32)
        tensors[f"{prefix}{name}.lora_B.weight"] = g.standard_normal((o, 4)).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    targets = sorted({n.rsplit(".", 1)[-1] for n in modules})
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets}))
    return path


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return _peft(tmp_path / "a", 1), _peft(tmp_path / "b", 2)


def _delta(adapter: lorafuse.Adapter, name: str) -> np.ndarray:
    return adapter.updates[name].delta()


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("value", ["-0.5,1", "-1", "-.25, 2", "-1e-1,3E0"])
def test_a_negative_weight_list_needs_no_equals_sign(value):
    assert _negative_values(["combine", "a", "--weights", value, "-o", "x"]) == \
        ["combine", "a", f"--weights={value}", "-o", "x"]
    args = build_parser().parse_args(_negative_values(["combine", "a", "b", "--weights", value, "-o", "x"]))
    assert args.weights == [float(v) for v in value.split(",")]


def test_only_number_lists_after_a_list_option_are_joined():
    argv = ["combine", "a", "--weights", "-o", "x", "--", "--weights", "-1"]
    assert _negative_values(argv) == argv  # '-o' is an option; after '--' nothing is touched


def test_combine_with_negative_weights_in_the_natural_form(tmp_path, pair):
    assert main(["combine", *map(str, pair), "--weights", "-0.5,1", "--method", "cat", "-o", str(tmp_path / "n")]) == 0
    out = lorafuse.load(tmp_path / "n")
    a, b = (lorafuse.load(p) for p in pair)
    name = "model.layers.0.self_attn.q_proj"
    want = -0.5 * _delta(a, name).astype(np.float64) + _delta(b, name)
    np.testing.assert_allclose(_delta(out, name), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("argv, expected", [
    (["aply", "x"], "invalid choice: 'aply'"),
    (["combnie", "x"], "did you mean 'combine'?"),
    (["combine", "a", "b", "-o", "x", "--method", "tie"], "unknown method 'tie'; did you mean 'ties'?"),
    (["combine", "a", "b", "-o", "x", "--rnak", "4"], "unrecognized argument --rnak; did you mean '--rank'?"),
    (["info", "x", "--jsn"], "did you mean '--json'?"),
])
def test_typos_get_a_suggestion_and_the_verbs_usage(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    if argv[0] in ("combine", "info"):
        assert err.startswith(f"usage: lorafuse {argv[0]} ")


def test_usage_lines_list_the_choices():
    usage = " ".join(build_parser().verbs["apply"].format_usage().split())
    assert "--dtype {fp32,fp16,bf16}" in usage  # the same order as combine, resize and convert
    assert "--method {svd,cat,linear,ties," in " ".join(build_parser().verbs["combine"].format_usage().split())


def test_messages_count_in_good_grammar(tmp_path, pair, capsys):
    assert main(["combine", str(pair[0]), "--method", "cat", "-o", str(tmp_path / "one")]) == 0
    assert "combined 1 adapter with cat: 2 modules, rank 4" in capsys.readouterr().out
    with pytest.raises(lorafuse.LorafuseValueError, match=r"^2 weights given for 1 adapter$"):
        lorafuse.combine([pair[0]], [1.0, 2.0])
    with pytest.raises(lorafuse.LorafuseValueError, match=r"^1 weight given for 2 adapters$"):
        lorafuse.combine(list(pair), [1.0])


@pytest.mark.parametrize("method", ["ties", "dare_linear", "magnitude_prune_svd"])
def test_a_missing_density_is_named_with_a_usual_value(pair, method):
    with pytest.raises(lorafuse.LorafuseValueError, match=rf"method '{method}' needs a density: the fraction of "
                       r"entries it keeps, between 0 and 1 \(e\.g\. --density 0\.5"):
        lorafuse.combine(list(pair), method=method)


# ----------------------------------------------------------------------------- the Python API


def test_repr_is_one_short_line(pair):
    a = lorafuse.load(pair[0])
    text = repr(a)
    assert "\n" not in text and len(text) < 200
    assert text == f"Adapter(format='peft', modules=2, rank=4, dtype=F32, source={str(pair[0])!r})"
    assert repr(lorafuse.Adapter(updates={})) == "Adapter(format='peft', modules=0, rank=-, dtype=-, source=in memory)"


def test_arithmetic_with_a_number_is_a_type_error_and_sum_works(pair):
    a, b = (lorafuse.load(p) for p in pair)
    for bad in (lambda: a + 1, lambda: 1 + a, lambda: a - "x", lambda: a / "2", lambda: a * a):
        with pytest.raises(TypeError):
            bad()
    with pytest.raises(lorafuse.LorafuseValueError, match="division by zero"):
        a / 0
    total = sum([a, b, a])
    for name in SHAPES:
        key = "model.layers.0." + name
        want = 2 * _delta(a, key).astype(np.float64) + _delta(b, key)
        np.testing.assert_allclose(_delta(total, key), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert total.updates[key].rank == 12


def test_adapters_that_share_no_module_are_not_added_silently(tmp_path, pair):
    a = lorafuse.load(pair[0])
    other = lorafuse.load(_peft(tmp_path / "other", 3, {"attn.c_attn": (12, 10)}, "base_model.model.transformer.h.0."))
    with pytest.raises(lorafuse.LorafuseValueError, match="share no module .*'transformer.h.0.attn.c_attn'.*"
                       "lorafuse convert"):
        a + other
    with pytest.raises(lorafuse.LorafuseValueError, match="share no module"):
        a - other
    assert len(a + lorafuse.Adapter(updates={})) == 2  # an empty adapter is the neutral element
    both = lorafuse.combine([a, other], method="cat")  # combine keeps disjoint modules on purpose
    assert len(both) == 3


def test_disjoint_modules_of_one_model_still_add(tmp_path):
    """A q_proj-only adapter plus an up_proj-only adapter of the same model is a sum, not an error."""
    q = lorafuse.load(_peft(tmp_path / "q", 4, {"self_attn.q_proj": (12, 10)}))
    up = lorafuse.load(_peft(tmp_path / "up", 5, {"mlp.up_proj": (16, 10)}))
    total = q + 0.5 * up
    assert sorted(total.updates) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]
    np.testing.assert_allclose(_delta(total, "model.layers.0.mlp.up_proj"),
                               0.5 * _delta(up, "model.layers.0.mlp.up_proj").astype(np.float64), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(_delta(total, "model.layers.0.self_attn.q_proj"),
                               _delta(q, "model.layers.0.self_attn.q_proj"), rtol=1e-6)


def test_combine_of_kohya_and_diffusers_names_says_they_share_no_module(tmp_path, capsys):
    """One model in two namings: refused before any work, naming both files and `lorafuse convert`."""
    g = np.random.default_rng(9)
    kohya, diff = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    save_file({"lora_unet_mid_block_proj_in.lora_down.weight": g.standard_normal((4, 8)).astype(np.float32),
               "lora_unet_mid_block_proj_in.lora_up.weight": g.standard_normal((8, 4)).astype(np.float32),
               "lora_unet_mid_block_proj_in.alpha": np.array(4, dtype=np.float32)}, str(kohya))
    save_file({"unet.mid_block.proj_in.lora_A.weight": g.standard_normal((4, 8)).astype(np.float32),
               "unet.mid_block.proj_in.lora_B.weight": g.standard_normal((8, 4)).astype(np.float32)}, str(diff))
    out = tmp_path / "out.safetensors"
    # an input error: exit status 1
    assert main(["combine", str(kohya), str(diff), "--method", "svd", "--rank", "4", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{kohya} and {diff} share no module" in err and "lorafuse convert" in err and "--method cat" in err
    assert not out.exists()


def test_counted_words_agree_with_their_number():
    from lorafuse._terminal import plural

    assert [plural(n, "module", verb=("has", "have")) for n in (0, 1, 2, 1000)] == \
        ["0 modules have", "1 module has", "2 modules have", "1,000 modules have"]
    assert plural(1, "LoRA module") == "1 LoRA module" and plural(3, "matrix", "matrices") == "3 matrices"

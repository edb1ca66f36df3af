"""A new user's red-team of the Python API and the CLI: results that would read back differently from what
is in memory (0 * a kohya adapter), outputs nobody can load (an extract with nothing in it), non-finite and
overflowing scalars, option values that were silently ignored, and arguments of a plausible wrong type
(one path for a list, a generator, a tensor of weights, a torch dtype, a string for a bool). Each refusal is
a lorafuse error naming the parameter; each accepted value is checked against numpy or real PEFT."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import peft_fixtures as pf
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.numpy import save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseValueError, NonFiniteError, UnsupportedError
from lorafuse.model import Adapter

KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
KOHYA_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> pf.Case:
    return pf.llama_case(tmp_path_factory.mktemp("llama"), target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def second(llama: pf.Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pf.another_adapter(llama, tmp_path_factory.mktemp("second") / "b", rank=4, alpha=16, seed=3)


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kohya LoRA file: one module with an F32 alpha 2 (scale 1/2), one without alpha (scale 1)."""
    g = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("kohya") / "k.safetensors"
    save_file({f"{KOHYA_Q}.lora_down.weight": g.standard_normal((4, 32)).astype(np.float32),
               f"{KOHYA_Q}.lora_up.weight": g.standard_normal((32, 4)).astype(np.float32),
               f"{KOHYA_Q}.alpha": np.array(2.0, dtype=np.float32),
               f"{KOHYA_K}.lora_down.weight": g.standard_normal((4, 32)).astype(np.float32),
               f"{KOHYA_K}.lora_up.weight": g.standard_normal((32, 4)).astype(np.float32)},
              str(path), metadata={"ss_network_dim": "4", "ss_network_alpha": "2"})
    return path


def _header_dtypes(path: Path) -> set[str]:
    """The dtypes a safetensors file's header gives its tensors."""
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _deltas(a: Adapter) -> dict[str, np.ndarray]:
    return {n: u.delta() for n, u in a.updates.items()}


def _assert_same_deltas(got: Adapter, want: Adapter, rtol: float = 1e-6) -> None:
    assert set(got.updates) == set(want.updates)
    for name, d in _deltas(want).items():
        # to float32's precision: a delta below its smallest normal number is 0 wherever it is computed
        atol = max(rtol * float(np.abs(d).max()), float(np.finfo(np.float32).tiny))
        np.testing.assert_allclose(got.updates[name].delta(), d, rtol=0, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------- 1: load(save(x)) == x for every scale


@pytest.mark.parametrize("c", [0.0, -0.0, -1.0, -0.25, 3.0, 1e-30, 1e-300])
def test_kohya_save_reads_back_what_is_in_memory_for_every_scale(kohya_file: Path, tmp_path: Path, c: float) -> None:
    """kohya (and lorafuse) read `.alpha` 0 as alpha = rank: 0 * a saved with alpha 0 came back at full
    strength. Whatever the scale, the file must read back to the in-memory deltas."""
    x = c * lorafuse.load(kohya_file)
    out = x.save(tmp_path / "x.safetensors", format="kohya")
    back = lorafuse.load(out)
    _assert_same_deltas(back, x)
    assert back.norm() == pytest.approx(x.norm(), rel=1e-6, abs=1e-30)
    with safe_open(str(out), "np") as f:  # never an alpha that kohya's loaders read as alpha = rank
        alphas = [float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")]
    assert all(np.float32(v) != 0 for v in alphas), alphas


def test_zero_times_kohya_adapter_is_zero_after_reload(kohya_file: Path, tmp_path: Path) -> None:
    z = 0 * lorafuse.load(kohya_file)
    out = z.save(tmp_path / "z.safetensors", format="kohya")
    assert lorafuse.load(out).norm() == 0.0
    # converted to diffusers names and back: still zero
    d = lorafuse.load(lorafuse.convert(out, tmp_path / "d.safetensors", to="peft").out)
    assert d.norm() == 0.0


def test_zero_scale_keeps_the_factor_dtypes_of_an_f16_conv_kohya_file(tmp_path: Path) -> None:
    """A zero scale goes into lora_up in lora_up's own dtype and shape (a conv's (out, r, 1, 1)); alpha F16."""
    g = np.random.default_rng(2)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    src = tmp_path / "k16.safetensors"
    save_file({f"{conv}.lora_down.weight": g.standard_normal((4, 8, 3, 3)).astype(np.float16),
               f"{conv}.lora_up.weight": g.standard_normal((16, 4, 1, 1)).astype(np.float16),
               f"{conv}.alpha": np.array(2.0, dtype=np.float16)}, str(src))
    a = lorafuse.load(src)
    for c in (0.0, -2.0):
        out = (c * a).save(tmp_path / f"x{c}.safetensors", format="kohya")
        with safe_open(str(out), "np") as f:
            up, alpha = f.get_tensor(f"{conv}.lora_up.weight"), f.get_tensor(f"{conv}.alpha")
        assert up.dtype == np.float16 and up.shape == (16, 4, 1, 1) and alpha.dtype == np.float16
        assert float(alpha) != 0 and (c != 0 or not up.any())
        _assert_same_deltas(lorafuse.load(out), c * a, rtol=1e-3)


@pytest.mark.parametrize("c", [0.0, -1.0, -0.25, 1e-30])
def test_peft_and_diffusers_saves_read_back_for_every_scale(llama: pf.Case, kohya_file: Path, tmp_path: Path,
                                                            c: float) -> None:
    x = c * lorafuse.load(llama.adapter_dir)
    _assert_same_deltas(lorafuse.load(x.save(tmp_path / "peft")), x)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert math.isfinite(cfg["lora_alpha"])
    diffusers = lorafuse.load(lorafuse.convert(kohya_file, tmp_path / "d.safetensors", to="peft").out)
    y = c * diffusers
    _assert_same_deltas(lorafuse.load(y.save(tmp_path / "y.safetensors")), y)


@pytest.mark.parametrize("c", [0.0, -0.5])
def test_scaled_peft_adapter_loads_in_peft_with_the_same_delta(llama: pf.Case, tmp_path: Path, c: float) -> None:
    x = c * lorafuse.load(llama.adapter_dir)
    out = x.save(tmp_path / "x")
    base = llama.model_cls.from_pretrained(str(llama.base_dir))
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload().state_dict()
    for name, d in _deltas(x).items():
        key = name + ".weight"
        np.testing.assert_allclose((merged[key] - before[key]).numpy(), d, rtol=0, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- 2: nothing to write


def test_extract_of_identical_checkpoints_is_refused(llama: pf.Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError, match="no module .*differs from the base"):
        lorafuse.extract(llama.base_dir, llama.base_dir, out, rank=2)
    assert not out.exists()
    assert main(["extract", str(llama.base_dir), str(llama.base_dir), "--rank", "2", "-o", str(out)]) == 1
    assert not out.exists()


def test_extract_whose_include_matches_nothing_is_refused(llama: pf.Case, second: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError, match="no module matched include='nomatch'"):
        lorafuse.extract(llama.base_dir, llama.base_dir, out, rank=2, include="nomatch")
    assert main(["extract", str(llama.base_dir), str(llama.base_dir), "--rank", "2", "--include", "nomatch",
                 "-o", str(out)]) == 1
    assert "no module matched include='nomatch'" in capsys.readouterr().err
    assert not out.exists()


def _empty_peft(path: Path) -> Path:
    path.mkdir()
    save_file({}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                          "target_modules": []}))
    return path


def test_combine_and_save_of_no_module_are_refused(tmp_path: Path) -> None:
    empty = _empty_peft(tmp_path / "empty")
    with pytest.raises(UnsupportedError, match="no module"):
        lorafuse.combine([empty, empty], method="cat")
    with pytest.raises(UnsupportedError, match="no module"):
        lorafuse.combine([empty, empty], engine="stream")
    with pytest.raises(UnsupportedError, match="no module"):
        Adapter(updates={}).save(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["combine", str(empty), str(empty), "-o", str(tmp_path / "c"), "-q"]) == 1
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- 3: non-finite scalars


@pytest.mark.parametrize("op, text", [
    (lambda a: float("nan") * a, "nan"),
    (lambda a: a * float("inf"), "inf"),
    (lambda a: a / float("nan"), "nan"),
    (lambda a: a / float("-inf"), "inf"),
    (lambda a: np.float64("nan") * a, "nan"),
])
def test_non_finite_scalars_are_refused(llama: pf.Case, op, text: str) -> None:  # type: ignore[no-untyped-def]
    a = lorafuse.load(llama.adapter_dir)
    with pytest.raises(LorafuseValueError, match=f"adapter [*/] .*{text}.*finite"):
        op(a)


@pytest.mark.parametrize("op", [lambda a: a * 1e300, lambda a: 1e38 * a, lambda a: a / 1e-300])
def test_scales_beyond_float32_are_refused(llama: pf.Case, tmp_path: Path, op) -> None:  # type: ignore[no-untyped-def]
    a = lorafuse.load(llama.adapter_dir)
    with pytest.raises(LorafuseValueError, match=r"adapter [*/] .*module .*float32"):
        op(a)


def test_sum_whose_factors_overflow_float32_is_refused() -> None:
    """The scale fits float32 but the factors it multiplies into (A entries of 1e5) do not: refused, naming
    the operation and the module, instead of factors of inf."""
    big = Adapter.from_state_dict({"base_model.model.layer.q.lora_A.weight": np.full((2, 5), 1e5, np.float32),
                                   "base_model.model.layer.q.lora_B.weight": np.ones((6, 2), np.float32)}) * 1e37
    with pytest.raises(LorafuseValueError, match="adapter arithmetic: module 'layer.q'.*float32"):
        big + big


@pytest.mark.parametrize("c", [np.float64(0.5), np.float32(0.5), np.array(0.5), torch.tensor(0.5),
                               np.int64(2), np.array([0.5]).reshape(())])
def test_numpy_and_torch_scalars_scale_like_floats(llama: pf.Case, c: object) -> None:
    a = lorafuse.load(llama.adapter_dir)
    want = float(c) * a  # type: ignore[arg-type]
    for got in (c * a, a * c, a / (1 / float(c)), (a / c) * float(c) * float(c)):  # type: ignore[operator]
        _assert_same_deltas(got, want)


def test_zero_numpy_scalar_plus_adapter(llama: pf.Case) -> None:
    a = lorafuse.load(llama.adapter_dir)
    _assert_same_deltas(np.int64(0) + a, a)
    _assert_same_deltas(sum([a, a], np.float64(0.0)), 2 * a)  # type: ignore[arg-type]


def test_scalar_arrays_are_not_scalars(llama: pf.Case) -> None:
    a = lorafuse.load(llama.adapter_dir)
    with pytest.raises(TypeError):
        np.array([0.5, 1.0]) * a
    with pytest.raises(TypeError):
        a * "2"  # type: ignore[operator]


def _nan_adapter() -> Adapter:
    g = np.random.default_rng(1)
    b = g.standard_normal((6, 2)).astype(np.float32)
    b[1, 1] = np.nan
    return Adapter.from_state_dict({
        "base_model.model.layer.q.lora_A.weight": g.standard_normal((2, 5)).astype(np.float32),
        "base_model.model.layer.q.lora_B.weight": b,
        "base_model.model.layer.k.lora_A.weight": g.standard_normal((2, 5)).astype(np.float32),
        "base_model.model.layer.k.lora_B.weight": g.standard_normal((6, 2)).astype(np.float32)})


def test_state_dict_adapter_saves_in_a_fresh_process(tmp_path: Path) -> None:
    """`import lorafuse` is lazy: Adapter.from_state_dict(...).save(...) as the first thing a script does found
    no format ('unknown adapter format 'peft' (lorafuse writes none)')."""
    script = ("import sys, numpy as np, lorafuse\n"
              "g = np.random.default_rng(0)\n"
              "a = lorafuse.Adapter.from_state_dict({'base_model.model.l.q.lora_A.weight': g.random((2, 4), "
              "np.float32), 'base_model.model.l.q.lora_B.weight': g.random((4, 2), np.float32)})\n"
              "print(a.save(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert lorafuse.load(tmp_path / "o").updates["l.q"].rank == 2


def test_similarity_of_a_nan_adapter_names_it() -> None:
    x = _nan_adapter()
    with pytest.raises(NonFiniteError, match=r"adapter 2 \(<in-memory adapter>\): module 'layer.q'"):
        lorafuse.similarity([_finite_like(x), x])


def _finite_like(x: Adapter) -> Adapter:
    return Adapter.from_state_dict({k: np.nan_to_num(v) for k, v in x.state_dict().items()})


# ----------------------------------------------------------------------------- 4: density in (0, 1]


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "ties_svd", "dare_linear", "dare_ties_svd"])
def test_density_zero_is_refused(llama: pf.Case, second: Path, method: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    for density in (0, 0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(LorafuseValueError, match=r"density must be a finite number > 0 and <= 1"):
            lorafuse.combine([llama.adapter_dir, second], method=method, density=density)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:  # refused while parsing
        main(["combine", str(llama.adapter_dir), str(second), "--method", method, "--density", "0", "-o", str(out),
              "-q"])
    assert e.value.code == 2
    assert "argument --density: must be a number > 0 and <= 1" in capsys.readouterr().err
    assert not out.exists()
    full = lorafuse.combine([llama.adapter_dir, second], method=method, density=1.0)
    assert full.norm() > 0


# ----------------------------------------------------------------------------- 5: options a method does not use


@pytest.mark.parametrize("method, given, option, takers", [
    ("svd", {"majority_sign": "frequency"}, "majority_sign", "ties, dare_ties, ties_svd, dare_ties_svd"),
    ("linear", {"split": "sqrt"}, "split", "svd, ties_svd, dare_linear_svd"),
    ("cat", {"split": "sqrt"}, "split", "svd, ties_svd"),
    ("ties", {"density": 0.5, "seed": 3}, "seed", "svd, dare_linear, dare_ties"),
    ("magnitude_prune", {"density": 0.5, "seed": 1}, "seed", "dare_linear"),
    ("linear", {"conv_rank": 3}, "conv_rank", "svd, ties_svd"),
    ("cat", {"rank": 3}, "rank", "svd, ties_svd"),
    ("ties", {"density": 0.5, "exact": True}, "exact", "svd"),
    ("svd", {"engine": "memory", "passes": 2}, "passes", "engine stream"),
    ("linear", {"engine": "memory", "passes": 1}, "passes", "engine stream"),
])
def test_an_option_the_method_does_not_use_is_refused(llama: pf.Case, second: Path, method: str, given: dict,
                                                      option: str, takers: str) -> None:
    with pytest.raises(LorafuseValueError, match=rf"\b{option}\b") as e:
        lorafuse.combine([llama.adapter_dir, second], method=method, **given)
    assert takers in str(e.value).replace("'", ""), str(e.value)


def test_conv_rank_refusal_names_conv_rank(llama: pf.Case, second: Path) -> None:
    with pytest.raises(LorafuseValueError, match="conv_rank: method 'linear' takes no rank"):
        lorafuse.combine([llama.adapter_dir, second], method="linear", conv_rank=3)


@pytest.mark.parametrize("method, given", [
    ("ties", {"density": 0.5, "majority_sign": "frequency"}),
    ("dare_linear", {"density": 0.5, "seed": 4}),
    ("svd", {"split": "sqrt", "seed": 2, "rank": 2}),
    ("ties_svd", {"density": 0.5, "split": "sqrt", "majority_sign": "frequency", "rank": 2}),
    ("linear", {"engine": "stream", "passes": 1}),
    # the defaults, as lorafuse.combine and the CLI pass them, are never refused
    ("ties", {"density": 0.5, "seed": 0, "split": "B", "majority_sign": "total", "exact": False}),
    ("cat", {"seed": 0, "split": "B", "majority_sign": "total"}),
])
def test_options_the_method_uses_are_accepted(llama: pf.Case, second: Path, method: str, given: dict) -> None:
    assert lorafuse.combine([llama.adapter_dir, second], method=method, **given).norm() > 0


def test_cli_combine_with_default_options_still_runs(llama: pf.Case, second: Path, tmp_path: Path) -> None:
    for method in ("ties", "cat", "linear"):
        extra = ["--density", "0.5"] if method == "ties" else []
        assert main(["combine", str(llama.adapter_dir), str(second), "--method", method, *extra,
                     "-o", str(tmp_path / method), "-q"]) == 0
    assert main(["combine", str(llama.adapter_dir), str(second), "--method", "svd", "--split", "sqrt",
                 "-o", str(tmp_path / "x"), "-q"]) == 0
    assert main(["combine", str(llama.adapter_dir), str(second), "--method", "linear", "--split", "sqrt",
                 "-o", str(tmp_path / "y"), "-q"]) == 2


# ----------------------------------------------------------------------------- 6: argument types


def test_one_path_where_a_list_is_expected(llama: pf.Case, tmp_path: Path) -> None:
    a = llama.adapter_dir
    for call in (lambda: lorafuse.apply(llama.base_dir, str(a), out=tmp_path / "x"),
                 lambda: lorafuse.apply(llama.base_dir, a, out=tmp_path / "x"),
                 lambda: lorafuse.combine(str(a)),
                 lambda: lorafuse.combine(a),
                 lambda: lorafuse.similarity(str(a))):
        with pytest.raises(LorafuseValueError, match=r"adapters must be .*not one (str|PosixPath)"):
            call()
    with pytest.raises(LorafuseValueError, match="not one Adapter"):
        lorafuse.combine(lorafuse.load(a))
    with pytest.raises(LorafuseValueError, match="not one Adapter"):
        lorafuse.similarity(lorafuse.load(a))  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def _gen(*items: object) -> Iterator[object]:
    yield from items


def test_generators_of_adapters(llama: pf.Case, second: Path, tmp_path: Path) -> None:
    a, b = lorafuse.load(llama.adapter_dir), lorafuse.load(second)
    want = lorafuse.similarity([a, b])
    np.testing.assert_array_equal(lorafuse.similarity(_gen(a, b)), want)  # type: ignore[arg-type]
    assert want[0, 1] != 0 and want[0, 0] == pytest.approx(1.0)
    r1 = lorafuse.apply(llama.base_dir, _gen(a), _gen(0.5), out=tmp_path / "g")  # type: ignore[arg-type]
    r2 = lorafuse.apply(llama.base_dir, [a], [0.5], out=tmp_path / "l")
    assert r1.merged == r2.merged
    x = lorafuse.load(second)  # the generator's weights are read once, and match the list's
    _assert_same_deltas(lorafuse.combine(_gen(a, x), _gen(1.0, 0.5), method="cat"),  # type: ignore[arg-type]
                        lorafuse.combine([a, x], [1.0, 0.5], method="cat"))


def test_weights_as_arrays_and_tensors(llama: pf.Case, second: Path, tmp_path: Path) -> None:
    paths = [llama.adapter_dir, second]
    want = lorafuse.combine(paths, [1.0, 0.5], method="cat")
    for ws in (torch.tensor([1.0, 0.5]), np.array([1.0, 0.5]), (1, 0.5), [np.float32(1), np.float64(0.5)],
               torch.tensor([1.0, 0.5], dtype=torch.float64)):
        _assert_same_deltas(lorafuse.combine(paths, ws, method="cat"), want)  # type: ignore[arg-type]
    r = lorafuse.apply(llama.base_dir, [paths[0]], torch.tensor([0.5]), out=tmp_path / "t")
    assert r.merged


@pytest.mark.parametrize("ws, text", [
    (0.5, "weights must be a sequence"),
    ("0.5", "weights must be a sequence"),
    (["0.5", "1"], r"weights must be finite numbers, got '0.5' \(a str, not a number\)"),
    ([True, 1.0], r"weights must be finite numbers, got True \(a bool"),
    ([1.0, float("nan")], "weights must be finite"),
    ([1.0, float("inf")], "weights must be finite"),
    (np.array([[1.0, 0.5]]), "weights must be a sequence"),
    (torch.tensor(0.5), "weights must be a sequence"),
    ([1.0], "1 weight given for 2 adapters"),
    ([1.0, 2.0, 3.0], "3 weights given for 2 adapters"),
    (np.array([True, False]), r"got True \(a bool"),
])
def test_bad_weights_are_refused_alike_by_combine_and_apply(llama: pf.Case, second: Path, tmp_path: Path,
                                                            ws: object, text: str) -> None:
    paths = [llama.adapter_dir, second]
    with pytest.raises(LorafuseValueError, match=text):
        lorafuse.combine(paths, ws)  # type: ignore[arg-type]
    with pytest.raises(LorafuseValueError, match=text):
        lorafuse.apply(llama.base_dir, paths, ws, out=tmp_path / "x")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_paths_of_the_wrong_type(llama: pf.Case) -> None:
    a = lorafuse.load(llama.adapter_dir)
    with pytest.raises(LorafuseValueError, match="adapter: expected a path .*got None"):
        lorafuse.load(None)  # type: ignore[arg-type]
    with pytest.raises(LorafuseValueError, match="expected a path .*got an Adapter"):
        lorafuse.describe(a)  # type: ignore[arg-type]
    with pytest.raises(LorafuseValueError, match="base model: expected a path .*got int"):
        lorafuse.apply(3, [a], out="x")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype, stored", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (np.float16, "F16"),
                                           (np.dtype("float32"), "F32"), ("torch.bfloat16", "BF16")])
def test_apply_takes_torch_and_numpy_dtypes(llama: pf.Case, tmp_path: Path, dtype: object, stored: str) -> None:
    out = lorafuse.apply(llama.base_dir, [llama.adapter_dir], out=tmp_path / "o", dtype=dtype).out  # type: ignore[arg-type]
    header_dtypes = _header_dtypes(out / "model.safetensors")
    assert header_dtypes == {stored}


def test_combine_takes_a_torch_dtype(llama: pf.Case, second: Path) -> None:
    c = lorafuse.combine([llama.adapter_dir, second], method="cat", dtype=torch.float16)  # type: ignore[arg-type]
    assert {t.dtype for u in c.updates.values() for t in (u.A, u.B)} == {"F16"}


@pytest.mark.parametrize("dtype", [torch.int8, np.int32, torch.float64, 3, object()])
def test_unusable_dtypes_are_refused(llama: pf.Case, tmp_path: Path, dtype: object) -> None:
    with pytest.raises(LorafuseValueError, match="dtype .*(float32|fp32)"):
        lorafuse.apply(llama.base_dir, [llama.adapter_dir], out=tmp_path / "o", dtype=dtype)  # type: ignore[arg-type]
    with pytest.raises(LorafuseValueError, match="dtype .*(float32|fp32)"):
        lorafuse.combine([llama.adapter_dir], dtype=dtype)  # type: ignore[arg-type]


def test_boolean_parameters_must_be_bool(llama: pf.Case, second: Path, tmp_path: Path) -> None:
    paths = [llama.adapter_dir, second]
    with pytest.raises(LorafuseValueError, match="progress must be True, False or None, got 'no'"):
        lorafuse.combine(paths, progress="no")  # type: ignore[arg-type]
    with pytest.raises(LorafuseValueError, match="exact must be True or False, got 1"):
        lorafuse.combine(paths, exact=1)  # type: ignore[arg-type]
    for key in ("requantize", "skip_missing", "allow_nonfinite", "overwrite"):
        with pytest.raises(LorafuseValueError, match=f"{key} must be True.* or .*, got 'no'"):
            lorafuse.apply(llama.base_dir, paths, out=tmp_path / "o", **{key: "no"})  # type: ignore[arg-type]
    with pytest.raises(LorafuseValueError, match="progress must be"):
        lorafuse.apply(llama.base_dir, paths, out=tmp_path / "o", progress="no")  # type: ignore[arg-type]
    with pytest.raises(LorafuseValueError, match="progress must be True, False or None"):
        lorafuse.extract(llama.base_dir, llama.base_dir, rank=2, progress="no")  # type: ignore[arg-type]
    with pytest.raises(LorafuseValueError, match="overwrite must be True or False"):
        lorafuse.load(second).save(tmp_path / "s", overwrite="no")  # type: ignore[arg-type]
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
    # a callable progress and None are still what apply takes
    events: list[object] = []
    lorafuse.apply(llama.base_dir, paths, out=tmp_path / "o", progress=events.append)
    assert events

"""The dtype of the factors combine and resize write (issue #18): the inputs' by default, --dtype / dtype=
to choose (kohya's --save_precision).

Inputs are written by the `safetensors` package (torch tensors, so BF16 too) and outputs read back by it.
The default F16 / BF16 result must be the float32 result (dtype fp32) rounded once by torch (round to
nearest even), bit for bit; the float32 results themselves are checked against numpy float64 (the exact
sum for cat, the Eckart-Young optimum for svd and resize)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.cli import build_parser, main
from lorafuse.errors import AdapterNote, LorafuseValueError, NonFiniteError
from lorafuse.ops.combine import CombineOptions, combine_to, combine_with
from lorafuse.ops.rank import RankRule
from lorafuse.ops.resize import resize

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
KOHYA = [  # (name, out, in, kernel (0: linear), rank, alpha)
    ("lora_unet_down_blocks_0_resnets_0_conv1", 16, 8, 3, 4, 2.0),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 16, 16, 1, 4, 4.0),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 32, 16, 0, 4, 1.0),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 12, 12, 0, 4, None),
]
NAMES = [m[0] for m in KOHYA]
WEIGHTS = [1.0, -0.6]
PREFIX = "base_model.model.model.layers.0."
PEFT_MODULES = {"self_attn.q_proj": (24, 20), "mlp.up_proj": (40, 16)}


def write_kohya(path: Path, dtype: str, seed: int, alpha_dtype: str | None = None, scale: float = 1.0,
                dtypes: dict[str, str] | None = None) -> Path:
    """A kohya LoRA file of `dtype` factors (per module `dtypes` overrides), alphas in `alpha_dtype` (default
    the factors'), written by safetensors."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, o, i, k, r, alpha in KOHYA:
        dt = TORCH[(dtypes or {}).get(name, dtype)]
        down = torch.randn((r, i, k, k) if k else (r, i), generator=g) * scale
        up = torch.randn((o, r, 1, 1) if k else (o, r), generator=g) * 0.5
        tensors[f"{name}.lora_down.weight"] = down.to(dt)
        tensors[f"{name}.lora_up.weight"] = up.to(dt)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=TORCH[alpha_dtype or dtype])
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


def write_peft(path: Path, dtype: str, seed: int, rank: int = 4, alpha: float = 8.0) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    tensors = {}
    for name, (o, i) in PEFT_MODULES.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = (torch.randn((rank, i), generator=g) * 0.3).to(TORCH[dtype])
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (torch.randn((o, rank), generator=g) * 0.3).to(TORCH[dtype])
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "up_proj"]}))
    return path


def factor_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in tensors if k.endswith(("lora_down.weight", "lora_up.weight", "lora_A.weight",
                                                      "lora_B.weight")))


def assert_rounded_once(got_path: Path, f32_path: Path, dtype: str) -> dict[str, torch.Tensor]:
    """Every factor of `got_path` is `dtype` and is the F32 factor of `f32_path` rounded by torch, bit for
    bit; every other tensor (kohya .alpha) is the same in both. Returns the F32 file's tensors."""
    got, ref = load_file(str(got_path)), load_file(str(f32_path))
    assert sorted(got) == sorted(ref) and factor_keys(got)
    for key in factor_keys(got):
        assert ref[key].dtype == torch.float32, key
        assert got[key].dtype == TORCH[dtype], key
        want = ref[key].to(TORCH[dtype])
        bits = torch.int32 if dtype == "F32" else torch.int16
        assert torch.equal(got[key].view(bits), want.view(bits)), key
    for key in set(got) - set(factor_keys(got)):
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    return ref


def f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def kohya_delta(tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """scale * up @ down of one module, float64, 2-D (rows x in*kh*kw)."""
    up, down = f64(tensors[f"{name}.lora_up.weight"]), f64(tensors[f"{name}.lora_down.weight"])
    r = down.shape[0]
    alpha = float(f64(tensors[f"{name}.alpha"])) if f"{name}.alpha" in tensors else r
    return alpha / r * up.reshape(up.shape[0], r) @ down.reshape(r, -1)


def weighted_sum(paths: list[Path], name: str) -> np.ndarray:
    return sum(w * kohya_delta(load_file(str(p)), name) for w, p in zip(WEIGHTS, paths))  # type: ignore[return-value]


def optimum(d: np.ndarray, k: int) -> float:
    return float(np.sqrt(np.sum(np.linalg.svd(d, compute_uv=False)[k:] ** 2)))


def file_dtypes(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys() if not k.endswith(".alpha")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    tmp = tmp_path_factory.mktemp("dtype_in")
    return {d: [write_kohya(tmp / f"{d}{i}.safetensors", d, 20 + i) for i in range(2)] for d in ("F16", "BF16")}


METHOD_OPTIONS = {"svd": dict(rank=3), "cat": {}, "ties": dict(density=0.5), "ties_svd": dict(density=0.5, rank=3)}


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_combine_keeps_the_inputs_dtype(tmp_path, inputs, dtype, method):
    paths = inputs[dtype]
    kw = dict(method=method, threads=1, **METHOD_OPTIONS[method])
    default = lorafuse.combine(paths, WEIGHTS, **kw).save(tmp_path / "default.safetensors")  # type: ignore[arg-type]
    f32 = lorafuse.combine(paths, WEIGHTS, dtype="fp32", **kw).save(tmp_path / "f32.safetensors")  # type: ignore[arg-type]
    ref = assert_rounded_once(default, f32, dtype)
    back = load_file(str(default))
    for name in NAMES[:3]:  # kohya .alpha: the dtype it was read in (it holds the new alpha exactly)
        assert back[f"{name}.alpha"].dtype == TORCH[dtype]
    if method in ("cat", "svd"):  # the float32 result against numpy float64
        for name in NAMES:
            want, got = weighted_sum(paths, name), kohya_delta(ref, name)
            if method == "cat":
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)
            else:
                err = np.linalg.norm(got - want)
                assert err == pytest.approx(optimum(want, 3), rel=1e-4, abs=1e-6 * np.linalg.norm(want)), name


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_resize_keeps_the_inputs_dtype(tmp_path, inputs, dtype):
    src = inputs[dtype][0]
    small, report = resize(src, RankRule(rank=2), threads=1, progress=False)
    small32, _ = resize(src, RankRule(rank=2), threads=1, progress=False, dtype="float")  # kohya's name for F32
    ref = assert_rounded_once(small.save(tmp_path / "r.safetensors"), small32.save(tmp_path / "r32.safetensors"),
                              dtype)
    inp = load_file(str(src))
    assert [m.rank_out for m in report] == [2] * len(KOHYA)
    for name in NAMES:
        want = kohya_delta(inp, name)
        err = np.linalg.norm(kohya_delta(ref, name) - want)
        assert err == pytest.approx(optimum(want, 2), rel=1e-4, abs=1e-6 * np.linalg.norm(want)), name


def test_alpha_keeps_its_own_dtype(tmp_path):
    """F16 factors with F32 alphas: the factors stay F16, the alphas F32 (as they were read)."""
    paths = [write_kohya(tmp_path / f"a{i}.safetensors", "F16", 30 + i, alpha_dtype="F32") for i in range(2)]
    out = lorafuse.combine(paths, WEIGHTS, method="cat").save(tmp_path / "cat.safetensors")
    small = resize(paths[0], RankRule(rank=2), progress=False)[0].save(tmp_path / "small.safetensors")
    for path in (out, small):
        back = load_file(str(path))
        assert {back[k].dtype for k in factor_keys(back)} == {torch.float16}
        assert {back[f"{n}.alpha"].dtype for n, *_, a in KOHYA if a is not None} == {torch.float32}


def test_dtype_chooses_the_output_dtype_on_the_command_line(tmp_path, inputs):
    paths = [str(p) for p in inputs["F16"]]
    o = {n: tmp_path / f"{n}.safetensors" for n in ("c32", "cbf", "r32", "rbf", "cdef")}
    assert main(["combine", *paths, "--method", "cat", "--dtype", "fp32", "-q", "-o", str(o["c32"])]) == 0
    assert main(["combine", *paths, "--method", "cat", "--dtype", "bf16", "-q", "-o", str(o["cbf"])]) == 0
    assert main(["combine", *paths, "--method", "cat", "-q", "-o", str(o["cdef"])]) == 0
    assert main(["resize", paths[0], "--rank", "2", "--dtype", "float", "-q", "-o", str(o["r32"])]) == 0
    assert main(["resize", paths[0], "--rank", "2", "--dtype", "bfloat16", "-q", "-o", str(o["rbf"])]) == 0
    assert file_dtypes(o["c32"]) == file_dtypes(o["r32"]) == {"F32"}
    assert file_dtypes(o["cdef"]) == {"F16"}
    assert_rounded_once(o["cbf"], o["c32"], "BF16")  # F16 inputs written as BF16: F32 result rounded once
    assert_rounded_once(o["rbf"], o["r32"], "BF16")
    assert_rounded_once(o["cdef"], o["c32"], "F16")


def test_mixed_dtypes_give_f32_with_a_note(tmp_path, inputs, capsys):
    paths = [inputs["F16"][0], inputs["BF16"][1]]
    with pytest.warns(AdapterNote, match=r"combine: the inputs' factors are BF16 and F16 .* the result's are F32"):
        mix = lorafuse.combine(paths, WEIGHTS, method="cat")
    assert {t.dtype for u in mix.updates.values() for t in (u.A, u.B)} == {"F32"}
    with pytest.warns(AdapterNote, match="F16"):
        report = combine_to(paths, WEIGHTS, CombineOptions(method="cat"), tmp_path / "mix.safetensors")
    assert report.dtype == "F32" and file_dtypes(report.out) == {"F32"}
    # values: the exact weighted sum of the two inputs (float64 numpy from the safetensors package)
    back = load_file(str(report.out))
    for name in NAMES:
        want = sum(w * kohya_delta(load_file(str(p)), name) for w, p in zip(WEIGHTS, paths))
        np.testing.assert_allclose(kohya_delta(back, name), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # a dtype given: no note (warnings are errors here)
    assert file_dtypes(lorafuse.combine(paths, method="cat", dtype="fp16").save(tmp_path / "h.safetensors")) == \
        {"F16"}
    # the command line says so on stderr
    assert main(["combine", *map(str, paths), "--method", "cat", "-o", str(tmp_path / "cli.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "note: combine: the inputs' factors are BF16 and F16" in err and "F32" in err
    assert file_dtypes(tmp_path / "cli.safetensors") == {"F32"}
    # one file whose modules differ: resize writes F32, with a note
    one = write_kohya(tmp_path / "one.safetensors", "F16", 40, dtypes={NAMES[0]: "F32"})
    with pytest.warns(AdapterNote, match=r"resize: the inputs' factors are F16 and F32"):
        small, _ = resize(one, RankRule(rank=2), progress=False)
    assert {t.dtype for u in small.updates.values() for t in (u.A, u.B)} == {"F32"}


def test_peft_inputs_keep_their_dtype(tmp_path):
    bf = [write_peft(tmp_path / f"bf{i}", "BF16", 50 + i) for i in range(2)]
    default = combine_to(bf, WEIGHTS, CombineOptions(method="svd", rank=3, threads=1), tmp_path / "default")
    f32 = combine_to(bf, WEIGHTS, CombineOptions(method="svd", rank=3, threads=1, dtype="FP32"), tmp_path / "f32")
    assert (default.dtype, f32.dtype) == ("BF16", "F32")
    ref = assert_rounded_once(default.out / "adapter_model.safetensors", f32.out / "adapter_model.safetensors", "BF16")
    cfg = json.loads((f32.out / "adapter_config.json").read_text())
    inputs = [load_file(str(p / "adapter_model.safetensors")) for p in bf]
    for name in PEFT_MODULES:  # the float32 result is the rank-3 optimum of the weighted sum (scale 8 / 4 = 2)
        key = PREFIX + name
        want = sum(w * 2.0 * f64(t[f"{key}.lora_B.weight"]) @ f64(t[f"{key}.lora_A.weight"])
                   for w, t in zip(WEIGHTS, inputs))
        scale = cfg.get("alpha_pattern", {}).get(key.removeprefix("base_model.model."), cfg["lora_alpha"]) / \
            cfg.get("rank_pattern", {}).get(key.removeprefix("base_model.model."), cfg["r"])
        got = scale * f64(ref[f"{key}.lora_B.weight"]) @ f64(ref[f"{key}.lora_A.weight"])
        assert np.linalg.norm(got - want) == pytest.approx(optimum(want, 3), rel=1e-4), name
    # resize and the command line on F16 PEFT folders
    h = write_peft(tmp_path / "h", "F16", 60)
    assert main(["resize", str(h), "--rank", "2", "-q", "-o", str(tmp_path / "hr")]) == 0
    assert main(["resize", str(h), "--rank", "2", "--dtype", "fp32", "-q", "-o", str(tmp_path / "hr32")]) == 0
    assert_rounded_once(tmp_path / "hr" / "adapter_model.safetensors", tmp_path / "hr32" / "adapter_model.safetensors",
                        "F16")
    saved = combine_with([h, h], [1.0, 0.5], CombineOptions(method="cat", dtype="half")).save(tmp_path / "hc")
    assert file_dtypes(saved / "adapter_model.safetensors") == {"F16"}


def _deltas(adapter) -> dict[str, np.ndarray]:
    """Every module's delta in float64, from its stored factors (numpy)."""
    out = {}
    for name, u in adapter.updates.items():
        b, a = u.B.f32().astype(np.float64), u.A.f32().astype(np.float64)
        out[name] = u.scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))
    return out


def test_a_factor_beyond_the_dtype_is_balanced_and_a_product_beyond_it_refused(tmp_path):
    """cat puts c_i A_i in the output: 1000 * ~100 is beyond F16's 65504 in A, while B is ~0.5. B A is what
    counts: A is divided and B multiplied by one power of two, and the F16 delta is the float32 one to F16's
    precision. A product no two F16 factors can hold (weights 1e12) is refused, never written as Inf."""
    paths = [write_kohya(tmp_path / f"big{i}.safetensors", "F16", 70 + i, scale=100.0) for i in range(2)]
    wide = lorafuse.combine(paths, [1000.0, 1.0], method="cat", dtype="fp32")
    assert max(float(np.abs(u.A.f32()).max()) for u in wide.updates.values()) > 65504
    half = lorafuse.combine(paths, [1000.0, 1.0], method="cat")
    assert {u.A.dtype for u in half.updates.values()} == {"F16"}
    assert max(float(np.abs(u.A.f32()).max()) for u in half.updates.values()) <= 65504
    want, got = _deltas(wide), _deltas(half)
    for name in want:
        err = np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name])
        assert err < 2e-3, (name, err)  # F16 keeps 11 bits
    assert main(["combine", *map(str, paths), "--weights", "1000,1", "--method", "cat", "-o",
                 str(tmp_path / "o.safetensors")]) == 0
    with pytest.raises(NonFiniteError, match=r"module '.*': a factor value .* beyond the largest finite F16.*"
                                             r"even balanced between B and A"):
        lorafuse.combine(paths, [1e12, 1.0], method="cat")
    assert main(["combine", *map(str, paths), "--weights", "1e12,1", "--method", "cat", "-o",
                 str(tmp_path / "p.safetensors")]) == 1
    assert not (tmp_path / "p.safetensors").exists()
    bf = lorafuse.combine(paths, [1000.0, 1.0], method="cat", dtype="bf16")  # BF16 has the range of F32
    assert {u.A.dtype for u in bf.updates.values()} == {"BF16"}


def test_factors_below_the_dtype_are_balanced_not_flushed(tmp_path):
    """resize of F16 factors of ~1e-4 puts the singular values on B (PEFT's split): B = U S has entries far
    below F16's normal range (6.1e-5) and would become subnormals or zero, losing most of the delta. B is
    multiplied and A divided by one power of two instead: the delta keeps F16's relative precision."""
    a = np.random.default_rng(5).standard_normal((8, 64)) * 1e-4
    b = np.random.default_rng(6).standard_normal((48, 8)) * 1e-4
    folder = tmp_path / "tiny"
    folder.mkdir()
    save_file({f"{PREFIX}q.lora_A.weight": torch.from_numpy(a).half(),
               f"{PREFIX}q.lora_B.weight": torch.from_numpy(b).half()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 8, '
                                                '"target_modules": ["q"]}')
    exact = torch.from_numpy(b).half().double().numpy() @ torch.from_numpy(a).half().double().numpy()
    for result in (lorafuse.resize(folder, rank=8).adapter,
                   lorafuse.combine([folder, folder], [0.5, 0.5], method="svd", rank=8)):
        (name, delta), = _deltas(result).items()
        assert result.updates[name].B.dtype == "F16"
        err = np.linalg.norm(delta - exact) / np.linalg.norm(exact)
        assert err < 2e-3, err  # was 0.26 with the singular values flushed to F16 subnormals


@pytest.mark.parametrize("alias, want", [("fp32", "F32"), ("float", "F32"), ("float32", "F32"), ("FP32", "F32"),
                                         ("fp16", "F16"), ("half", "F16"), ("float16", "F16"),
                                         ("bf16", "BF16"), ("bfloat16", "BF16"), ("torch.bfloat16", "BF16")])
def test_the_flag_parses_kohya_and_torch_names(alias, want):
    parser = build_parser()
    assert parser.parse_args(["combine", "a", "b", "-o", "x", "--dtype", alias]).dtype == want
    assert parser.parse_args(["resize", "a", "--rank", "2", "-o", "x", "--dtype", alias]).dtype == want
    assert parser.parse_args(["combine", "a", "-o", "x"]).dtype is None


@pytest.mark.parametrize("verb", ["combine", "resize"])
def test_the_flag_lists_its_choices(verb, capsys):
    text = " ".join(build_parser().verbs[verb].format_help().split())  # type: ignore[attr-defined]
    assert "--dtype {fp32,fp16,bf16}" in text and "--save_precision" in text and "rounded once" in text
    argv = {"combine": ["combine", "a", "-o", "x"], "resize": ["resize", "a", "--rank", "2", "-o", "x"]}[verb]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--dtype", "int8"])
    assert e.value.code == 2
    assert "argument --dtype: unknown dtype 'int8' (choose from fp32, fp16, bf16)" in capsys.readouterr().err


def test_the_api_refuses_unknown_dtypes(inputs):
    for bad in ("int8", "F64", 16):
        with pytest.raises(LorafuseValueError, match="dtype"):
            lorafuse.combine(inputs["F16"], method="cat", dtype=bad)  # type: ignore[arg-type]
        with pytest.raises(LorafuseValueError, match="dtype"):
            resize(inputs["F16"][0], RankRule(rank=2), dtype=bad)  # type: ignore[arg-type]

"""combine_to: a combination written module group by module group to its output (formats.streaming).

The streamed output must be the very file `combine_with(...).save(...)` writes, for every method and
every format, LoRA and LyCORIS inputs, conv kernels included, F32, F16 and BF16 factors (written in the
inputs' dtype, or the one asked for); its deltas are checked against numpy float64 here for the exact
methods; and it follows the output rules (nothing at `out`, or the previous output intact, after an error
or a changed input)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris_fixtures import network, save
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import AdapterNote, InputChangedError, UnsupportedError
from lorafuse.io.provenance import command_text, invoked
from lorafuse.ops import combine as combine_pkg
from lorafuse.ops.combine import METHODS, REGISTRY, CombineOptions, combine_to, combine_with

PREFIX = "base_model.model.model.layers.0."
PEFT_MODULES = {"self_attn.q_proj": (24, 20), "mlp.up_proj": (40, 16), "self_attn.o_proj": (20, 24)}
WEIGHTS = [1.0, 0.6, -0.8]
KOHYA = [  # (name, out, in, kernel (0: linear), rank, alpha)
    ("lora_unet_down_blocks_0_resnets_0_conv1", 16, 8, 3, 4, 2.0),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 16, 16, 1, 4, 4.0),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 32, 16, 0, 4, 1.0),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 12, 12, 0, 4, None),
]


def _files(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _peft(path: Path, rank: int, alpha: float, seed: int) -> Path:
    g = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors = {}
    for name, (o, i) in PEFT_MODULES.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = g.standard_normal((rank, i)).astype(np.float32)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = g.standard_normal((o, rank)).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "o_proj", "up_proj"]}))
    return path


def _kohya(path: Path, seed: int) -> Path:
    g = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, o, i, k, r, alpha in KOHYA:
        tensors[f"{name}.lora_down.weight"] = g.standard_normal((r, i, k, k) if k else (r, i)).astype(np.float16)
        tensors[f"{name}.lora_up.weight"] = g.standard_normal((o, r, 1, 1) if k else (o, r)).astype(np.float16)
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float16)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


def _kohya_bf16(path: Path, seed: int) -> Path:
    """As _kohya, BF16 factors and alphas (torch: numpy has no bfloat16)."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, o, i, k, r, alpha in KOHYA:
        tensors[f"{name}.lora_down.weight"] = torch.randn((r, i, k, k) if k else (r, i), generator=g).bfloat16()
        tensors[f"{name}.lora_up.weight"] = torch.randn((o, r, 1, 1) if k else (o, r), generator=g).bfloat16()
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    save_torch(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


def _factor_dtypes(path: Path) -> set[str]:
    """The dtypes of a file's tensors other than kohya's .alpha, as the safetensors package reads them."""
    with safe_open(str(path), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys() if not k.endswith(".alpha")}


@pytest.fixture(scope="module")
def peft_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("peft_in")
    return [_peft(tmp / f"a{i}", 4, alpha, i) for i, alpha in enumerate((8.0, 2.0, 4.0))]


@pytest.fixture(scope="module")
def kohya_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("kohya_in")
    return [_kohya(tmp / f"k{i}.safetensors", 10 + i) for i in range(3)]


@pytest.fixture(scope="module")
def kohya_bf16_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("kohya_bf16_in")
    return [_kohya_bf16(tmp / f"b{i}.safetensors", 10 + i) for i in range(3)]


def _options(method: str, **kw: object) -> CombineOptions:
    m = REGISTRY[method]
    return CombineOptions(method=method, density=0.5 if m.takes_density else None,
                          rank=6 if m.takes_rank else None, **kw)  # type: ignore[arg-type]


def _both(inputs: list[Path], options: CombineOptions, tmp: Path, fmt: str | None,
          suffix: str = "") -> tuple[Path, Path, combine_pkg.CombineReport]:
    saved = combine_with(inputs, WEIGHTS, options).save(tmp / f"saved{suffix}", fmt)
    report = combine_to(inputs, WEIGHTS, options, tmp / f"streamed{suffix}", fmt)
    return saved, report.out, report


@pytest.mark.parametrize("method", METHODS)
def test_peft_stream_is_the_saved_file_for_every_method(tmp_path, peft_inputs, method):
    saved, streamed, report = _both(peft_inputs, _options(method), tmp_path, None)
    assert _files(streamed) == _files(saved)
    assert list(report.ranks) == list(lorafuse.load(saved).updates)
    assert report.ranks == {n: u.rank for n, u in lorafuse.load(saved).updates.items()}


@pytest.mark.parametrize("method", METHODS)
def test_kohya_stream_with_conv_kernels_is_the_saved_file(tmp_path, kohya_inputs, method):
    options = _options(method, conv_rank=3 if REGISTRY[method].takes_rank else None)
    saved, streamed, report = _both(kohya_inputs, options, tmp_path, None, ".safetensors")
    assert streamed.read_bytes() == saved.read_bytes()
    if REGISTRY[method].takes_rank:  # a 3x3 conv takes conv_rank, a 1x1 conv and the linears take rank
        assert report.ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 3
        assert report.ranks["lora_unet_down_blocks_0_attentions_0_proj_in"] == 6


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
@pytest.mark.parametrize("method", ["svd", "cat", "ties", "ties_svd"])
def test_f16_and_bf16_inputs_stream_in_their_dtype(tmp_path, kohya_inputs, kohya_bf16_inputs, method, dtype):
    inputs = kohya_inputs if dtype == "F16" else kohya_bf16_inputs
    options = _options(method, conv_rank=3 if REGISTRY[method].takes_rank else None)
    saved, streamed, report = _both(inputs, options, tmp_path, None, ".safetensors")
    assert streamed.read_bytes() == saved.read_bytes()
    assert report.dtype == dtype and _factor_dtypes(streamed) == {dtype}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_dtype_asked_for_streams_to_the_saved_file(tmp_path, kohya_inputs, dtype):
    saved, streamed, report = _both(kohya_inputs, _options("svd", dtype=dtype), tmp_path, None, ".safetensors")
    assert streamed.read_bytes() == saved.read_bytes()
    want = {"fp32": "F32", "bf16": "BF16"}[dtype]
    assert report.dtype == want and _factor_dtypes(streamed) == {want}


def test_mixed_dtypes_stream_as_f32(tmp_path, kohya_inputs, kohya_bf16_inputs):
    inputs = [kohya_inputs[0], kohya_bf16_inputs[1], kohya_inputs[2]]
    with pytest.warns(AdapterNote, match="the inputs' factors are BF16 and F16"):
        saved, streamed, report = _both(inputs, _options("cat"), tmp_path, None, ".safetensors")
    assert streamed.read_bytes() == saved.read_bytes()
    assert report.dtype == "F32" and _factor_dtypes(streamed) == {"F32"}


def _reference_delta(paths: list[Path], name: str) -> np.ndarray:
    """sum_i w_i * s_i * B_i A_i in float64, from the files read by the safetensors package."""
    total = None
    for w, p in zip(WEIGHTS, paths):
        u = lorafuse.load(p).updates[name]
        b, a = u.factors()
        d = w * u.scale * (np.asarray(b, np.float64).reshape(b.shape[0], -1) @
                           np.asarray(a, np.float64).reshape(a.shape[0], -1))
        total = d if total is None else total + d
    assert total is not None
    return total


def test_cat_stream_is_the_exact_sum(tmp_path, kohya_inputs):
    # float32 factors: the exact sum, not its rounding to the inputs' F16 (test_output_dtype checks that)
    report = combine_to(kohya_inputs, WEIGHTS, _options("cat", dtype="fp32"), tmp_path / "cat.safetensors")
    out = lorafuse.load(report.out)
    for name, *_ in KOHYA:
        want = _reference_delta(kohya_inputs, name)
        got = out.updates[name].delta().reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
        assert report.ranks[name] == 12


def test_svd_stream_of_full_rank_is_exact(tmp_path, peft_inputs):
    """rank 12 >= the stacked rank: the best rank-12 approximation is the sum itself."""
    report = combine_to(peft_inputs, WEIGHTS, CombineOptions(method="svd", rank=12), tmp_path / "svd")
    out = lorafuse.load(report.out)
    for name in PEFT_MODULES:
        key = "model.layers.0." + name
        want = _reference_delta(peft_inputs, key)
        np.testing.assert_allclose(out.updates[key].delta(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.filterwarnings("ignore:.*written as 2-D LoRA factors:lorafuse.errors.AdapterNote")  # generic LoHa / LoKr
@pytest.mark.parametrize("method", ["svd", "cat", "ties_svd"])
def test_lycoris_inputs_stream_to_the_saved_file(tmp_path, method):
    inputs = [save(network(algo, seed=i)[1], tmp_path / f"{algo}{i}.safetensors")
              for i, algo in enumerate(("loha", "lokr", "locon"))]
    saved, streamed, report = _both(inputs, _options(method), tmp_path, None, ".safetensors")
    assert streamed.read_bytes() == saved.read_bytes()
    assert report.ranks == {n: u.rank for n, u in lorafuse.load(saved).updates.items()}


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_an_error_mid_stream_keeps_the_previous_output(tmp_path, peft_inputs, monkeypatch):
    out = tmp_path / "out"
    combine_to(peft_inputs, WEIGHTS, CombineOptions(method="cat"), out)
    before, listing = _files(out), _listing(tmp_path)
    calls = []

    def failing(group, ctx):
        calls.append(len(group))
        if len(calls) == 2:
            raise RuntimeError("boom in the second group")
        return REGISTRY["cat"].run(group, ctx)

    monkeypatch.setitem(REGISTRY, "cat", REGISTRY["cat"].__class__(**{**REGISTRY["cat"].__dict__, "run": failing}))
    with pytest.raises(RuntimeError, match="second group"):
        combine_to(peft_inputs, WEIGHTS, CombineOptions(method="cat", group_bytes=1), out)
    assert calls == [1, 1]  # one module per group: the first was written before the error
    assert _files(out) == before and _listing(tmp_path) == listing


def test_an_input_changed_while_read_is_refused(tmp_path, peft_inputs, monkeypatch):
    def changed(paths=None):
        raise InputChangedError("an input changed while it was read")

    monkeypatch.setattr(combine_pkg, "raise_if_inputs_changed", changed)
    with pytest.raises(InputChangedError):
        combine_to(peft_inputs, WEIGHTS, CombineOptions(method="svd", rank=4), tmp_path / "out")
    assert _listing(tmp_path) == []


def test_a_format_that_cannot_name_the_modules_is_refused_before_any_work(tmp_path, peft_inputs, monkeypatch):
    def never(group, ctx):
        raise AssertionError("no module may be computed")

    monkeypatch.setitem(REGISTRY, "svd", REGISTRY["svd"].__class__(**{**REGISTRY["svd"].__dict__, "run": never}))
    with pytest.raises(UnsupportedError, match="kohya module name"):
        combine_to(peft_inputs, WEIGHTS, CombineOptions(method="svd", rank=4), tmp_path / "o.safetensors", "kohya")
    assert _listing(tmp_path) == []


def test_an_output_over_an_input_is_refused(tmp_path, kohya_inputs):
    before = kohya_inputs[1].read_bytes()
    with pytest.raises(lorafuse.LorafuseError):
        combine_to(kohya_inputs, WEIGHTS, CombineOptions(method="cat"), kohya_inputs[1], overwrite=True)
    assert kohya_inputs[1].read_bytes() == before


def test_cli_combine_writes_the_streamed_file(tmp_path, kohya_inputs, capsys):
    out = tmp_path / "cli.safetensors"
    args = ["combine", *map(str, kohya_inputs), "--weights=" + ",".join(map(str, WEIGHTS)), "--method", "svd",
            "--rank", "5", "-o", str(out)]
    assert main(args) == 0
    assert "combined 3 adapters with svd" in capsys.readouterr().out
    with invoked(command_text(args, str(out)), "command"):  # the record names the command (issue #16)
        want = combine_with(kohya_inputs, WEIGHTS, CombineOptions(method="svd", rank=5)).save(
            tmp_path / "api.safetensors")
    assert out.read_bytes() == want.read_bytes()

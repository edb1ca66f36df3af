"""`convert --to gguf` never writes a wrong GGUF LoRA: what llama.cpp reads back, (alpha / r) * lora_b @ lora_a
with the file's float32 alpha, is the adapter's delta within the output type's rounding, or the conversion is
refused (LorafuseError naming the adapter, the module and the tensor; no output, no temporary file left).

The adapters' scales and factors here are far from the usual ones: a per-module scale folded into lora_b beyond
float32 (alpha_pattern), lora_B beyond F16's 65504, factors below F16's normal range, a lora_alpha that no
float32 holds (adapter.lora.alpha is a FLOAT32), factors holding NaN / Inf. A numpy RuntimeWarning is an error
(an overflow that was not checked).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import lorafuse  # noqa: E402
from lorafuse.cli import main  # noqa: E402
from lorafuse.errors import LorafuseError, NonFiniteError, UnsupportedError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

PREFIX = "base_model.model.model.layers.0.self_attn."
MODULES = {"q_proj": "blk.0.attn_q.weight", "k_proj": "blk.0.attn_k.weight", "v_proj": "blk.0.attn_v.weight"}
# the rounding of each type, relative to the delta's largest value (F16 / BF16: a few ulps over r terms;
# Q8_0: lora_a in blocks of 32, within a step of max / 127, lora_b F16 as r is not a multiple of 32)
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2}


def factors(rng: np.random.Generator, out: int, inp: int, r: int, scale_a: float, scale_b: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A, lora_B) as float32: normal values times the scales, computed in float64 (no overflow)."""
    a = (rng.standard_normal((r, inp)) * scale_a).astype(np.float32)
    b = (rng.standard_normal((out, r)) * scale_b).astype(np.float32)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return a, b


def peft(folder: Path, tensors: dict[str, tuple[np.ndarray, np.ndarray]], *, r: int = 2, lora_alpha: float = 4.0,
         alpha_pattern: dict[str, float] | None = None) -> Path:
    """A PEFT LoRA folder: module (q_proj, ...) -> (lora_A, lora_B)."""
    folder.mkdir(parents=True)
    state = {}
    for module, (a, b) in tensors.items():
        state[f"{PREFIX}{module}.lora_A.weight"] = a
        state[f"{PREFIX}{module}.lora_B.weight"] = b
    safetensors_numpy.save_file(state, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": sorted(tensors),
              "alpha_pattern": alpha_pattern or {}, "rank_pattern": {}, "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def base_config(folder: Path, hidden: int) -> Path:
    """A Llama base model's config.json (llama.cpp's converter permutes q / k rows by these head counts)."""
    folder.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 32,
           "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "config.json"


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py) on the rows of a matrix."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read(path: Path) -> tuple[float, dict[str, tuple[str, np.ndarray]]]:
    """(adapter.lora.alpha, tensor -> (type name, values as float64)) as llama.cpp's gguf-py reads them."""
    r = gguf.GGUFReader(path)
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    tensors = {}
    for t in r.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        tensors[t.name] = (t.tensor_type.name, values.reshape(tuple(int(n) for n in reversed(t.shape))))
    return alpha, tensors


def check(path: Path, tensors: dict[str, tuple[np.ndarray, np.ndarray]], scales: dict[str, float], gguf_type: str,
          heads: int | None = None) -> tuple[float, dict[str, tuple[str, np.ndarray]]]:
    """Every module's delta read back from the file equals the adapter's (float64) within the type's rounding;
    every value is finite and the alpha a finite nonzero float32."""
    alpha, got = read(path)
    assert np.isfinite(alpha) and alpha != 0 and float(np.float32(alpha)) == alpha
    assert set(got) == {MODULES[m] + s for m in tensors for s in (".lora_a", ".lora_b")}
    for module, (a, b) in tensors.items():
        name = MODULES[module]
        (_, la), (_, lb) = got[name + ".lora_a"], got[name + ".lora_b"]
        assert np.isfinite(la).all() and np.isfinite(lb).all(), name
        r = lb.shape[1]
        delta = (alpha / r) * (lb @ la)  # llama.cpp: scale alpha / r, r = lora_b's ne[0]
        want = scales[module] * (b.astype(np.float64) @ a.astype(np.float64))
        if heads is not None and module in ("q_proj", "k_proj"):
            want = permute(want, heads)
        peak = np.abs(want).max()
        assert peak > 0 and np.isfinite(peak)
        err = np.abs(delta - want).max() / peak
        assert err <= TOLERANCE[gguf_type], f"{module}: relative error {err:.3g} as {gguf_type}"
    return alpha, got


def no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)], "a temporary file is left"


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RuntimeWarning" not in err, err
    return rc, err


# ----------------------------------------------------------------------------- accepted: written exactly


def test_folded_scale_beyond_float32_is_split_between_the_factors(tmp_path, capsys):
    """lora_alpha 1e-30 with alpha_pattern k_proj 1e30 over factors ~1e-20: k_proj's scale over the file's
    alpha / r is 1e60, which lora_b times it (1e40) cannot hold as float32; the delta (~1e-10) is finite.
    The fold is shared by lora_a and lora_b (powers of two), q_proj is written as it is."""
    rng = np.random.default_rng(0)
    tensors = {"q_proj": factors(rng, 8, 8, 2, 1.0, 1.0), "k_proj": factors(rng, 8, 8, 2, 1e-20, 1e-20)}
    adapter = peft(tmp_path / "a", tensors, lora_alpha=1e-30, alpha_pattern={"k_proj": 1e30})
    cfg = base_config(tmp_path / "base", 8)
    out = tmp_path / "x.gguf"
    rc, err = cli(["convert", str(adapter), "--to", "gguf", "--base-config", str(cfg), "-o", str(out)], capsys)
    assert rc == 0, err
    alpha, got = check(out, tensors, {"q_proj": 1e-30 / 2, "k_proj": 1e30 / 2}, "f32", heads=2)
    assert alpha == float(np.float32(1e-30))
    np.testing.assert_array_equal(got["blk.0.attn_q.weight.lora_a"][1], tensors["q_proj"][0])  # as the converter
    np.testing.assert_array_equal(got["blk.0.attn_q.weight.lora_b"][1], permute(tensors["q_proj"][1], 2))


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_factors_beyond_the_type_are_rebalanced_by_a_power_of_two(gguf_type, tmp_path, capsys):
    """lora_B entries above F16's 65504 (F16, and Q8_0's F16 lora_b) and above BF16's largest over a small
    lora_A: written with lora_a times 2^k and lora_b over 2^k, the delta unchanged; v_proj, in range, is
    written as the converter writes it (each value rounded once)."""
    rng = np.random.default_rng(1)
    big = {"f16": 1e5, "q8_0": 1e7, "bf16": 1e37}[gguf_type]
    hidden = 32 if gguf_type == "q8_0" else 16  # Q8_0: lora_a's rows (in) a multiple of 32
    tensors = {"q_proj": factors(rng, hidden, hidden, 2, 1e-5 if gguf_type != "bf16" else 1e-30, big),
               "v_proj": factors(rng, hidden, hidden, 2, 0.1, 0.1)}
    if gguf_type == "bf16":  # float32's largest value, beyond BF16's (it rounds to Inf)
        tensors["q_proj"][1][0, 0] = np.finfo(np.float32).max
    adapter = peft(tmp_path / "a", tensors, lora_alpha=2)
    out = tmp_path / "x.gguf"
    rc, err = cli(["convert", str(adapter), "--to", "gguf", "--arch", "qwen2", "--gguf-type", gguf_type,
                   "-o", str(out)], capsys)
    assert rc == 0, err
    _, got = check(out, tensors, {"q_proj": 1.0, "v_proj": 1.0}, gguf_type)
    kind, lb = got["blk.0.attn_q.weight.lora_b"]
    assert np.abs(lb).max() < np.abs(tensors["q_proj"][1]).max() / 2  # moved into lora_a
    if gguf_type == "f16":
        assert kind == "F16"
        for part, x in zip(("lora_a", "lora_b"), tensors["v_proj"]):
            np.testing.assert_array_equal(got[f"blk.0.attn_v.weight.{part}"][1], x.astype(np.float16))


def test_factors_below_f16s_range_do_not_round_to_zero(tmp_path, capsys):
    """lora_A ~1e-7 (F16's smallest subnormal is 6e-8: most values would become 0 or one step) with lora_B ~0.1:
    the product fits F16 once lora_a takes a power of two from lora_b."""
    rng = np.random.default_rng(2)
    tensors = {"q_proj": factors(rng, 16, 16, 2, 1e-7, 0.1)}
    adapter = peft(tmp_path / "a", tensors, lora_alpha=2)
    out = tmp_path / "x.gguf"
    lorafuse.convert(adapter, out, to="gguf", arch="qwen2", gguf_type="f16")
    _, got = check(out, tensors, {"q_proj": 1.0}, "f16")
    assert np.abs(got["blk.0.attn_q.weight.lora_a"][1]).max() >= 2.0 ** -14  # F16's normal range


@pytest.mark.parametrize(("lora_alpha", "gguf_type"), [(1e39, "f32"), (-1e39, "f32"), (1e-50, "f32"), (1e39, "f16"),
                                                    (-1e39, "q8_0"), (1e-50, "bf16")])
def test_lora_alpha_beyond_float32(lora_alpha, gguf_type, tmp_path, capsys):
    """adapter.lora.alpha is a FLOAT32: a lora_alpha beyond its range (1e39 overflows, 1e-50 is 0) is not
    written; the file's alpha is the nearest power of two in range (llama.cpp's alpha / r a normal float32) and
    the rest of each module's scale goes into its factors."""
    rng = np.random.default_rng(3)
    hidden = 32 if gguf_type == "q8_0" else 16
    tensors = {"q_proj": factors(rng, hidden, hidden, 4, 0.1, 0.1),
               "v_proj": factors(rng, hidden, hidden, 4, 1.0, 1e-3)}
    adapter = peft(tmp_path / "a", tensors, r=4, lora_alpha=lora_alpha)
    out = tmp_path / "api.gguf"
    rep = lorafuse.convert(adapter, out, to="gguf", arch="qwen2", gguf_type=gguf_type)
    alpha, _ = check(out, tensors, {m: lora_alpha / 4 for m in tensors}, gguf_type)
    assert alpha == rep.alpha == (2.0 ** -124 if abs(lora_alpha) < 1 else np.sign(lora_alpha) * 2.0 ** 127)
    assert set(rep.folded) == {"model.layers.0.self_attn." + m for m in tensors}
    assert any("beyond float32" in n for n in rep.notes)
    out2 = tmp_path / "cli.gguf"
    rc, err = cli(["convert", str(adapter), "--to", "gguf", "--arch", "qwen2", "--gguf-type", gguf_type,
                   "-o", str(out2)], capsys)
    assert rc == 0, err
    assert "beyond float32" in err
    check(out2, tensors, {m: lora_alpha / 4 for m in tensors}, gguf_type)


def test_lora_alpha_below_float32_as_f16_is_refused(tmp_path):
    """lora_alpha 1e-50: a delta of ~1e-52, which F16 factors cannot hold with any normal float32 scale."""
    rng = np.random.default_rng(3)
    tensors = {"q_proj": factors(rng, 16, 16, 4, 0.1, 0.1)}
    adapter = peft(tmp_path / "a", tensors, r=4, lora_alpha=1e-50)
    out = tmp_path / "x.gguf"
    with pytest.raises(UnsupportedError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*attn_q\.weight\.lora_b.*"
                                              r"round to zero as F16"):
        lorafuse.convert(adapter, out, to="gguf", arch="qwen2", gguf_type="f16")
    no_output(tmp_path, out)


def test_q8_0_block_of_tiny_values(tmp_path):
    """A Q8_0 block whose values are all ~1e-40 (its scale d, an F16, is 0) in a lora_a of ordinary values:
    gguf's quantize computes 1 / d, which overflows float32 (a RuntimeWarning, int8 of Inf); the block is 0."""
    rng = np.random.default_rng(8)
    a, b = factors(rng, 32, 64, 2, 1.0, 1.0)
    a[0, :32], a[1, :32] = 1e-40, -3e-39
    tensors = {"q_proj": (a, b)}
    adapter = peft(tmp_path / "a", tensors, lora_alpha=2)
    out = tmp_path / "x.gguf"
    lorafuse.convert(adapter, out, to="gguf", arch="qwen2", gguf_type="q8_0")
    _, got = check(out, tensors, {"q_proj": 1.0}, "q8_0")
    kind, la = got["blk.0.attn_q.weight.lora_a"]
    assert kind == "Q8_0" and not la[:, :32].any() and np.abs(la[:, 32:]).max() > 1


# ----------------------------------------------------------------------------- refused: nothing written


@pytest.mark.parametrize("where", ["lora_A", "lora_B"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_factors_holding_nan_or_inf_are_refused(where, bad, tmp_path, capsys):
    rng = np.random.default_rng(4)
    tensors = {"q_proj": factors(rng, 8, 8, 2, 1.0, 1.0), "k_proj": factors(rng, 8, 8, 2, 1.0, 1.0)}
    tensors["k_proj"][0 if where == "lora_A" else 1][1, 1] = bad
    adapter = peft(tmp_path / "a", tensors)
    cfg = base_config(tmp_path / "base", 8)
    out = tmp_path / "x.gguf"
    with pytest.raises(NonFiniteError) as e:
        lorafuse.convert(adapter, out, to="gguf", base_config=cfg)
    msg = str(e.value)
    part = "lora_a" if where == "lora_A" else "lora_b"
    assert str(adapter) in msg and "'model.layers.0.self_attn.k_proj'" in msg and where in msg
    assert f"blk.0.attn_k.weight.{part}" in msg and "NaN or Inf" in msg
    no_output(tmp_path, out)
    rc, err = cli(["convert", str(adapter), "--to", "gguf", "--base-config", str(cfg), "-o", str(out)], capsys)
    assert rc != 0 and "NonFiniteError" in err and "self_attn.k_proj" in err and f"attn_k.weight.{part}" in err
    no_output(tmp_path, out)


def test_f16_product_beyond_its_range_is_refused(tmp_path, capsys):
    """lora_A and lora_B both ~1e5: their products (~1e10) are beyond what two F16 factors hold (65504^2) however
    they are rebalanced; F16 would write Inf. Refused, naming the module and the tensors."""
    rng = np.random.default_rng(5)
    tensors = {"v_proj": factors(rng, 16, 16, 2, 0.1, 0.1), "q_proj": factors(rng, 16, 16, 2, 1e5, 1e5)}
    adapter = peft(tmp_path / "a", tensors, lora_alpha=2)
    out = tmp_path / "x.gguf"
    with pytest.raises(NonFiniteError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*blk\.0\.attn_q\.weight\.lora_a"
                                              r".*not be finite as F16") as e:
        lorafuse.convert(adapter, out, to="gguf", arch="qwen2", gguf_type="f16")
    assert str(adapter) in str(e.value)
    no_output(tmp_path, out)
    rc, err = cli(["convert", str(adapter), "--to", "gguf", "--arch", "qwen2", "--gguf-type", "f16", "-o", str(out)],
                  capsys)
    assert rc != 0 and "NonFiniteError" in err and "attn_q.weight.lora_b" in err
    no_output(tmp_path, out)
    # as F32 (the default) the same adapter is written, exactly
    lorafuse.convert(adapter, out, to="gguf", arch="qwen2")
    check(out, tensors, {"q_proj": 1.0, "v_proj": 1.0}, "f32")


def test_f32_folded_scale_beyond_float32_is_refused(tmp_path):
    """k_proj's alpha 1e40 (scale 5e39) over factors ~1e20: its products (~1e79 over llama.cpp's alpha / r) are
    beyond what two float32 factors hold (3.4e38^2), however the fold is shared."""
    rng = np.random.default_rng(6)
    tensors = {"q_proj": factors(rng, 8, 8, 2, 1.0, 1.0), "k_proj": factors(rng, 8, 8, 2, 1e20, 1e20)}
    adapter = peft(tmp_path / "a", tensors, lora_alpha=4, alpha_pattern={"k_proj": 1e40})
    out = tmp_path / "x.gguf"
    with pytest.raises(NonFiniteError, match=r"'model\.layers\.0\.self_attn\.k_proj'.*blk\.0\.attn_k\.weight\.lora_b"):
        lorafuse.convert(adapter, out, to="gguf", arch="qwen2")
    no_output(tmp_path, out)


def test_f16_product_below_its_range_is_refused(tmp_path, capsys):
    """lora_A and lora_B both ~1e-5 (products ~1e-10, below F16's normal range squared): as F16 the delta would
    be mostly zeros. Refused (UnsupportedError: the values, not the arguments), naming the module and the tensors;
    F32 writes it exactly."""
    rng = np.random.default_rng(7)
    tensors = {"q_proj": factors(rng, 16, 16, 2, 1e-5, 1e-5)}
    adapter = peft(tmp_path / "a", tensors, lora_alpha=2)
    out = tmp_path / "x.gguf"
    with pytest.raises(UnsupportedError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*attn_q\.weight\.lora_a.*"
                                              r"round to zero as F16") as e:
        lorafuse.convert(adapter, out, to="gguf", arch="qwen2", gguf_type="f16")
    assert isinstance(e.value, LorafuseError) and str(adapter) in str(e.value)
    no_output(tmp_path, out)
    rc, err = cli(["convert", str(adapter), "--to", "gguf", "--arch", "qwen2", "--gguf-type", "f16", "-o", str(out)],
                  capsys)
    assert rc == 1 and "UnsupportedError" in err and "self_attn.q_proj" in err  # the values: exit 1, not 2
    no_output(tmp_path, out)
    lorafuse.convert(adapter, out, to="gguf", arch="qwen2")
    check(out, tensors, {"q_proj": 1.0}, "f32")

"""Round-4 interop red-team findings (lorafuse outputs read by PEFT 0.21.2 and LyCORIS 4.1.3).

- A DoRA adapter after another adapter on the same weight: PEFT (DoraLinearVariant.merge_* with
  `_unmerged_base_weight`, and its forward) scales everything merged so far by m / ||W + that
  adapter's own delta||; lorafuse used the norm of everything merged so far. Checked against PEFT's
  merge_and_unload (several adapters active) and a numpy float64 formula, for every backend here.
- A generic (`lycoris_*`) LoHa / LoKr on a Conv2d stores its pieces flattened: no name says the
  kernel, so resize / convert --rank / combine cannot write LoRA factors LyCORIS can load.
- `info` on a target_parameters (MoE) adapter shows the r and scale PEFT builds per parameter.
- `combine` names PEFT's bias tensors (bias="all" / "lora_only") as bias tensors.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorafuse
from lorafuse.backends import FactorStage, LowRankStage, MergeJob, available_backends, get_backend
from lorafuse.cli import main
from lorafuse.errors import AdapterNote, UnsupportedError

# ----------------------------------------------------------------------------- DoRA after another adapter

Q = "model.layers.0.self_attn.q_proj"


def _llama_base(folder: Path, dtype: torch.dtype) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(str(folder))
    return folder


def _adapter(base: Path, folder: Path, model_cls: type, targets: list[str], dora: bool, seed: int,
             **extra: object) -> Path:
    """A PEFT adapter saved by PEFT, its factors and magnitude moved well away from their init."""
    torch.manual_seed(seed)
    config = LoraConfig(target_modules=targets, r=2, lora_alpha=4, use_dora=dora, init_lora_weights=False, **extra)
    pm = get_peft_model(model_cls.from_pretrained(str(base), dtype=torch.float32), config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.2)
            if "magnitude" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape))
    pm.save_pretrained(str(folder))
    return folder


def _peft_merged(base: Path, adapters: list[Path], model_cls: type, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """PEFT's merge_and_unload with every adapter active, in order."""
    pm = PeftModel.from_pretrained(model_cls.from_pretrained(str(base), dtype=dtype), str(adapters[0]),
                                   adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(str(a), adapter_name=f"a{i}")
    pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    merged = pm.eval().merge_and_unload()
    return {k: v.detach().float().numpy() for k, v in merged.state_dict().items()}


def _float64_merge(w: np.ndarray, adapters: list[Path], module: str, transposed: bool = False) -> np.ndarray:
    """PEFT's DoRA merge in float64: each adapter in turn; a DoRA one scales the weight so far by
    m / ||W + its own delta|| per output feature (rows; columns of a fan_in_fan_out weight)."""
    base = w.astype(np.float64)
    t = base.copy()
    for a in adapters:
        cfg = json.loads((a / "adapter_config.json").read_text())
        sd = load_file(str(a / "adapter_model.safetensors"))
        key = f"base_model.model.{module}"
        delta = (cfg["lora_alpha"] / cfg["r"]) * (sd[f"{key}.lora_B.weight"].astype(np.float64)
                                                  @ sd[f"{key}.lora_A.weight"].astype(np.float64))
        if transposed:
            delta = delta.T
        t = t + delta
        if f"{key}.lora_magnitude_vector" in sd:
            m = sd[f"{key}.lora_magnitude_vector"].astype(np.float64)
            own = base + delta
            t = t * (m[None, :] / np.linalg.norm(own, axis=0)[None, :] if transposed
                     else m[:, None] / np.linalg.norm(own, axis=1)[:, None])
    return t


def _bf16_values(x: np.ndarray) -> np.ndarray:
    """The float64 values of x rounded to bf16 (round to nearest even)."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).float().double().numpy()


def _merged_weight(out: Path, key: str) -> np.ndarray:
    import safetensors.torch

    return safetensors.torch.load_file(str(out / "model.safetensors"))[key].float().double().numpy()


@pytest.fixture(scope="module")
def llama_dora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dora_order")
    made: dict[str, Path] = {}
    for dt, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        base = _llama_base(root / f"base_{dt}", dtype)
        made[f"base_{dt}"] = base
        for name, dora, seed in (("plain", False, 1), ("dora", True, 2), ("dora2", True, 3)):
            made[f"{name}_{dt}"] = _adapter(base, root / f"{name}_{dt}", LlamaForCausalLM, ["q_proj", "v_proj"],
                                            dora, seed)
    return made


ORDERS = [("plain", "dora"), ("dora", "plain"), ("dora", "dora2"), ("plain", "dora", "dora2")]


@pytest.mark.parametrize("order", ORDERS, ids=["+".join(o) for o in ORDERS])
def test_dora_after_another_adapter_equals_peft_merge_float32(llama_dora: dict[str, Path], order: tuple[str, ...],
                                                              tmp_path: Path) -> None:
    """Before: `apply BASE plain dora` divided by ||W + dW_plain + dW_dora||; q_proj was off PEFT's merge by 0.39."""
    base = llama_dora["base_f32"]
    adapters = [llama_dora[f"{n}_f32"] for n in order]
    ref = _peft_merged(base, adapters, LlamaForCausalLM, torch.float32)
    out = lorafuse.apply(base, adapters, out=tmp_path / "out", progress=False).out
    for module in (Q, "model.layers.0.self_attn.v_proj"):
        key = f"{module}.weight"
        got = _merged_weight(out, key)
        w = _merged_weight(base, key)
        f64 = _float64_merge(w, adapters, module)
        np.testing.assert_allclose(got, f64, rtol=0, atol=2e-6 * np.abs(f64).max())
        np.testing.assert_allclose(got, ref[key], rtol=0, atol=5e-6 * np.abs(f64).max())


@pytest.mark.parametrize("order", ORDERS[:3], ids=["+".join(o) for o in ORDERS[:3]])
def test_dora_after_another_adapter_bf16(llama_dora: dict[str, Path], order: tuple[str, ...], tmp_path: Path) -> None:
    """A bf16 base: the float64 PEFT formula rounded once to bf16 (lorafuse rounds once); PEFT's own bf16 merge
    (a rounding per adapter and the unmerge / merge replay) agrees to a few bf16 units."""
    base = llama_dora["base_bf16"]
    adapters = [llama_dora[f"{n}_bf16"] for n in order]
    out = lorafuse.apply(base, adapters, out=tmp_path / "out", progress=False).out
    ref = _peft_merged(base, adapters, LlamaForCausalLM, torch.bfloat16)
    key = f"{Q}.weight"
    got = _merged_weight(out, key)
    f64 = _float64_merge(_merged_weight(base, key), adapters, Q)
    ulp = np.abs(f64) * 2.0**-8 + 1e-30
    assert (np.abs(got - _bf16_values(f64)) <= ulp).all()  # one rounding of the exact value, at most one unit off
    assert np.abs(got - ref[key]).max() <= 8 * 2.0**-8 * np.abs(f64).max()


def test_dora_after_another_adapter_on_a_fan_in_fan_out_weight(tmp_path: Path) -> None:
    """GPT-2 Conv1D (weight stored in x out): the DoRA norm runs over columns of the stored weight."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)).save_pretrained(
        str(base))
    adapters = [_adapter(base, tmp_path / name, GPT2LMHeadModel, ["c_attn"], dora, seed, fan_in_fan_out=True)
                for name, dora, seed in (("plain", False, 1), ("dora", True, 2))]
    ref = _peft_merged(base, adapters, GPT2LMHeadModel, torch.float32)
    out = lorafuse.apply(base, adapters, out=tmp_path / "out", progress=False).out
    key = "transformer.h.0.attn.c_attn.weight"
    got = _merged_weight(out, key)
    f64 = _float64_merge(_merged_weight(base, key), adapters, "transformer.h.0.attn.c_attn", transposed=True)
    np.testing.assert_allclose(got, f64, rtol=0, atol=2e-6 * np.abs(f64).max())
    np.testing.assert_allclose(got, ref[key], rtol=0, atol=5e-6 * np.abs(f64).max())


def _own_norm_reference(w: np.ndarray, stages: list[tuple[np.ndarray, np.ndarray | None, bool]]) -> np.ndarray:
    t = w.astype(np.float64)
    for delta, m, column_norm in stages:
        t = t + delta
        if m is not None:
            own = w.astype(np.float64) + delta
            t = t * (m[None, :] / np.linalg.norm(own, axis=0) if column_norm
                     else (m / np.linalg.norm(own, axis=1))[:, None])
    return t


@pytest.mark.parametrize("backend", ["reference", *[b for b in ("cpu", "cuda") if b in available_backends()]])
def test_merge_kernel_takes_each_dora_norm_over_w_plus_its_own_delta(backend: str) -> None:
    """The backends' merge_batch: plain, LoHa (DoRA by rows), LoKr (DoRA by columns), low-rank (DoRA by rows),
    each DoRA stage normalized over W + its own delta, against numpy float64."""
    rng = np.random.default_rng(5)
    rows, cols = 300, 48  # more than one tile of rows on the CPU
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    w = f(rows, cols) * 3
    b0, a0 = f(rows, 3), f(3, cols)
    h = (f(rows, 2), f(2, cols), f(rows, 2), f(2, cols))
    k1, k2 = f(30, 6), f(10, 8)
    b3, a3 = f(rows, 2), f(2, cols)
    m1, m2, m3 = (np.abs(f(n)) + 1.0 for n in (rows, cols, rows))
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    ref = _own_norm_reference(w, [(f64(b0) @ f64(a0), None, False),
                                  ((f64(h[0]) @ f64(h[1])) * (f64(h[2]) @ f64(h[3])), f64(m1), False),
                                  (np.kron(f64(k1), f64(k2)), f64(m2), True),
                                  (f64(b3) @ f64(a3), f64(m3), False)])
    stages = [LowRankStage(b0, a0), FactorStage("hadamard", h, m1, False), FactorStage("kron", (k1, k2), m2, True),
              LowRankStage(b3, a3, m3, False)]
    out = np.empty_like(w)
    (flag,) = get_backend(backend).merge_batch([MergeJob("m", w, "F32", out, "F32", stages)])
    assert not flag
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# ----------------------------------------------------------------------------- generic LyCORIS convolutions

def _lycoris_loads(path: Path, model: torch.nn.Module) -> None:
    """LyCORIS's own loader puts the file's modules on a copy of `model` (raises when a factor does not fit)."""
    from lycoris import create_lycoris_from_weights
    from lycoris_fixtures import Tiny

    copy = Tiny()
    copy.load_state_dict(model.state_dict())
    create_lycoris_from_weights(1.0, str(path), copy)


def _notes(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, AdapterNote)]


KERNEL = "kernel size is unknown"


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_generic_lycoris_convolution_written_2d_is_noted(algo: str, tmp_path: Path) -> None:
    """Tiny's 3x3 'lycoris_conv' and 1x1 'lycoris_point' LoHa / LoKr are stored flattened, like its Linear layers:
    resize, convert --rank and combine write them as 2-D LoRA factors, which LyCORIS cannot put on the convolution.
    Before: no word; now a note names the modules and says the kernel is unknown."""
    from lycoris_fixtures import network, save

    model, net = network(algo, seed=3, linear_dim=2, linear_alpha=2.0, conv_dim=2, conv_alpha=2.0)
    src = save(net, tmp_path / "in.safetensors")
    runs = {"resize": lambda: lorafuse.resize(src, 2, out=tmp_path / "resize.safetensors", progress=False),
            "convert": lambda: lorafuse.convert(src, tmp_path / "convert.safetensors", to="kohya", rank=2),
            "combine": lambda: lorafuse.combine([src, src], rank=2).save(tmp_path / "combine.safetensors",
                                                                          format="kohya")}
    for verb, run in runs.items():
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            run()
        (note,) = [n for n in _notes(record) if KERNEL in n]
        assert note.startswith(f"{src}: ") and "'lycoris_conv'" in note, (verb, note)
        assert "written as 2-D LoRA factors" in note and "apply the adapter to its base" in note
        out = load_file(str(tmp_path / f"{verb}.safetensors"))
        assert out["lycoris_conv.lora_down.weight"].ndim == 2  # what the note warns of: LyCORIS refuses it
        with pytest.raises(RuntimeError):
            _lycoris_loads(tmp_path / f"{verb}.safetensors", model)


def test_generic_convolution_whose_kernel_another_input_gives_is_not_noted(tmp_path: Path) -> None:
    """combined with a LoCon of the same model (its convolutions stored 4-D), the LoHa's convolutions take their
    kernel from it: no note names them, and LyCORIS loads the result with the combined deltas."""
    from lycoris_fixtures import network, save

    model, net = network("loha", seed=3, linear_dim=2, linear_alpha=2.0, conv_dim=2, conv_alpha=2.0)
    _, net2 = network("locon", seed=4, linear_dim=2, linear_alpha=2.0, conv_dim=2, conv_alpha=2.0)
    loha, locon = save(net, tmp_path / "loha.safetensors"), save(net2, tmp_path / "locon.safetensors")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lorafuse.combine([loha, locon], rank=4, conv_rank=8).save(tmp_path / "mix.safetensors", format="kohya")
    (note,) = [n for n in _notes(record) if KERNEL in n]
    assert "'lycoris_fc'" in note and "lycoris_conv" not in note and "lycoris_point" not in note
    out = load_file(str(tmp_path / "mix.safetensors"))
    assert out["lycoris_conv.lora_down.weight"].shape == (8, 32, 3, 3)
    _lycoris_loads(tmp_path / "mix.safetensors", model)


# ----------------------------------------------------------------------------- info on target_parameters

def _moe_adapter(tmp_path: Path, **lora: object) -> tuple[Path, PeftModel]:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                         vocab_size=96, max_position_embeddings=32, head_dim=8)
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(tmp_path / "base"))
    config = LoraConfig(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj",
                                                                       "mlp.experts.down_proj"],
                        init_lora_weights=False, **lora)  # type: ignore[arg-type]
    pm = get_peft_model(Qwen3MoeForCausalLM.from_pretrained(str(tmp_path / "base")), config)
    pm.save_pretrained(str(tmp_path / "ad"))
    return tmp_path / "ad", pm


PEFT_PATTERN_WARNING = "ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning"  # PEFT's own


@pytest.mark.filterwarnings(PEFT_PATTERN_WARNING)
def test_info_shows_the_rank_and_scale_peft_builds_a_parameter_lora_with(tmp_path: Path) -> None:
    """rank_pattern {'down_proj': 3}: PEFT builds the down_proj ParamWrapper with r=3, scaling 4/3 (its lora_A holds
    3 rows for each of 4 experts); info said r=12, scale 2."""
    adapter, pm = _moe_adapter(tmp_path, r=2, lora_alpha=4, rank_pattern={"down_proj": 3})
    d = lorafuse.describe(adapter)
    details = {m["name"]: m for m in d["module_details"]}  # type: ignore[union-attr]
    wrappers = [n for n in details if "experts" in n]
    assert len(wrappers) == 2
    for name in wrappers:
        layer = pm.base_model.model.get_submodule(name)
        assert type(layer).__name__ == "ParamWrapper"
        m = details[name]
        assert (m["rank"], m["scale"]) == (layer.r["default"], pytest.approx(layer.scaling["default"]))
        assert f"{layer.parameter_name} (target_parameters: 4 experts of rank {layer.r['default']})" in m["kind"]
    assert d["ranks"] == {2: 2, 3: 1} and d["scales"] == [pytest.approx(4 / 3), 2.0] and d["lora_alphas"] == [4]


@pytest.mark.filterwarnings(PEFT_PATTERN_WARNING)
def test_info_says_when_only_the_base_tells_a_parameter_loras_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                    ) -> None:
    """Both parameters at r=2 but alpha 4 and 8: their wrappers hold 8 rows each, so the file does not say which is
    which (PEFT's nesting order is not saved) nor the scale: None, and 'r=? scale=?' in the text."""
    adapter, _ = _moe_adapter(tmp_path, r=2, lora_alpha=4, alpha_pattern={"down_proj": 8})
    d = lorafuse.describe(adapter)
    wrappers = [m for m in d["module_details"] if "experts" in m["name"]]  # type: ignore[union-attr]
    assert len(wrappers) == 2
    for m in wrappers:
        assert m["rank"] is None and m["scale"] is None and "known against the base" in m["kind"]
    assert d["ranks"] == {2: 1} and d["scales"] == [2.0]
    assert main(["info", str(adapter)]) == 0
    assert "r=?    scale=?" in capsys.readouterr().out


# ----------------------------------------------------------------------------- PEFT bias tensors

@pytest.fixture(scope="module")
def bias_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bias")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, attention_bias=True, mlp_bias=True)
    LlamaForCausalLM(cfg).save_pretrained(str(root / "base"))
    out = {"base": root / "base"}
    for bias in ("all", "lora_only"):
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(str(root / "base")),
                            LoraConfig(target_modules=["q_proj"], r=2, bias=bias, init_lora_weights=False))
        pm.save_pretrained(str(root / bias))
        out[bias] = root / bias
    return out


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_combine_names_peft_bias_tensors_as_biases(bias_adapters: dict[str, Path], bias: str) -> None:
    """PEFT saves biases for bias='all' / 'lora_only' (no modules_to_save in the config): combine called them
    'modules_to_save tensors'; info listed them as modules_to_save."""
    adapter = bias_adapters[bias]
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] is None
    saved = [k.removeprefix("base_model.model.") for k in load_file(str(adapter / "adapter_model.safetensors"))
             if k.endswith(".bias")]
    with pytest.raises(UnsupportedError) as err:
        lorafuse.combine([adapter, adapter])
    first = sorted(saved)[0]
    assert str(err.value).startswith(f"{adapter}: bias tensors ({first}") and "modules_to_save" not in str(err.value)
    assert f"that adapter_config bias={bias!r} saves cannot be combined; merge them with `apply`" in str(err.value)
    d = lorafuse.describe(adapter)
    assert set(d["full_tensor_kinds"].values()) == {"bias"}  # type: ignore[union-attr]


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_gguf_refuses_peft_bias_tensors_by_name(bias_adapters: dict[str, Path], bias: str, tmp_path: Path) -> None:
    """A GGUF LoRA holds no bias: bias='all' / 'lora_only' biases are refused as what they are. Before, the
    biases of LoRA'd layers (saved as `<module>.base_layer.bias`) were taken for PEFT's copies of base weights and
    left out with a note (bias='lora_only': the GGUF was written without the trained biases)."""
    with pytest.raises(UnsupportedError, match=re.escape(f"biases that adapter_config bias={bias!r} saves) cannot go "
                                                         "into a GGUF LoRA")):
        lorafuse.convert(bias_adapters[bias], tmp_path / "x.gguf", to="gguf", arch="llama")
    assert not (tmp_path / "x.gguf").exists()


def test_apply_names_a_peft_bias_tensor_as_a_bias(bias_adapters: dict[str, Path], tmp_path: Path) -> None:
    """apply's messages about a full tensor say which it is: here the refusal of a weight other than 1."""
    with pytest.raises(UnsupportedError, match=re.escape(
            "bias tensor 'model.layers.0.mlp.down_proj.bias' (saved for adapter_config bias='all') replaces")):
        lorafuse.apply(bias_adapters["base"], [bias_adapters["all"]], weights=[0.5], out=tmp_path / "o",
                       progress=False)

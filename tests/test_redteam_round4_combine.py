"""Fourth red-team round, `lorafuse combine` / `similarity`: each test is a finding that was wrong before, checked
against an independent reference (numpy float64, PEFT, diffusers, LyCORIS's own modules)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris_fixtures import CONFIGS, lycoris_delta, modules, network, save
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from redteam_fixtures import peft_folder
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import nn

import lorafuse
from lorafuse.cli import main
from lorafuse.ops.combine import CombineOptions, combine_to

PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # 768 inputs: SD 1.x's context


def f64(x: object) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def optimum(delta: np.ndarray, k: int) -> float:
    """||delta - best rank-k approximation||_F (Eckart-Young), float64."""
    s = np.linalg.svd(delta.reshape(delta.shape[0], -1), compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2)))


def peft_deltas(model: nn.Module, folder: Path, name: str = "x") -> tuple[dict[str, np.ndarray], list[str]]:
    """Every LoRA layer's delta after PEFT loads `folder` into `model` (get_delta_weight, float64), and the
    warnings PEFT gave while loading."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
    out = {k: f64(m.get_delta_weight(name).detach()) for k, m in pm.base_model.model.named_modules()
           if isinstance(m, LoraLayer) and name in m.lora_A}
    return out, [str(w.message) for w in caught]


def randomized(pm: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape) * 0.3)
    return pm


# ----------------------------------------------------------------------------- 1. SD 1.x LoHa / LoKr proj_in


def _sd1_lycoris(path: Path, algo: str) -> dict[str, np.ndarray]:
    """An SD 1.x LoHa or LoKr file (proj_in 32 -> 32, a 1x1 conv in SD 1.x; attn2.to_k 768 -> 32) and each
    module's delta in float64, as LyCORIS defines it."""
    rng = np.random.default_rng(3)
    t: dict[str, np.ndarray] = {}
    deltas = {}
    for name, (o, i) in ((PROJ_IN, (32, 32)), (TO_K, (32, 768))):
        def g(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape) * 0.3).astype(np.float32)
        if algo == "loha":
            parts = {"hada_w1_a": g(o, 2), "hada_w1_b": g(2, i), "hada_w2_a": g(o, 2), "hada_w2_b": g(2, i)}
            p = {k: f64(v) for k, v in parts.items()}
            d = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        else:
            parts = {"lokr_w1": g(4, 4), "lokr_w2_a": g(o // 4, 2), "lokr_w2_b": g(2, i // 4)}
            p = {k: f64(v) for k, v in parts.items()}
            d = np.kron(p["lokr_w1"], p["lokr_w2_a"] @ p["lokr_w2_b"])
        t.update({f"{name}.{k}": v for k, v in parts.items()})
        t[f"{name}.alpha"] = np.array(3.0, np.float32)
        deltas[name] = 1.5 * d  # alpha 3 / r 2
    save_file(t, str(path))
    return deltas


def _sd1_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=16, use_linear_projection=False)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
@pytest.mark.parametrize("verb", ["combine", "resize"])
def test_sd1_lycoris_proj_in_is_written_as_a_1x1_conv(tmp_path: Path, algo: str, verb: str) -> None:
    """combine / resize of an SD 1.x LoHa / LoKr wrote proj_in's LoRA as Linear factors (2, 32) / (32, 2), which
    diffusers refuses (its proj_in is Conv2d(32, 32, 1)); the loader now knows the UNet's context size (768,
    from attn2.to_k) for every operation, as convert did. Checked by diffusers' own loader: its delta is the
    rank-2 optimum of the LoHa's / LoKr's."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    src = tmp_path / "sd1.safetensors"
    deltas = _sd1_lycoris(src, algo)
    assert lorafuse.load(src)[PROJ_IN].delta_shape == (32, 32, 1, 1)
    out = tmp_path / "out.safetensors"
    assert main([verb, str(src), "--rank", "2", "-o", str(out), "-q"]) == 0
    with safe_open(str(out), "np") as f:
        assert f.get_slice(f"{PROJ_IN}.lora_down.weight").get_shape() == [2, 32, 1, 1]
        assert f.get_slice(f"{PROJ_IN}.lora_up.weight").get_shape() == [32, 2, 1, 1]
    unet = _sd1_unet()
    sd, alphas = Loader.lora_state_dict(str(out))
    Loader.load_lora_into_unet(sd, network_alphas=alphas, unet=unet, adapter_name="x")
    layer = unet.down_blocks[0].attentions[0].proj_in
    got = f64(layer.get_delta_weight("x").detach())
    assert got.shape == (32, 32, 1, 1)
    want = deltas[PROJ_IN].reshape(32, 32, 1, 1)
    assert np.linalg.norm(got - want) == pytest.approx(optimum(want, 2), rel=1e-4)


# ----------------------------------------------------------------------------- 2. similarity, flattened convs


@pytest.mark.parametrize("pair", [("locon", "loha"), ("locon", "lokr"), ("lokr_full_w2", "loha")])
def test_similarity_lays_a_flattened_lycoris_conv_onto_the_other_adapters_shape(
        tmp_path: Path, pair: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """LyCORIS stores a LoHa / LoKr of a convolution (no Tucker core) flattened, (24, 288) for a 3x3 conv of
    32 -> 24: similarity refused it beside a LoRA's (24, 32, 3, 3) of the same module, where combine takes it.
    Now the cosine of the summed deltas, as LyCORIS's own modules compute them (numpy float64)."""
    nets = [network(**CONFIGS[name], seed=s)[1] for name, s in zip(pair, (1, 2))]
    paths = [save(net, tmp_path / f"{name}.safetensors") for name, net in zip(pair, nets)]
    ref = [{n: lycoris_delta(m).reshape(lycoris_delta(m).shape[0], -1) for n, m in modules(net).items()}
           for net in nets]
    assert any(lorafuse.load(paths[1])[n].delta_shape != lorafuse.load(paths[0])[n].delta_shape for n in ref[0])
    inner = sum(float(np.sum(ref[0][n] * ref[1][n])) for n in ref[0] if n in ref[1])
    norms = [np.sqrt(sum(float(np.sum(d * d)) for d in r.values())) for r in ref]
    cos = lorafuse.similarity(paths)
    assert cos[0, 1] == pytest.approx(inner / norms[0] / norms[1], abs=1e-6)
    assert main(["similarity", *map(str, paths), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cosine"][0][1] == pytest.approx(inner / norms[0] / norms[1],
                                                                                 abs=1e-6)


# ----------------------------------------------------------------------------- 3. PEFT Conv1d / Conv3d


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3)
        self.c3 = nn.Conv3d(3, 5, 2)
        self.fc = nn.Linear(6, 6)


def _conv_adapters(tmp_path: Path) -> tuple[list[Path], list[dict[str, np.ndarray]]]:
    paths, deltas = [], []
    for i in range(2):
        torch.manual_seed(0)
        pm = randomized(get_peft_model(_ConvNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c3", "fc"])),
                        10 + i)
        pm.save_pretrained(str(tmp_path / f"k{i}"))
        paths.append(tmp_path / f"k{i}")
        deltas.append({k: f64(m.get_delta_weight("default").detach()) for k, m in pm.base_model.model.named_modules()
                       if isinstance(m, LoraLayer)})
    return paths, deltas


@pytest.mark.parametrize("argv", [["--method", "cat"], ["--rank", "4"], ["--rank", "4", "--engine", "stream"]])
def test_cli_combine_takes_peft_conv1d_and_conv3d(tmp_path: Path, argv: list[str]) -> None:
    """The CLI refused PEFT LoRAs on Conv1d / Conv3d ("layout of module 'c1': delta shape (6, 4, 3) is not (out,
    in) or (out, in, kh, kw)") while lorafuse.combine(...).save() wrote them. The output, loaded by PEFT, is
    the weighted sum of the inputs' deltas (cat, and svd at their summed rank, are exact)."""
    paths, deltas = _conv_adapters(tmp_path)
    out = tmp_path / "out"
    assert main(["combine", *map(str, paths), "--weights", "1,-0.5", "-o", str(out), "-q", *argv]) == 0
    torch.manual_seed(0)
    got, _ = peft_deltas(_ConvNet(), out)
    assert set(got) == {"c1", "c3", "fc"}
    for name, d in got.items():
        want = deltas[0][name] - 0.5 * deltas[1][name]
        assert d.shape == want.shape
        np.testing.assert_allclose(d, want, atol=1e-5 * np.abs(want).max())


# ----------------------------------------------------------------------------- 4. rank_pattern keys anchored


class _Sub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 6)


class _Nested(nn.Module):
    """A root `fc` whose name is the dotted tail of `sub.fc` and `sub2.fc` (Flux: `proj_out` and
    `single_transformer_blocks.N.proj_out`)."""

    def __init__(self) -> None:
        super().__init__()
        self.sub, self.sub2, self.fc = _Sub(), _Sub(), nn.Linear(10, 5)


def _nested_adapter(folder: Path, targets: list[str], seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    pm = randomized(get_peft_model(_Nested(), LoraConfig(r=4, lora_alpha=4, target_modules=targets)), seed)
    pm.save_pretrained(str(folder))
    return {k: f64(m.get_delta_weight("default").detach()) for k, m in pm.base_model.model.named_modules()
            if isinstance(m, LoraLayer)}


def test_rank_pattern_keys_match_one_module_under_peft_rules(tmp_path: Path) -> None:
    """cat of an adapter on fc, sub.fc, sub2.fc with one on sub.fc, sub2.fc wrote rank_pattern {'fc': 4}: PEFT
    matches keys as dotted suffixes ((.*\\.)?(KEY)$), so sub.fc got rank 4 too and PEFT could not load the
    output. Keys are now '^' + the escaped name; PEFT loads the output and its deltas are the sum."""
    a = _nested_adapter(tmp_path / "a", ["fc"], 1)
    b = _nested_adapter(tmp_path / "b", ["sub.fc", "sub2.fc"], 2)
    out = tmp_path / "out"
    assert main(["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "cat", "-o", str(out), "-q"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {"^fc": 4} and cfg["alpha_pattern"] == {"^fc": 4}
    torch.manual_seed(0)
    got, _ = peft_deltas(_Nested(), out)
    for name in ("fc", "sub.fc", "sub2.fc"):
        want = a[name] + b.get(name, 0.0)
        np.testing.assert_allclose(got[name], want, atol=1e-5 * np.abs(want).max())
    again = lorafuse.load(out)  # lorafuse reads its own keys the same way (exact names, looked up)
    assert {n: u.rank for n, u in again.updates.items()} == {"fc": 4, "sub.fc": 8, "sub2.fc": 8}
    assert all(u.scale == 1.0 for u in again.updates.values())


def test_a_state_dict_without_config_is_saved_with_anchored_patterns(tmp_path: Path) -> None:
    """Adapter.from_state_dict without a config stated each module's rank by a bare escaped name, which PEFT
    also applies to the modules that name is the tail of; saved, PEFT loads it with the right ranks."""
    rng = np.random.default_rng(5)
    shapes = {"fc": (5, 10, 2), "sub.fc": (6, 10, 3), "sub2.fc": (6, 10, 3)}
    tensors = {}
    for n, (o, i, r) in shapes.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = rng.standard_normal((r, i)).astype(np.float32)
        tensors[f"base_model.model.{n}.lora_B.weight"] = rng.standard_normal((o, r)).astype(np.float32)
    adapter = lorafuse.Adapter.from_state_dict(tensors)
    assert set(adapter.config["rank_pattern"]) == {"^fc", "^sub\\.fc", "^sub2\\.fc"}
    adapter.save(tmp_path / "out")
    torch.manual_seed(0)
    got, _ = peft_deltas(_Nested(), tmp_path / "out")
    for n in shapes:
        p = f"base_model.model.{n}"
        want = f64(tensors[f"{p}.lora_B.weight"]) @ f64(tensors[f"{p}.lora_A.weight"])
        np.testing.assert_allclose(got[n], want, atol=1e-5 * np.abs(want).max())


def test_anchored_keys_are_looked_up_not_matched() -> None:
    """'^' + an escaped name is an exact name (no regular expression to compile and test), so a config of more
    of them than MAX_REGEX_PATTERNS still loads; the first key in dict order still wins."""
    from lorafuse.formats.peft import MatchBudget, PatternTable

    table = PatternTable({"^sub\\.fc": 1, "fc": 2, "^fc": 3}, "rank_pattern", "test")
    assert not table.regex
    budget = MatchBudget("test", 0, 3)
    assert [table.value(n, 0, budget) for n in ("sub.fc", "fc", "sub2.fc", "a.sub.fc")] == [1, 2, 2, 2]
    assert PatternTable({"^fc": 3, "fc": 2}, "rank_pattern", "test").value("fc", 0, budget) == 3


# ----------------------------------------------------------------------------- 5. one pipeline's parts

TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _kohya_lora(path: Path, modules_: dict[str, tuple[int, int]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t, deltas = {}, {}
    for n, (o, i) in modules_.items():
        t[f"{n}.lora_down.weight"] = rng.standard_normal((2, i)).astype(np.float32)
        t[f"{n}.lora_up.weight"] = rng.standard_normal((o, 2)).astype(np.float32)
        t[f"{n}.alpha"] = np.array(1.0, np.float32)
        deltas[n] = 0.5 * f64(t[f"{n}.lora_up.weight"]) @ f64(t[f"{n}.lora_down.weight"])
    save_file(t, str(path))
    return deltas


@pytest.mark.parametrize("argv", [["--rank", "4"], ["--method", "linear"]])
def test_text_encoder_and_unet_loras_of_one_model_combine(tmp_path: Path, argv: list[str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A text-encoder-only and a UNet-only LoRA of one SD model were refused as "adapters for different
    models"; a pipeline's components are one model: each module comes from the adapter that has it, weighted."""
    te = _kohya_lora(tmp_path / "te.safetensors", {TE_Q: (16, 16)}, 1)
    unet = _kohya_lora(tmp_path / "unet.safetensors", {TO_K: (32, 768)}, 2)
    out = tmp_path / "out.safetensors"
    assert main(["combine", str(tmp_path / "te.safetensors"), str(tmp_path / "unet.safetensors"), "--weights",
                 "0.5,2", "-o", str(out), "-q", *argv]) == 0
    got = lorafuse.load(out)
    want = {TE_Q: 0.5 * te[TE_Q], TO_K: 2.0 * unet[TO_K]}  # one term per module: svd at its rank, linear exact
    assert set(got.updates) == set(want)
    for n, d in want.items():
        np.testing.assert_allclose(f64(got[n].delta()), d, atol=1e-5 * np.abs(d).max())
    capsys.readouterr()
    assert main(["similarity", str(tmp_path / "te.safetensors"), str(tmp_path / "unet.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "share no module" in err and "different parts of one model" in err and "different models" not in err


def test_kohya_and_diffusers_namings_are_still_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One pipeline's parts are one model in one naming; kohya's lora_te and diffusers' unet. stay apart."""
    _kohya_lora(tmp_path / "te.safetensors", {TE_Q: (16, 16)}, 1)
    rng = np.random.default_rng(2)
    key = "unet.down_blocks.0.attentions.0.proj_in"
    save_file({f"{key}.lora_A.weight": rng.standard_normal((2, 32)).astype(np.float32),
               f"{key}.lora_B.weight": rng.standard_normal((32, 2)).astype(np.float32)},
              str(tmp_path / "d.safetensors"))
    with pytest.raises(lorafuse.LorafuseValueError, match="adapters for different models, or one model in two"):
        lorafuse.combine([tmp_path / "te.safetensors", tmp_path / "d.safetensors"], rank=2)
    assert main(["combine", str(tmp_path / "te.safetensors"), str(tmp_path / "d.safetensors"),
                 "-o", str(tmp_path / "o.safetensors")]) == 1  # the cause first, as the Python API says it
    err = capsys.readouterr().err
    assert "adapters for different models, or one model in two namings" in err and "lorafuse convert" in err
    assert not (tmp_path / "o.safetensors").exists()


# ----------------------------------------------------------------------------- 6. target_parameters


H = 16
LLM = {"model.layers.0.self_attn.q_proj": (H, H), "model.layers.0.mlp.up_proj": (2 * H, H)}


@pytest.mark.parametrize("verb", [["combine", "{tp}", "{a}", "-o", "{out}"],
                                  ["combine", "{tp}", "{a}", "-o", "{out}", "--dry-run"],
                                  ["combine", "{a}", "{tp}", "--method", "cat", "-o", "{out}"],
                                  ["similarity", "{tp}", "{a}"], ["resize", "{tp}", "--rank", "1", "-o", "{out}"]])
def test_a_lora_on_a_parameter_is_refused_by_name_before_any_work(
        tmp_path: Path, verb: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A PEFT target_parameters LoRA was refused without naming its file, as "fused MoE experts" (here a plain
    Linear weight), and only when its factors were read: --dry-run passed where the run failed. Now refused
    at planning, naming the file, by every verb that reads it as one matrix."""
    tp = peft_folder(tmp_path / "tp", {"model.layers.0.mlp.up_proj": (2 * H, H)}, 1,
                     extra={"target_modules": [], "target_parameters": ["mlp.up_proj.weight"]})
    a = peft_folder(tmp_path / "a", LLM, 2)
    out = tmp_path / "out"
    argv = [w.format(tp=tp, a=a, out=out) for w in verb]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"UnsupportedError: {tp}: module 'model.layers.0.mlp.up_proj' is a LoRA on a parameter of " in err
    assert "(PEFT target_parameters)" in err and "only apply merges it" in err
    assert not out.exists()


# ----------------------------------------------------------------------------- 7. the input named


def test_a_format_that_cannot_name_an_inputs_modules_names_that_input(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """With the default (first input's) format, the refusal named '<in-memory adapter>' and said format='peft',
    which the user never typed; the --format path named the input. Both name it now (CLI, dry run, Python)."""
    a = peft_folder(tmp_path / "a", LLM, 2)
    _, net = network(**CONFIGS["locon"], seed=1)
    ly = save(net, tmp_path / "ly.safetensors")
    for extra in ([], ["--dry-run"]):
        assert main(["combine", str(a), str(ly), "--method", "cat", "-o", str(tmp_path / "o"), *extra]) == 1
        err = capsys.readouterr().err
        assert f"the output format, peft (the first adapter's; --format / format= chooses another), cannot hold " \
               f"these modules: {ly}: module 'lycoris_" in err, err
        assert "<in-memory adapter>" not in err and "format='peft'" not in err
    with pytest.raises(lorafuse.UnsupportedError, match="cannot hold these modules: " + str(ly)):
        combine_to([a, ly], None, CombineOptions(method="cat"), tmp_path / "p")
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- 8. what the output targets


class _Layers(nn.Module):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([self.Block(), self.Block()])


def _layer_adapter(folder: Path, seed: int, **config: object) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    pm = randomized(get_peft_model(_Layers(), LoraConfig(r=2, lora_alpha=4, **config)), seed)  # type: ignore[arg-type]
    pm.save_pretrained(str(folder))
    return {k: f64(m.get_delta_weight("default").detach()) for k, m in pm.base_model.model.named_modules()
            if isinstance(m, LoraLayer)}


CASES = {
    "layers": ({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
               {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    "regex_and_list": ({"target_modules": r"layers\.0\.q_proj"}, {"target_modules": ["v_proj"]}),
    "exclude": ({"target_modules": ["q_proj"], "exclude_modules": ["layers.1.q_proj"]},
                {"target_modules": ["v_proj"], "exclude_modules": ["layers.0.v_proj"]}),
}


@pytest.mark.parametrize("engine", ["memory", "stream"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_output_targets_only_the_modules_it_holds(tmp_path: Path, case: str, engine: str) -> None:
    """Inputs narrowed differently (layers_to_transform, a regex vs a list, exclude_modules) gave an output that
    targeted every q_proj / v_proj by leaf name: PEFT added zero LoRAs for the modules the file lacks and warned
    "Found missing adapter keys". The output now names its modules in full: no warning, the deltas the sum."""
    cfg_a, cfg_b = CASES[case]
    da = _layer_adapter(tmp_path / "a", 1, **cfg_a)
    db = _layer_adapter(tmp_path / "b", 2, **cfg_b)
    out = tmp_path / "out"
    assert main(["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--rank", "4", "--engine", engine, "-o", str(out),
                 "-q"]) == 0
    torch.manual_seed(0)
    got, said = peft_deltas(_Layers(), out)
    assert not [w for w in said if "missing adapter keys" in w], said
    assert set(got) == set(da) | set(db)
    for n, d in got.items():
        want = da.get(n, 0.0) + db.get(n, 0.0)
        np.testing.assert_allclose(d, want, atol=1e-5 * np.abs(want).max())


def test_inputs_narrowed_alike_keep_their_narrowing(tmp_path: Path) -> None:
    """Where the inputs' narrowing fields agree, the output keeps them and unites target_modules (PEFT targets
    what the inputs targeted, no module named in full is needed)."""
    _layer_adapter(tmp_path / "a", 1, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers")
    _layer_adapter(tmp_path / "b", 2, target_modules=["v_proj"], layers_to_transform=[0], layers_pattern="layers")
    out = tmp_path / "out"
    assert main(["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "cat", "-o", str(out), "-q"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["target_modules"], cfg["layers_to_transform"], cfg["layers_pattern"]) == (["q_proj", "v_proj"], [0],
                                                                                          "layers")
    torch.manual_seed(0)
    got, said = peft_deltas(_Layers(), out)
    assert set(got) == {"layers.0.q_proj", "layers.0.v_proj"} and not said


# ----------------------------------------------------------------------------- 9. a zero adapter


def test_similarity_of_a_zero_adapter_says_its_cosine_is_undefined(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An adapter saved before training (every lora_B zero) printed 0.0000, diagonal included, with no note;
    pairs that share no module get one. Now a note says its cosines are undefined (shown as 0)."""
    a = peft_folder(tmp_path / "a", LLM, 1)
    zero = {f"base_model.model.{m}.lora_B.weight": np.zeros((o, 2), np.float32) for m, (o, _) in LLM.items()}
    z = tmp_path / "z"
    shutil.copytree(a, z)
    with safe_open(str(a / "adapter_model.safetensors"), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, **zero}, str(z / "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match=f"{z}: its delta is zero .*undefined and shown as 0"):
        cos = lorafuse.similarity([a, z])
    np.testing.assert_array_equal(cos, [[1.0, 0.0], [0.0, 0.0]])
    assert main(["similarity", str(a), str(z)]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and f"note: {z}: its delta is zero" in err

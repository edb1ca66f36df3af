"""LyCORIS files (LoCon + Tucker, LoHa, LoKr, DoRA, DyLoRA) read by formats.kohya / formats.lycoris_keys.

Every file is written by the real `lycoris` package (its networks' own `save_weights`) on a tiny
torch model, after its parameters were set to random non-zero values; each module's delta is
compared with the one LyCORIS computes from its own modules (the function its forward pass uses),
within the float32 rounding bound of LyCORIS's arithmetic (derived from the same computation on the
absolute values of every parameter). The exact factorizations, merge stages and rank-k conversions
are checked against numpy float64 (Eckart-Young optimum from np.linalg.svd).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lycoris
import numpy as np
import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris
from lycoris_fixtures import (
    CONFIGS,
    U32,
    Tiny,
    assert_close_f32,
    data_buffer,
    lycoris_bound,
    lycoris_delta,
    modules,
    network,
    save,
    terms,
)
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lorafuse
from lorafuse.errors import FormatError, ShapeMismatchError, UnsupportedError
from lorafuse.formats.kohya import load_kohya, save_kohya
from lorafuse.io.tensor import Tensor
from lorafuse.model import LoraUpdate, LycorisUpdate


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tiny, LycorisNetwork, Path]]:
    out = {}
    d = tmp_path_factory.mktemp("lycoris")
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model, net = network(seed=i, **cfg)  # type: ignore[arg-type]
        out[name] = (model, net, save(net, d / f"{name}.safetensors", metadata={"ss_network_module": "lycoris.kohya"}))
    return out


# ----------------------------------------------------------------------------- deltas and scales


@pytest.mark.parametrize("config", list(CONFIGS))
def test_deltas_and_scales_match_lycoris(saved, config):
    _, net, path = saved[config]
    assert lorafuse.detect_format(path) == "kohya"
    adapter = lorafuse.load(path)
    assert adapter.format == "kohya" and adapter.state.metadata == {"ss_network_module": "lycoris.kohya"}
    loras = modules(net)
    assert set(adapter.updates) == set(loras) == {"lycoris_fc", "lycoris_wide", "lycoris_conv", "lycoris_point"}
    for name, lora in loras.items():
        u = adapter[name]
        algo = CONFIGS[config]["algo"]
        if algo == "locon":
            assert isinstance(u, LoraUpdate) and u.rank == lora.lora_dim
        else:
            assert isinstance(u, LycorisUpdate) and u.algo == algo and u.name == name
        assert u.scale == lora.scale, name
        ref = lycoris_delta(lora)
        assert int(np.prod(u.delta_shape)) == ref.size and u.delta_shape[0] == ref.shape[0]
        assert u.kind == ("conv" if len(u.delta_shape) == 4 else "linear")
        if len(u.delta_shape) == 4:
            assert tuple(u.delta_shape) == tuple(lora.shape), name
        assert_close_f32(u.delta(), ref, lycoris_bound(lora), terms(lora), f"{config} {name}")


def test_layouts_read(saved):
    """The layouts the configurations were chosen for, as LyCORIS stored them."""
    def parts(config: str, module: str) -> dict[str, tuple[int, ...]]:
        u = lorafuse.load(saved[config][2])[module]
        return {k: v.shape for k, v in u.tensors.items()} if isinstance(u, LycorisUpdate) else {}

    assert parts("loha_tucker", "lycoris_conv") == {"hada_t1": (2, 2, 3, 3), "hada_w1_a": (2, 24),
                                                    "hada_w1_b": (2, 32), "hada_t2": (2, 2, 3, 3),
                                                    "hada_w2_a": (2, 24), "hada_w2_b": (2, 32)}
    assert parts("loha", "lycoris_conv")["hada_w1_b"] == (2, 288)  # kernel flattened: a 2-D update
    assert lorafuse.load(saved["loha"][2])["lycoris_conv"].delta_shape == (24, 288)
    assert parts("lokr", "lycoris_fc") == {"lokr_w1": (2, 2), "lokr_w2_a": (3, 2), "lokr_w2_b": (2, 5)}
    assert parts("lokr", "lycoris_point") == {"lokr_w1": (3, 3), "lokr_w2": (3, 4, 1, 1)}  # full w2 of a 1x1 conv
    assert parts("lokr_factor4", "lycoris_wide") == {"lokr_w1": (4, 4), "lokr_w2_a": (12, 2), "lokr_w2_b": (2, 16)}
    assert parts("lokr_decompose_both", "lycoris_wide") == {"lokr_w1_a": (6, 2), "lokr_w1_b": (2, 8),
                                                            "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    assert parts("lokr_tucker", "lycoris_conv") == {"lokr_w1": (4, 4), "lokr_t2": (2, 2, 3, 3),
                                                    "lokr_w2_a": (2, 6), "lokr_w2_b": (2, 8)}
    assert parts("lokr_full_w2", "lycoris_conv") == {"lokr_w1": (4, 4), "lokr_w2": (6, 8, 3, 3)}
    tucker = lorafuse.load(saved["locon_tucker"][2])["lycoris_conv"]
    assert isinstance(tucker, LoraUpdate) and tucker.A.shape == (3, 32, 3, 3) and tucker.B.shape == (24, 3, 1, 1)


def test_scales(saved):
    """alpha / r as LyCORIS: r is the factored half's rank; both LoKr halves full means scale 1."""
    scales = {c: {n: u.scale for n, u in lorafuse.load(saved[c][2]).updates.items()} for c in CONFIGS}
    assert scales["loha"] == {"lycoris_fc": 0.5, "lycoris_wide": 0.5, "lycoris_conv": 1.5, "lycoris_point": 0.5}
    assert scales["lokr_decompose_both"]["lycoris_wide"] == 0.25
    assert scales["lokr_tucker"]["lycoris_conv"] == 1.5
    # r = 8 >= half of max(c, d): w1 and w2 are full matrices, so alpha (2.0) is ignored.
    assert scales["lokr_full_w2"] == {"lycoris_fc": 1.0, "lycoris_wide": 1.0, "lycoris_conv": 1.0,
                                      "lycoris_point": 1.0}


def test_the_scale_is_applied_once_as_in_the_forward_pass(saved):
    """A Linear's effective weight in LyCORIS's forward (rebuild mode) is W + delta: LoHa and LoKr
    apply alpha / r once (LyCORIS's get_diff_weight / merge_to apply it twice; lorafuse does not)."""
    for config in ("loha", "lokr_factor4"):
        model, net, path = saved[config]
        u = lorafuse.load(path)["lycoris_wide"]
        assert u.scale != 1.0
        lora = modules(net)["lycoris_wide"]
        lora.bypass_mode = False
        with torch.no_grad():
            eye = torch.eye(64)
            effective = (model.wide(eye) - eye @ model.wide.weight.T).T.double().numpy()
        assert_close_f32(u.delta(), effective, lycoris_bound(lora) + np.abs(model.wide.weight.detach().numpy()),
                         terms(lora) + 64, config)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_files(tmp_path, dtype):
    for algo, extra in (("loha", {"use_tucker": True}), ("lokr", {"decompose_both": True})):
        _, net = network(algo, seed=3, dtype=dtype, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0,
                         **extra)
        adapter = lorafuse.load(save(net, tmp_path / f"{algo}.safetensors", dtype))
        for name, lora in modules(net).items():
            u = adapter[name]
            assert all(t.dtype == dtype for t in u.tensors.values())
            assert_close_f32(u.delta(), lycoris_delta(lora), lycoris_bound(lora), terms(lora), f"{algo} {name}")


# ----------------------------------------------------------------------------- factorizations


def lycoris_updates(saved) -> list[tuple[str, LycorisUpdate]]:
    out = []
    for config in CONFIGS:
        for name, u in lorafuse.load(saved[config][2]).updates.items():
            if isinstance(u, LycorisUpdate):
                out.append((f"{config} {name}", u))
    return out


def test_stored_factors_are_exact(saved):
    for what, u in lycoris_updates(saved):
        d = u.delta().reshape(u.delta_shape[0], -1)
        b, a = u.stored_factors()
        assert b.dtype == a.dtype == np.float32 and b.flags.c_contiguous and a.flags.c_contiguous
        assert b.shape == (d.shape[0], u.rank) and a.shape == (u.rank, d.shape[1]), what
        assert u.rank <= min(d.shape)
        fb, fa = u.factors()
        assert np.array_equal(fb, b) and np.array_equal(fa, a)
        # float32 factors of float64 values: each product term carries a few roundings.
        bound = np.abs(b.astype(np.float64)) @ np.abs(a.astype(np.float64)) * abs(u.scale)
        got = u.scale * (b.astype(np.float64) @ a.astype(np.float64))
        assert np.all(np.abs(got - d) <= 16 * U32 * bound + 8 * U32 * np.abs(d) + 1e-30), what
    ranks = {w: u.rank for w, u in lycoris_updates(saved)}
    assert ranks["loha lycoris_fc"] == 4  # Khatri-Rao, r1 * r2
    assert ranks["loha_rank3 lycoris_fc"] == 6  # 9 >= min(6, 10): the dense delta beside an identity
    assert ranks["lokr lycoris_fc"] == 2 * 2  # w1 (2 x 2) full: rank 2; w2 factored with r = 2
    assert ranks["lokr_full_w2 lycoris_conv"] == 4 * 6  # (I_4, w1) and (I_6, w2 (6 x 72))


def test_merge_stages_reproduce_the_delta(saved):
    for what, u in lycoris_updates(saved):
        d = u.delta().reshape(u.delta_shape[0], -1)
        coef = -0.75 * u.scale  # a user weight times the update's scale
        kind, arrays = u.merge_stage(coef)
        assert all(x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous for x in arrays), what
        x = [a.astype(np.float64) for a in arrays]
        if u.algo == "loha":
            assert kind == "hadamard" and len(x) == 4
            got = (x[0] @ x[1]) * (x[2] @ x[3])
            bound = (np.abs(x[0]) @ np.abs(x[1])) * (np.abs(x[2]) @ np.abs(x[3]))
        else:
            assert kind == "kron" and len(x) == 2
            got, bound = np.kron(x[0], x[1]), np.kron(np.abs(x[0]), np.abs(x[1]))
        assert got.shape == d.shape
        assert np.all(np.abs(got - (-0.75) * d) <= 64 * U32 * (bound + np.abs(d)) + 1e-30), what


def test_lokr_kron_of_a_flattened_4d_w2_is_lycoris_make_kron():
    from lycoris.functional.lokr import make_kron

    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(3, 4, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    u = LycorisUpdate("lycoris_x", "lokr", "conv", (15, 8, 3, 3), 1.0,
                      {"lokr_w1": Tensor.from_array(w1.numpy()), "lokr_w2": Tensor.from_array(w2.numpy())})
    np.testing.assert_array_equal(u.delta(), make_kron(w1.double(), w2.double(), 1.0).numpy())
    kind, (a1, a2) = u.merge_stage(1.0)
    assert kind == "kron" and a1.shape == (3, 4) and a2.shape == (5, 18)
    np.testing.assert_array_equal(np.kron(a1, a2).reshape(15, 8, 3, 3), make_kron(w1, w2, 1.0).numpy())


def test_to_lora_is_the_eckart_young_optimum(saved, tmp_path):
    for what, u in lycoris_updates(saved):
        d = u.delta().reshape(u.delta_shape[0], -1)
        s = np.linalg.svd(d, compute_uv=False)
        for k in (1, 3):
            lora = u.to_lora(k)
            assert isinstance(lora, LoraUpdate) and lora.scale == 1.0 and lora.name == u.name
            assert lora.rank == min(k, u.rank) and lora.kind == u.kind
            assert tuple(lora.delta_shape) == tuple(u.delta_shape)
            if u.kind == "conv":
                assert lora.A.shape == (lora.rank, *u.delta_shape[1:]) and lora.B.shape == (u.rows, lora.rank, 1, 1)
            err = np.linalg.norm(lora.delta().reshape(d.shape) - d)
            optimum = np.sqrt(np.sum(s[k:] ** 2))
            assert abs(err - optimum) <= 1e-5 * np.linalg.norm(s), (what, k, err, optimum)
    # Converted, it writes as kohya LoRA and reads back the same.
    _, u = lycoris_updates(saved)[0]
    adapter = lorafuse.Adapter(updates={u.name: u.to_lora(2)}, format="kohya")
    back = load_kohya(save_kohya(adapter, tmp_path / "lora.safetensors"))
    np.testing.assert_array_equal(back[u.name].delta(), adapter[u.name].delta())


def test_with_factors_and_with_shape(saved):
    u = lorafuse.load(saved["loha"][2])["lycoris_conv"]
    assert u.delta_shape == (24, 288) and u.kind == "linear"
    conv = u.with_shape((24, 32, 3, 3))
    assert conv.kind == "conv" and conv.delta_shape == (24, 32, 3, 3)
    np.testing.assert_array_equal(conv.delta().reshape(24, -1), u.delta())
    b, a = conv.stored_factors()
    lora = conv.with_factors(b, a, 0.5)
    assert lora.A.shape == (u.rank, 32, 3, 3) and lora.B.shape == (24, u.rank, 1, 1) and lora.scale == 0.5
    with pytest.raises(ShapeMismatchError, match=r"a loha update of shape \(24, 288\) cannot be laid onto a "
                                                 r"weight of shape \(24, 16, 3, 3\)"):
        u.with_shape((24, 16, 3, 3))


# ----------------------------------------------------------------------------- DoRA


def dora_reference(w: np.ndarray, u, multiplier_rows: bool) -> np.ndarray:
    """W' = m / ||W + dW|| * (W + dW), the norm per output row (or per column), in float64."""
    v = w.reshape(w.shape[0], -1) + u.delta().reshape(w.shape[0], -1)
    m = u.magnitude.f32().astype(np.float64)
    if multiplier_rows:
        return (m[:, None] / np.linalg.norm(v, axis=1, keepdims=True) * v).reshape(w.shape)
    return (m[None, :] / np.linalg.norm(v, axis=0, keepdims=True) * v).reshape(w.shape)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("wd_on_output", [True, False])
def test_dora_matches_lycoris_merge(tmp_path, algo, wd_on_output):
    # alpha = rank for LoHa / LoKr: LyCORIS's merge_to applies their scale twice (see above).
    alpha = 1.0 if algo == "locon" else 2.0
    model, net = network(algo, seed=11, linear_dim=2, linear_alpha=alpha, conv_dim=2, conv_alpha=alpha,
                         dora_wd=True, wd_on_output=wd_on_output)
    if not wd_on_output:  # per-input-channel norms of a conv: refused
        path = save(net, tmp_path / "conv.safetensors")
        with pytest.raises(UnsupportedError) as e:
            lorafuse.load(path)
        assert str(e.value) == (f"{path}: module 'lycoris_conv': dora_scale (1, 32, 1, 1) normalizes each input "
                                "channel of a convolution (LyCORIS wd_on_out=False); lorafuse supports DoRA per "
                                "output channel only there")
        with torch.no_grad():  # keep the Linear modules only
            net.loras = [lora for lora in net.loras if lora.module_type == "linear"]
            for name in ("lycoris_conv", "lycoris_point"):
                delattr(net, name)
    adapter = lorafuse.load(save(net, tmp_path / "dora.safetensors"))
    before = {name: lora.org_module[0].weight.detach().double().numpy().copy() for name, lora in
              modules(net).items()}
    with torch.no_grad():
        net.merge_to(1.0)
    for name, lora in modules(net).items():
        u = adapter[name]
        assert u.magnitude is not None and not u.is_plain() and u.magnitude_on_columns is (not wd_on_output)
        assert u.magnitude.shape == ((u.delta_shape[0],) if wd_on_output else (u.delta_shape[1],))
        merged = lora.org_module[0].weight.detach().double().numpy()
        ref = dora_reference(before[name], u, wd_on_output)
        # LyCORIS: float32, and float32 eps added to each norm (lorafuse: the norm alone).
        np.testing.assert_allclose(ref, merged, rtol=0, atol=1e-5 * np.abs(merged).max(), err_msg=name)


def test_dora_round_trips_through_kohya(tmp_path):
    _, net = network("locon", seed=12, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0, dora_wd=True,
                     wd_on_output=True)
    src = save(net, tmp_path / "in.safetensors")
    out = lorafuse.load(src).save(tmp_path / "out.safetensors")
    with safe_open(str(src), "np") as a, safe_open(str(out), "np") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert a.get_tensor(k).shape == b.get_tensor(k).shape
            np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)


LYCORIS_ALGOS = [c for c in CONFIGS if CONFIGS[c]["algo"] != "locon"]


@pytest.mark.parametrize("config", LYCORIS_ALGOS)
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_loha_lokr_files_are_written_back(tmp_path, config, dtype):
    """A LoHa / LoKr file read and saved is the same file (every tensor, alpha dtypes and values included)."""
    _, net = network(seed=21, dtype=dtype, **CONFIGS[config])  # type: ignore[arg-type]
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(CONFIGS[config]["linear_dim"]),
            "ss_network_alpha": str(CONFIGS[config]["linear_alpha"]),
            "ss_network_args": f'{{"algo": "{CONFIGS[config]["algo"]}"}}'}
    src = save(net, tmp_path / "in.safetensors", dtype, metadata=meta)
    out = lorafuse.load(src).save(tmp_path / "out.safetensors")
    with safe_open(str(src), "pt") as a, safe_open(str(out), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert a.get_tensor(k).dtype == b.get_tensor(k).dtype, k
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
        assert {k: v for k, v in b.metadata().items() if k in meta} == meta


@pytest.mark.parametrize("config", LYCORIS_ALGOS)
@pytest.mark.parametrize("c", [0.5, -0.3, 0.0])
def test_scaled_loha_lokr_are_saved_as_lycoris(tmp_path, config, c):
    """c * (a LoHa / LoKr adapter) is written as LoHa / LoKr (alpha carries the scale; a LoKr of two full halves,
    whose scale LyCORIS fixes at 1, and scale 0, which alpha cannot say, get it in their first piece), and
    LyCORIS's own loader reads c times each delta of the original network."""
    _, net = network(seed=22, **CONFIGS[config])  # type: ignore[arg-type]
    adapter = lorafuse.load(save(net, tmp_path / "in.safetensors"))
    out = (c * adapter).save(tmp_path / "scaled.safetensors")
    back = lorafuse.load(out)
    loras = modules(net)
    for name, lora in loras.items():
        assert type(back[name]) is type(adapter[name]), name
        assert_close_f32(back[name].delta(), c * lycoris_delta(lora), abs(c) * lycoris_bound(lora), terms(lora),
                         f"{config} {name} x {c}")
    if config == "lokr_tucker":  # LyCORIS's loader cannot read its own Tucker LoKr files (lora_dim from w2_a)
        return
    torch.manual_seed(0)
    reread, _ = lycoris.create_lycoris_from_weights(1.0, str(out), Tiny())
    got = modules(reread)
    assert set(got) == set(loras)
    for name, lora in loras.items():
        assert_close_f32(lycoris_delta(got[name]), c * lycoris_delta(lora), abs(c) * lycoris_bound(lora),
                         terms(lora), f"LyCORIS reading {config} {name} x {c}")


# ----------------------------------------------------------------------------- other files


def test_kohya_prefix_and_a_mixed_file(tmp_path, monkeypatch):
    """lora_unet_ names (LyCORIS's kohya naming) and one file holding LoRA, LoHa and LoKr modules."""
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    monkeypatch.setattr(LycorisNetwork, "NAME_ALGO_MAP", {"fc": {"algo": "loha"}, "conv": {"algo": "lokr"}})
    _, net = network("locon", seed=13, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0)
    adapter = lorafuse.load(save(net, tmp_path / "mixed.safetensors"))
    kinds = {n: getattr(u, "algo", "lora") for n, u in adapter.updates.items()}
    assert kinds == {"lora_unet_fc": "loha", "lora_unet_conv": "lokr", "lora_unet_wide": "lora",
                     "lora_unet_point": "lora"}
    for name, lora in modules(net).items():
        assert_close_f32(adapter[name].delta(), lycoris_delta(lora), lycoris_bound(lora), terms(lora), name)
    # written back as the same mixed file
    back = lorafuse.load(adapter.save(tmp_path / "out.safetensors"))
    assert {n: getattr(u, "algo", "lora") for n, u in back.updates.items()} == kinds
    for name, lora in modules(net).items():
        assert_close_f32(back[name].delta(), lycoris_delta(lora), lycoris_bound(lora), terms(lora), name)


def test_lycoris_dylora_reads_as_lora(tmp_path):
    """LyCORIS's DyLoRA saves lora_up.weight (out, r) (also for a conv), lora_down.weight (r, in[, kh, kw])
    and alpha, and nothing else: a LoRA with scale alpha / r (sd-scripts' networks/dylora.py saves the
    same three tensors, lora_up in the kohya layout)."""
    _, net = network("dylora", seed=14, linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0, block_size=2)
    path = save(net, tmp_path / "dylora.safetensors")
    with safe_open(str(path), "np") as f:
        t = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
    assert {k.split(".", 1)[1] for k in t} == {"lora_up.weight", "lora_down.weight", "alpha"}
    assert t["lycoris_conv.lora_up.weight"].shape == (24, 4) and t["lycoris_conv.lora_down.weight"].shape == \
        (4, 32, 3, 3)
    adapter = lorafuse.load(path)
    for name in modules(net):
        u = adapter[name]
        up, down = t[f"{name}.lora_up.weight"], t[f"{name}.lora_down.weight"]
        ref = (0.5 * up.reshape(up.shape[0], 4) @ down.reshape(4, -1)).reshape(up.shape[0], *down.shape[1:])
        assert isinstance(u, LoraUpdate) and u.scale == 0.5 and u.rank == 4
        np.testing.assert_allclose(u.delta(), ref, rtol=1e-12, atol=1e-14)
    assert adapter["lycoris_conv"].B.shape == (24, 4, 1, 1) and adapter["lycoris_conv"].kind == "conv"


@pytest.mark.parametrize(("algo", "kwargs", "parts", "label"), [
    ("full", {}, "diff", "full (diff)"),
    ("ia3", {}, "on_input, weight", "IA3"),
    ("diag-oft", {"constraint": 1e-4}, "oft_blocks", "OFT / BOFT"),
    ("boft", {"constraint": 1e-4}, "oft_blocks", "OFT / BOFT"),
    ("glora", {}, "a1.weight, a2.weight, b1.weight, b2.weight", "GLoRA"),
])
def test_other_lycoris_algorithms_are_refused(tmp_path, algo, kwargs, parts, label):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.Conv2d(8, 16, 3, bias=False))  # sizes BOFT can split
    net = create_lycoris(model, 1.0, algo=algo, linear_dim=4, linear_alpha=1.0, **kwargs)
    net.apply_to()
    path = save(net, tmp_path / f"{algo}.safetensors")
    assert lorafuse.detect_format(path) == "kohya"
    with pytest.raises(UnsupportedError) as e:
        lorafuse.load(path)
    module = str(e.value).split("module '", 1)[1].split("'", 1)[0]
    assert str(e.value) == (f"{path}: module {module!r} is a LyCORIS {label} module ({parts}); lorafuse reads "
                            "LoRA / LoCon, LoHa, LoKr, DoRA and DyLoRA modules only")


# ----------------------------------------------------------------------------- alpha


def test_alpha_zero_means_alpha_equals_rank(tmp_path):
    """kohya's networks/lora.py and LyCORIS: alpha == 0 (like a missing alpha) is alpha = r, scale 1."""
    g = torch.Generator().manual_seed(15)
    m = "lora_unet_block_proj"
    files = {
        "lora": {f"{m}.lora_down.weight": torch.randn(4, 10, generator=g),
                 f"{m}.lora_up.weight": torch.randn(6, 4, generator=g)},
        "loha": {f"{m}.hada_w1_a": torch.randn(6, 2, generator=g), f"{m}.hada_w1_b": torch.randn(2, 10, generator=g),
                 f"{m}.hada_w2_a": torch.randn(6, 2, generator=g), f"{m}.hada_w2_b": torch.randn(2, 10, generator=g)},
        "lokr": {f"{m}.lokr_w1": torch.randn(2, 2, generator=g), f"{m}.lokr_w2_a": torch.randn(3, 2, generator=g),
                 f"{m}.lokr_w2_b": torch.randn(2, 5, generator=g)},
    }
    for kind, tensors in files.items():
        deltas = []
        for alpha in (None, 0.0, -0.0, 1.0):
            t = dict(tensors) if alpha is None else {**tensors, f"{m}.alpha": torch.tensor(alpha)}
            path = tmp_path / f"{kind}_{alpha}.safetensors"
            save_file(t, str(path))
            u = lorafuse.load(path)[m]
            rank = 4 if kind == "lora" else 2
            assert u.scale == (1.0 if not alpha else alpha / rank), (kind, alpha)
            deltas.append(u.delta() / u.scale)
        assert all(np.array_equal(d, deltas[0]) for d in deltas[1:])


def test_alpha_keeps_its_dtype_and_absence_through_a_round_trip(tmp_path):
    """LyCORIS saves alpha in the save dtype (here F16); lorafuse writes it back so, and leaves out the
    .alpha of a module that had none while its scale is 1; a changed scale gets one."""
    _, net = network("locon", seed=16, dtype="F16", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0)
    path = save(net, tmp_path / "in.safetensors", "F16")
    with safe_open(str(path), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert t["lycoris_fc.alpha"].dtype == torch.float16
    del t["lycoris_point.alpha"]
    t["lycoris_wide.alpha"] = torch.tensor(1.0, dtype=torch.bfloat16)
    src = tmp_path / "edited.safetensors"
    save_file(t, str(src))
    adapter = lorafuse.load(src)
    assert adapter.state.alpha_dtypes == {"lycoris_fc": "F16", "lycoris_wide": "BF16",
                                                    "lycoris_conv": "F16", "lycoris_point": None}
    out = adapter.save(tmp_path / "out.safetensors")
    assert data_buffer(out) == data_buffer(src)
    with safe_open(str(out), "pt") as f:
        back = {k: f.get_tensor(k) for k in f.keys()}
    assert set(back) == set(t) and all(back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]) for k in t)
    # Scaled: alpha 0.3 * 2 does not fit F16 exactly (F32 then); the module without alpha now needs one.
    scaled = lorafuse.Adapter(updates={n: dataclasses.replace(u, scale=u.scale * 0.3)
                                       for n, u in adapter.updates.items()},
                              config=adapter.config, format="kohya")
    with safe_open(str(save_kohya(scaled, tmp_path / "scaled.safetensors")), "pt") as f:
        alphas = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".alpha")}
    assert {k: v.dtype for k, v in alphas.items()} == {f"lycoris_{n}.alpha": torch.float32 for n in
                                                       ("fc", "wide", "conv", "point")}
    assert float(alphas["lycoris_point.alpha"]) == pytest.approx(0.6, rel=1e-7)


# ----------------------------------------------------------------------------- malformed modules


M = "lora_unet_mid_block_proj"


def check_error(tmp_path: Path, tensors: dict[str, torch.Tensor], error: type, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(error) as e:
        lorafuse.load(path)
    assert str(e.value) == f"{path}: module {M!r}{message}"


def z(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.ones(shape, dtype=dtype)


LOHA = {"hada_w1_a": z(6, 2), "hada_w1_b": z(2, 10), "hada_w2_a": z(6, 2), "hada_w2_b": z(2, 10)}
LOHA_LIST = "hada_w1_a (6, 2), hada_w1_b (2, 10), hada_w2_a (6, 2), hada_w2_b (2, 10)"


@pytest.mark.parametrize(("parts", "error", "message"), [
    ({k: v for k, v in LOHA.items() if k != "hada_w2_b"}, FormatError,
     ": a LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b; hada_w2_b missing "
     "(has hada_w1_a (6, 2), hada_w1_b (2, 10), hada_w2_a (6, 2))"),
    ({**LOHA, "hada_w2_a": z(6, 3), "hada_w2_b": z(3, 10)}, ShapeMismatchError,
     ": LoHa tensors do not fit together (hada_w1_a (6, 2), hada_w1_b (2, 10), hada_w2_a (6, 3), hada_w2_b (3, 10)):"
     " the halves have ranks 2 and 3"),
    ({**LOHA, "hada_w1_b": z(3, 10)}, ShapeMismatchError,
     ": LoHa tensors do not fit together (hada_w1_a (6, 2), hada_w1_b (3, 10), hada_w2_a (6, 2), hada_w2_b (2, 10)):"
     " hada_w1_a has 2 columns but hada_w1_b 3 rows (the rank must match and be > 0)"),
    ({**LOHA, "hada_w2_b": z(2, 12)}, ShapeMismatchError,
     ": LoHa tensors do not fit together (hada_w1_a (6, 2), hada_w1_b (2, 10), hada_w2_a (6, 2), hada_w2_b (2, 12)):"
     " the halves have different shapes"),
    ({**LOHA, "hada_t1": z(2, 2, 3, 3)}, FormatError,
     f": a Tucker LoHa needs both hada_t1 and hada_t2; only {LOHA_LIST}, hada_t1 (2, 2, 3, 3)"),
    ({"hada_w1_a": z(2, 6), "hada_w1_b": z(2, 4), "hada_w2_a": z(2, 6), "hada_w2_b": z(2, 4),
      "hada_t1": z(2, 2, 3, 3), "hada_t2": z(3, 2, 3, 3)}, ShapeMismatchError,
     ": LoHa tensors do not fit together (hada_w1_a (2, 6), hada_w1_b (2, 4), hada_w2_a (2, 6), hada_w2_b (2, 4), "
     "hada_t1 (2, 2, 3, 3), hada_t2 (3, 2, 3, 3)): hada_t2 (3, 2, 3, 3) does not fit hada_w2_a (2, 6) and "
     "hada_w2_b (2, 4)"),
    ({**LOHA, "hada_w1_a": z(6, 2, dtype=torch.int32)}, FormatError, ": hada_w1_a has non-float dtype I32"),
    ({"lokr_w1": z(2, 2), "lokr_w1_a": z(2, 1), "lokr_w1_b": z(1, 2), "lokr_w2": z(3, 5)}, FormatError,
     ": a LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b (has lokr_w1 (2, 2), lokr_w1_a (2, 1), "
     "lokr_w1_b (1, 2), lokr_w2 (3, 5))"),
    ({"lokr_w1": z(2, 2), "lokr_w2_a": z(3, 2)}, FormatError,
     ": a LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b (has lokr_w1 (2, 2), lokr_w2_a (3, 2))"),
    ({"lokr_w1": z(2, 2), "lokr_w2": z(3, 5), "lokr_t2": z(2, 2, 3, 3)}, FormatError,
     ": lokr_t2 (a Tucker core) needs lokr_w2_a and lokr_w2_b, not lokr_w2 (has lokr_w1 (2, 2), lokr_w2 (3, 5), "
     "lokr_t2 (2, 2, 3, 3))"),
    ({"lokr_w1_a": z(6, 2), "lokr_w1_b": z(2, 8), "lokr_w2_a": z(8, 3), "lokr_w2_b": z(3, 8)}, ShapeMismatchError,
     ": LoKr tensors do not fit together (lokr_w1_a (6, 2), lokr_w1_b (2, 8), lokr_w2_a (8, 3), lokr_w2_b (3, 8)): "
     "the factored halves have ranks 2 and 3"),
    ({"lokr_w1": z(2, 2), "lokr_w2_a": z(3, 2), "lokr_w2_b": z(3, 5)}, ShapeMismatchError,
     ": LoKr tensors do not fit together (lokr_w1 (2, 2), lokr_w2_a (3, 2), lokr_w2_b (3, 5)): lokr_w2_a must be "
     "(c, r) and lokr_w2_b (r, d) or (r, d, kh, kw) with one r > 0"),
    ({"lokr_w1": z(4, 4), "lokr_w2_a": z(2, 6), "lokr_w2_b": z(2, 8), "lokr_t2": z(2, 3, 3, 3)}, ShapeMismatchError,
     ": LoKr tensors do not fit together (lokr_w1 (4, 4), lokr_w2_a (2, 6), lokr_w2_b (2, 8), lokr_t2 (2, 3, 3, 3)): "
     "lokr_t2 must be (r, r, kh, kw) with lokr_w2_a (r, c) and lokr_w2_b (r, d)"),
    ({"lokr_w1": z(2, 2, 1), "lokr_w2": z(3, 5)}, ShapeMismatchError,
     ": LoKr tensors do not fit together (lokr_w1 (2, 2, 1), lokr_w2 (3, 5)): lokr_w1 must be a non-empty (a, b) "
     "matrix"),
    # The kron of w1 (2 x 2) and w2 (3 x 5) is 6 x 10, but the DoRA magnitude says 8 output rows.
    ({"lokr_w1": z(2, 2), "lokr_w2": z(3, 5), "dora_scale": z(8, 1)}, ShapeMismatchError,
     ": dora_scale (8, 1) fits neither the output rows ((6, 1) or (6, 1, 1, 1)) nor the input columns ((1, 10)) "
     "of an update of shape (6, 10)"),
])
def test_malformed_lycoris_modules(tmp_path, parts, error, message):
    check_error(tmp_path, {f"{M}.{k}": v for k, v in parts.items()}, error, message)


def test_malformed_tucker_locon(tmp_path):
    check_error(tmp_path, {f"{M}.lora_down.weight": z(2, 4, 1, 1), f"{M}.lora_up.weight": z(6, 2, 1, 1),
                           f"{M}.lora_mid.weight": z(2, 3, 3, 3)}, ShapeMismatchError,
                ": lora_mid (2, 3, 3, 3) does not fit lora_down (2, 4, 1, 1) and lora_up (6, 2, 1, 1) (a Tucker "
                "LoCon has lora_down (r, in, 1, 1), lora_mid (r, r, kh, kw), lora_up (out, r, 1, 1))")
    check_error(tmp_path, {f"{M}.lora_mid.weight": z(2, 2, 3, 3), f"{M}.lora_up.weight": z(6, 2, 1, 1)},
                FormatError, " has no lora_down.weight (only lora_up.weight (6, 2, 1, 1), lora_mid.weight "
                             "(2, 2, 3, 3))")


def test_huge_or_empty_deltas_are_refused(tmp_path):
    check_error(tmp_path, {f"{M}.lokr_w1": z(300, 300), f"{M}.lokr_w2": z(300, 300)}, ShapeMismatchError,
                ": a delta of shape (90000, 90000) (8100000000 elements) is larger than any real module "
                "(at most 4294967296 elements)")
    # 2^32 elements, whose exact factorization of rank 2^16 would need 2^33: it is read (its norm comes from
    # the halves: 256 * 256), and what needs the factorization is refused before allocating it.
    path = tmp_path / "big.safetensors"
    save_file({f"{M}.lokr_w1": z(256, 256, dtype=torch.float16), f"{M}.lokr_w2": z(256, 256)}, str(path))
    big = lorafuse.load(path)
    assert big.norms() == {M: 65536.0}
    with pytest.raises(UnsupportedError) as e:
        big[M].stored_factors()
    assert str(e.value).startswith(f"{path}: module {M!r}: the exact factorization of this lokr (rank 65536) needs "
                                   "a dense 65536 x 131072 array (8,589,934,592 elements), more than the 268,435,456")
    check_error(tmp_path, {**{f"{M}.{k}": v for k, v in LOHA.items()}, f"{M}.hada_w1_a": z(0, 2),
                           f"{M}.hada_w2_a": z(0, 2)}, ShapeMismatchError,
                ": the loha delta has shape (0, 10), with an empty dimension")

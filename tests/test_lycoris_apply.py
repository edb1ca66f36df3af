"""LyCORIS files through the operations: `apply` (the C++ LoHa / LoKr stages, streaming) against the
`lycoris` package's own merge, `combine` of LoRA + LoHa / LoKr against the numpy float64 Eckart-Young
optimum of the summed dense deltas, and `resize` / `combine` writing kohya LoRA files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris_fixtures import CONFIGS, lycoris_delta, modules, network, save
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file

import lorafuse
import lorafuse.ops.apply as apply_mod
from lorafuse.model import LycorisUpdate
from lorafuse.ops.rank import RankRule
from lorafuse.ops.resize import resize

# Tiny's generic ('lycoris_') LoHa / LoKr modules written as 2-D LoRA factors: a note says a convolution's kernel is
# unknown (test_redteam_round4_interop.py checks it)
KERNEL_NOTE = "ignore:.*written as 2-D LoRA factors:lorafuse.errors.AdapterNote"


def _base(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("chunked", [False, True])
def test_apply_equals_the_weight_lycoris_computes(config: str, chunked: bool, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """W' = W + delta with LyCORIS's own delta (its forward pass); `chunked` merges every weight in
    row blocks of a few rows (LoKr stages then start mid-way through a Kronecker block)."""
    if chunked:
        monkeypatch.setattr(apply_mod, "CHUNK_BYTES", 256)
    model, net = network(seed=3, **CONFIGS[config])  # type: ignore[arg-type]
    lora_path = save(net, tmp_path / "lycoris.safetensors")
    base = _base(model, tmp_path / "base.safetensors")
    report = lorafuse.apply(base, [lora_path], weights=[0.5], out=tmp_path / "out.safetensors", progress=False)
    got = load_np(str(tmp_path / "out.safetensors"))
    state = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    assert sorted(report.merged) == sorted(f"{n.removeprefix('lycoris_')}.weight" for n in modules(net))
    for name, lora in modules(net).items():
        key = name.removeprefix("lycoris_") + ".weight"
        want = state[key] + 0.5 * lycoris_delta(lora).reshape(state[key].shape)
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_apply_equals_lycoris_merge_to(algo: str, tmp_path: Path) -> None:
    """LyCORIS's merge_to on the model itself. With alpha = r the scale is 1, so its merge (which applies
    LoHa / LoKr scales twice) and its forward pass agree, and both are the reference."""
    model, net = network(algo, seed=7, linear_dim=2, linear_alpha=2.0, conv_dim=2, conv_alpha=2.0)
    lora_path = save(net, tmp_path / "lycoris.safetensors")
    base = _base(model, tmp_path / "base.safetensors", torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # the base the merge starts from: the bf16 weights
            p.copy_(p.to(torch.bfloat16).float())
        net.merge_to(1.0)
    lorafuse.apply(base, [lora_path], out=tmp_path / "out.safetensors", dtype="fp32", progress=False)
    got = load_np(str(tmp_path / "out.safetensors"))
    for key, ref in model.state_dict().items():
        ref = ref.detach().numpy()
        np.testing.assert_allclose(got[key], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=key)


def _optimum(d: np.ndarray, k: int) -> float:
    s = np.linalg.svd(d, compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2)))


@pytest.mark.filterwarnings(KERNEL_NOTE)
@pytest.mark.parametrize("config", ["loha", "loha_tucker", "lokr", "lokr_full_w2"])
def test_combine_lora_and_lycoris_is_the_eckart_young_optimum(config: str, tmp_path: Path) -> None:
    model, net = network(seed=5, **CONFIGS[config])  # type: ignore[arg-type]
    lyc = lorafuse.load(save(net, tmp_path / "lycoris.safetensors"))
    _, net2 = network("locon", seed=6, linear_dim=3, linear_alpha=2.0, conv_dim=2, conv_alpha=1.0)
    lora = lorafuse.load(save(net2, tmp_path / "lora.safetensors"))
    assert any(isinstance(u, LycorisUpdate) for u in lyc.updates.values())
    k = 3
    mix = lorafuse.combine([lora, lyc], weights=[1.0, -0.7], method="svd", rank=k, conv_rank=2, exact=True)
    for name in lyc.updates:
        u1, u2 = lora[name], lyc[name]
        rows = u1.delta_shape[0]
        dense = u1.delta().reshape(rows, -1) - 0.7 * u2.delta().reshape(rows, -1)
        kk = 2 if len(u1.delta_shape) == 4 and u1.delta_shape[2] * u1.delta_shape[3] > 1 else k
        out = mix[name]
        assert out.rank == kk and tuple(out.delta_shape) == tuple(u1.delta_shape)
        err = np.linalg.norm(out.delta().reshape(rows, -1) - dense)
        assert err == pytest.approx(_optimum(dense, kk), rel=1e-5, abs=1e-6 * np.linalg.norm(dense)), name


CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"  # a UNet 3x3 convolution: its kernel is known by name


@pytest.mark.filterwarnings(KERNEL_NOTE)
def test_combine_writes_a_kohya_lora(tmp_path: Path) -> None:
    """LoHa convolutions without Tucker cores store the kernel flattened; a UNet layer gets it back from
    its name, and the combined LoRA has LoCon factors (k, in, 3, 3) with the conv rank."""
    model, net = network("loha", seed=8, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0)
    save(net, tmp_path / "tiny.safetensors")
    tensors = {k.replace("lycoris_conv", CONV1): torch.from_numpy(v)
               for k, v in load_np(str(tmp_path / "tiny.safetensors")).items()}
    src = tmp_path / "loha.safetensors"
    save_file(tensors, str(src), {"ss_network_module": "lycoris.kohya", "ss_network_dim": "2",
                                  "ss_network_alpha": "1.0", "ss_network_args": '{"algo": "loha", "conv_dim": "2"}'})
    loha = lorafuse.load(src)
    assert loha[CONV1].delta_shape == (24, 32, 3, 3) and loha["lycoris_fc"].delta_shape == (6, 10)
    mix = lorafuse.combine([src, src], method="svd", rank=4, conv_rank=3)
    mix.save(tmp_path / "out.safetensors", format="kohya")
    back = lorafuse.load(tmp_path / "out.safetensors")
    for name, u in back.updates.items():
        assert not isinstance(u, LycorisUpdate) and u.rank == (3 if name == CONV1 else 4)
        ref = 2 * loha[name].delta().reshape(u.delta_shape[0], -1)
        err = np.linalg.norm(u.delta().reshape(ref.shape) - ref)
        assert err == pytest.approx(_optimum(ref, u.rank), rel=1e-4, abs=1e-5 * np.linalg.norm(ref))
    meta = back.state.metadata  # now a plain LoRA file, and its metadata says so
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"  # type: ignore[index]
    # the LyCORIS algorithm gone, and conv_dim the new conv rank (as svd_merge_lora.py's --new_conv_rank writes it)
    assert meta["ss_network_args"] == '{"conv_dim": "3"}'  # type: ignore[index]
    out = load_np(str(tmp_path / "out.safetensors"))
    assert out[CONV1 + ".lora_down.weight"].shape == (3, 32, 3, 3)
    assert out[CONV1 + ".lora_up.weight"].shape == (24, 3, 1, 1)


@pytest.mark.filterwarnings(KERNEL_NOTE)
def test_resize_of_a_loha_file_writes_lora_with_updated_metadata(tmp_path: Path) -> None:
    model, net = network("loha", seed=9, linear_dim=3, linear_alpha=1.5, conv_dim=3, conv_alpha=1.5)
    src = save(net, tmp_path / "loha.safetensors", metadata={"ss_network_module": "lycoris.kohya",
                                                            "ss_network_dim": "3", "ss_network_alpha": "1.5",
                                                            "ss_training_comment": "kept"})
    small, report = resize(src, RankRule(rank=2), progress=False)
    small.save(tmp_path / "small.safetensors", format="kohya")
    back = lorafuse.load(tmp_path / "small.safetensors")
    meta = back.state.metadata
    assert meta["ss_training_comment"] == "kept" and meta["ss_network_dim"] == "2"  # type: ignore[index]
    loha = lorafuse.load(src)
    for r in report:
        u, ref = back[r.name], loha[r.name].delta()
        ref2 = ref.reshape(ref.shape[0], -1)
        assert u.rank == 2
        err = np.linalg.norm(u.delta().reshape(ref2.shape) - ref2)
        assert err == pytest.approx(_optimum(ref2, 2), rel=1e-4, abs=1e-6 * np.linalg.norm(ref2))
        assert r.fro_kept == pytest.approx(np.sqrt(1 - (err / np.linalg.norm(ref2)) ** 2), rel=1e-4)


def test_cli_combine_kohya_files_into_a_kohya_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorafuse.cli import main

    _, net = network("locon", seed=12, linear_dim=3, linear_alpha=3.0, conv_dim=2, conv_alpha=1.0)
    a = save(net, tmp_path / "a.safetensors", metadata={"ss_network_module": "networks.lora"})
    _, net2 = network("lokr", seed=13, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0)
    b = save(net2, tmp_path / "b.safetensors")
    assert main(["combine", str(a), str(b), "--weights", "1,0.5", "--rank", "2", "--conv-rank", "1",
                 "-o", str(tmp_path / "mix.safetensors")]) == 0
    assert "combined 2 adapters" in capsys.readouterr().out
    mix, la, lb = (lorafuse.load(p) for p in (tmp_path / "mix.safetensors", a, b))
    assert mix.format == "kohya"
    for name, u in mix.updates.items():
        k = 1 if name == "lycoris_conv" else 2
        rows = u.delta_shape[0]
        ref = la[name].delta().reshape(rows, -1) + 0.5 * lb[name].delta().reshape(rows, -1)
        assert u.rank == k
        err = np.linalg.norm(u.delta().reshape(ref.shape) - ref)
        assert err == pytest.approx(_optimum(ref, k), rel=1e-4, abs=1e-5 * np.linalg.norm(ref))
    # LyCORIS's flat names (lycoris_conv) in a PEFT folder: PEFT would find no such module (red-team round 3)
    assert main(["combine", str(a), str(b), "--format", "peft", "--rank", "2", "-q", "-o", str(tmp_path / "peft")]) == 2
    assert "a PEFT adapter folder cannot hold" in capsys.readouterr().err and not (tmp_path / "peft").exists()


def test_cli_apply_skip_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorafuse.cli import main

    model, net = network("loha", seed=14, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0)
    lora = save(net, tmp_path / "loha.safetensors")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("point")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "base.safetensors"))
    out = tmp_path / "out.safetensors"
    assert main(["apply", str(tmp_path / "base.safetensors"), str(lora), "-o", str(out), "--no-progress"]) == 1
    assert "'lycoris_point'" in capsys.readouterr().err and not out.exists()
    assert main(["apply", str(tmp_path / "base.safetensors"), str(lora), "-o", str(out), "--no-progress",
                 "--skip-missing"]) == 0
    err = capsys.readouterr().err
    assert "skipped (no target)" in err and "'lycoris_point'" in err
    got = load_np(str(out))
    for name, lora_mod in modules(net).items():
        key = name.removeprefix("lycoris_") + ".weight"
        if key in got:
            want = state[key].double().numpy() + lycoris_delta(lora_mod).reshape(got[key].shape)
            np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_info_describes_a_lycoris_file(tmp_path: Path) -> None:
    _, net = network("lokr", seed=15, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0)
    path = save(net, tmp_path / "lokr.safetensors")
    d = lorafuse.describe(path)
    adapter = lorafuse.load(path)
    assert d["format"] == "kohya" and d["modules"] == len(adapter) == 4
    assert d["lora_alpha"] is None and d["lora_alphas"] == []  # LoHa / LoKr have no LoRA alpha
    assert d["parameters"] == sum(p.numel() for lora in net.loras for p in lora.parameters())
    for m in d["module_details"]:  # type: ignore[union-attr]
        assert m["kind"].startswith("lokr (")
        assert m["delta_norm"] == pytest.approx(np.linalg.norm(adapter[m["name"]].delta()), rel=1e-5)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("wd_on_output", [True, False])
def test_apply_dora_equals_lycoris_merge_to(algo: str, wd_on_output: bool, tmp_path: Path) -> None:
    """DoRA (dora_scale) through apply: LyCORIS's merge_to on the model is the reference (alpha = r, where
    its merge and forward agree; it adds float32 eps to each norm, lorafuse does not)."""
    model, net = network(algo, seed=16, linear_dim=2, linear_alpha=2.0, conv_dim=2, conv_alpha=2.0,
                         dora_wd=True, wd_on_output=wd_on_output)
    if not wd_on_output:  # LyCORIS's per-input-channel conv norms are refused: keep the Linear modules
        with torch.no_grad():
            net.loras = [lora for lora in net.loras if lora.module_type == "linear"]
            for name in ("lycoris_conv", "lycoris_point"):
                delattr(net, name)
    lora_path = save(net, tmp_path / "dora.safetensors")
    base = _base(model, tmp_path / "base.safetensors")
    with torch.no_grad():
        net.merge_to(1.0)
    report = lorafuse.apply(base, [lora_path], out=tmp_path / "out.safetensors", progress=False)
    assert len(report.merged) == len(net.loras)
    got = load_np(str(tmp_path / "out.safetensors"))
    for key, ref in model.state_dict().items():
        ref = ref.detach().numpy()
        np.testing.assert_allclose(got[key], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=key)


@pytest.mark.filterwarnings(KERNEL_NOTE)
def test_derived_adapters_never_overwrite_their_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """resize, combine and arithmetic results remember the files they were computed from: saving over
    one is refused (before, `lorafuse resize X -o X` replaced its own input)."""
    from lorafuse.cli import main
    from lorafuse.errors import OutputError

    _, net = network("locon", seed=17, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0)
    a = save(net, tmp_path / "a.safetensors")
    _, net2 = network("loha", seed=18, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0)
    b = save(net2, tmp_path / "b.safetensors")
    before = {p: p.read_bytes() for p in (a, b)}
    assert main(["resize", str(a), "-o", str(a), "--rank", "1"]) == 1
    assert "would overwrite the input" in capsys.readouterr().err
    assert main(["combine", str(a), str(b), "--rank", "2", "-o", str(b)]) == 1
    assert "would overwrite the input" in capsys.readouterr().err
    small, _ = resize(a, RankRule(rank=1), progress=False)
    derived = [small, lorafuse.combine([a, b], rank=2), lorafuse.load(a) * 0.5, small.to_rank(1)]
    for adapter, target in zip(derived, (a, b, a, a)):
        with pytest.raises(OutputError, match="would overwrite the input"):
            adapter.save(target, format="kohya")
    assert {p: p.read_bytes() for p in (a, b)} == before
    small.save(tmp_path / "small.safetensors", format="kohya")  # elsewhere is fine
    assert lorafuse.load(tmp_path / "small.safetensors")["lycoris_fc"].rank == 1

"""Third red-team round: each test is a finding that was wrong before, checked against an independent
reference (numpy float64, the real packages, the file system)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import llm_base as _base
from redteam_fixtures import peft_folder as _peft
from safetensors.numpy import save_file

from lorafuse.cli import main

H, R = 16, 2
PREFIX = "base_model.model."
LLM = {"model.layers.0.self_attn.q_proj": (H, H), "model.layers.0.mlp.up_proj": (2 * H, H)}


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv", [["-o", "{a}", "-o", "{b}"], ["--out={a}", "-o", "{b}"],
                                  ["-o", "{a}", "--rank", "1", "--rank", "2"]])
def test_a_single_valued_option_given_twice_is_refused(tmp_path: Path, argv: list[str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`-o a -o b` wrote b alone (argparse keeps the last); the user may have meant a. Refused, exit 2,
    nothing written."""
    ad = _peft(tmp_path / "ad", LLM, 1)
    a, b = tmp_path / "a", tmp_path / "b"
    words = [w.format(a=a, b=b) for w in argv]
    if "--rank" not in words:
        words += ["--rank", "1"]
    with pytest.raises(SystemExit) as e:
        main(["resize", str(ad), *words])
    assert e.value.code == 2
    assert "given twice" in capsys.readouterr().err
    assert not a.exists() and not b.exists()


def test_the_same_value_twice_is_taken(tmp_path: Path) -> None:
    """A repeated option with the same value is harmless (a shell alias plus the same flag typed again)."""
    ad = _peft(tmp_path / "ad", LLM, 1)
    out = tmp_path / "r1"
    assert main(["resize", str(ad), "-o", str(out), "-o", str(out), "--rank", "1", "-q"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- recipes


def test_a_recipe_key_yaml_reads_as_a_number_is_reported_at_its_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`7: 3` in a model's parameters was reported at the parameters' line (the validator's path holds the
    number 7, the line table the key's text '7')."""
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n"
                      "  - model: b\n    parameters:\n      weight: 0.5\n      7: 3\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "r.yml line 9: in models[1].parameters, the key '7' is read by YAML as an integer" in err, err


def test_a_full_disk_in_an_intermediate_stage_says_what_the_temporary_folder_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An intermediate stage's write error named `.lorafuse-run-PID-XXXX/pooled`, a folder the user never
    asked for; the message now says it is the run's temporary folder beside -o."""
    import errno
    import os

    import lorafuse.io.safetensors as st_mod

    ad = _peft(tmp_path / "ad", LLM, 1)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"name: pooled\nmerge_method: linear\nmodels:\n  - model: {ad}\n---\nname: small\n"
                      "merge_method: resize\nmodels:\n  - model: pooled\nparameters:\n  rank: 1\n")

    def full(self: object, view: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(st_mod.SafetensorsWriter, "_write_all", full)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "stage 'pooled'" in err and "temporary folder beside" in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lorafuse-run-")]


# ----------------------------------------------------------------------------- the Python API, as a careless caller


def _users_folder(p: Path) -> Path:
    p.mkdir()
    (p / "thesis.txt").write_text("years of work")
    return p


@pytest.mark.parametrize("value", ["no", 1, "False"])
def test_overwrite_that_is_not_a_bool_is_refused_by_every_writer(tmp_path: Path, value: object) -> None:
    """overwrite='no' counted as True in extract, convert, run and combine_to: a user's folder was replaced."""
    import lorafuse
    from lorafuse.errors import LorafuseValueError
    from lorafuse.ops.combine import CombineOptions, combine_to

    ad = _peft(tmp_path / "ad", LLM, 1)
    base = _base(tmp_path / "base", LLM)
    ft = _base(tmp_path / "ft", LLM)
    calls = {
        "extract": lambda o: lorafuse.extract(str(base), str(ft), o, rank=1, overwrite=value),
        "run": lambda o: lorafuse.run({"merge_method": "linear", "models": [{"model": str(ad)}]}, o,
                                      overwrite=value),
        "combine_to": lambda o: combine_to([ad], None, CombineOptions(method="linear"), o, overwrite=value),
        "save": lambda o: lorafuse.load(ad).save(o, overwrite=value),
        "apply": lambda o: lorafuse.apply(str(base), [ad], out=o, overwrite=value),
    }
    for name, call in calls.items():
        users = _users_folder(tmp_path / f"users_{name}")
        with pytest.raises(LorafuseValueError, match="overwrite must be True or False"):
            call(str(users))
        assert (users / "thesis.txt").read_text() == "years of work", name
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"my precious bytes")
    with pytest.raises(LorafuseValueError, match="overwrite must be True or False"):
        lorafuse.convert(str(ad), str(mine), to="kohya", overwrite=value)
    assert mine.read_bytes() == b"my precious bytes"


def test_a_mapping_of_adapters_to_weights_is_refused(tmp_path: Path) -> None:
    """{path: weight} was iterated by its keys: the weights were silently dropped (apply merged at 1.0)."""
    import lorafuse
    from lorafuse.errors import LorafuseValueError

    ad = _peft(tmp_path / "ad", LLM, 1)
    base = _base(tmp_path / "base", LLM)
    for call in (lambda: lorafuse.apply(str(base), {str(ad): 0.25}, out=str(tmp_path / "m")),
                 lambda: lorafuse.combine({str(ad): 0.25}),
                 lambda: lorafuse.similarity({str(ad): 1})):
        with pytest.raises(LorafuseValueError, match="not a dict"):
            call()
    assert not (tmp_path / "m").exists()


def test_a_scaled_adapter_states_its_own_rank_and_alpha(tmp_path: Path) -> None:
    """0.25 * a kept a's config (r 2, alpha 2): from_state_dict(x.state_dict(), x.config) gave a delta 4x too
    large, and -a lost its sign. Checked against the float64 delta of the factors."""
    import lorafuse
    from lorafuse import Adapter

    a = lorafuse.load(_peft(tmp_path / "ad", LLM, 1, rank=2, alpha=4))
    name = next(iter(LLM))
    f = a.state_dict()
    want = (f[f"{PREFIX}{name}.lora_B.weight"].astype(np.float64) @ f[f"{PREFIX}{name}.lora_A.weight"]) * 2.0
    for c in (0.25, -1.0, 3.0):
        x = c * a
        y = Adapter.from_state_dict(x.state_dict(), x.config)
        np.testing.assert_allclose(y.updates[name].delta(), c * want, rtol=1e-5, atol=1e-6)
    r1 = lorafuse.resize(a, rank=1).adapter
    assert r1.config["r"] == 1 and {u.rank for u in r1.updates.values()} == {1}


def test_a_file_truncated_after_load_is_not_read_as_zeros(tmp_path: Path) -> None:
    """state_dict() / delta() of an adapter whose file was truncated after load returned zeros (the mapping's
    missing pages); they raise InputChangedError, as the writers do."""
    import os

    import lorafuse
    from lorafuse.errors import InputChangedError

    ad = _peft(tmp_path / "ad", LLM, 1)
    a = lorafuse.load(ad)
    name = next(iter(LLM))
    f = ad / "adapter_model.safetensors"
    os.truncate(f, 200)
    with pytest.raises(InputChangedError):
        a.state_dict()
    with pytest.raises(InputChangedError):
        a.updates[name].delta()


@pytest.mark.parametrize("kw", [{"threads": -1}, {"threads": 1.5}, {"threads": True}, {"device": "tpu"},
                                {"device": 0}, {"dry_run": "no"}, {"quiet": 0}])
def test_run_refuses_bad_arguments_with_a_lorafuse_error(tmp_path: Path, kw: dict[str, object]) -> None:
    """lorafuse.run(threads=-1) or device='tpu' raised SystemExit(2) (argparse's usage on stderr): a caller
    catching Exception was killed."""
    import lorafuse
    from lorafuse.errors import LorafuseValueError

    ad = _peft(tmp_path / "ad", LLM, 1)
    with pytest.raises(LorafuseValueError):
        lorafuse.run({"merge_method": "linear", "models": [{"model": str(ad)}]}, str(tmp_path / "o"), **kw)
    assert not (tmp_path / "o").exists()


def test_wrong_typed_arguments_raise_lorafuse_errors(tmp_path: Path) -> None:
    """Each raised a raw AttributeError / TypeError from deep inside (pathlib, re, dict)."""
    import lorafuse
    from lorafuse import Adapter
    from lorafuse.errors import LorafuseValueError
    from lorafuse.ops.combine import CombineOptions, combine_to

    ad = _peft(tmp_path / "ad", LLM, 1)
    base = _base(tmp_path / "base", LLM)
    ft = _base(tmp_path / "ft", LLM)
    a = lorafuse.load(ad)
    sd = a.state_dict()
    calls = [
        lambda: Adapter.from_state_dict(None),  # type: ignore[arg-type]
        lambda: Adapter.from_state_dict(list(sd.items())),  # type: ignore[arg-type]
        lambda: Adapter.from_state_dict({1: next(iter(sd.values()))}),  # type: ignore[dict-item]
        lambda: Adapter.from_state_dict(sd, "cfg"),
        lambda: combine_to([ad], None, None, str(tmp_path / "c")),  # type: ignore[arg-type]
        lambda: lorafuse.apply(str(base), [ad], out=123),  # type: ignore[arg-type]
        lambda: lorafuse.extract(None, str(ft), rank=1),  # type: ignore[arg-type]
        lambda: lorafuse.extract(str(base), str(ft), rank=1, include=["q_proj"]),  # type: ignore[arg-type]
        lambda: lorafuse.convert(str(ad), None, to="kohya"),  # type: ignore[arg-type]
        lambda: a.save(None),  # type: ignore[arg-type]
        lambda: combine_to([ad], None, CombineOptions(), None),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(LorafuseValueError):
            call()
    assert lorafuse.load(str(ad).encode()).updates.keys() == a.updates.keys()  # a bytes path is a path


def test_resize_progress_that_is_not_a_switch_is_refused(tmp_path: Path) -> None:
    import lorafuse
    from lorafuse.errors import LorafuseValueError

    with pytest.raises(LorafuseValueError, match="progress must be True, False or None"):
        lorafuse.resize(str(_peft(tmp_path / "ad", LLM, 1)), rank=1, progress="no")  # type: ignore[arg-type]


def test_similarity_of_adapters_sharing_no_module_warns(tmp_path: Path) -> None:
    """A 0 that measures nothing was returned silently in Python (the CLI said so in a note)."""
    import lorafuse

    a = _peft(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (H, H)}, 1)
    b = _peft(tmp_path / "b", {"model.layers.0.mlp.up_proj": (2 * H, H)}, 2)
    with pytest.warns(UserWarning, match="share no module"):
        cos = lorafuse.similarity([str(a), str(b)])
    np.testing.assert_allclose(cos, [[1.0, 0.0], [0.0, 1.0]], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- diffusion conversions


def test_an_sd1_loha_on_proj_in_becomes_1x1_conv_factors_diffusers_loads(tmp_path: Path) -> None:
    """An SD 1.x LoHa stores the 1x1-conv proj_in flattened (2-D); convert wrote 2-D LoRA factors, which
    diffusers refused to load (size mismatch). The UNet's cross-attention size (768: SD 1.x) tells the kernel
    back. Checked by diffusers' own load + fuse against the LoHa's float64 delta."""
    import warnings

    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_torch

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16, 16, 16),
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=8,
                                in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=768, attention_head_dim=2)
    g = torch.Generator().manual_seed(0)
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    t: dict[str, torch.Tensor] = {}
    for n, (o, i) in {proj: (8, 8), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (8, 768)
                      }.items():
        t |= {n + ".hada_w1_a": torch.randn(o, 2, generator=g), n + ".hada_w1_b": torch.randn(2, i, generator=g),
              n + ".hada_w2_a": torch.randn(o, 2, generator=g), n + ".hada_w2_b": torch.randn(2, i, generator=g),
              n + ".alpha": torch.tensor(2.0)}
    save_torch(t, str(tmp_path / "loha.safetensors"))
    out = tmp_path / "k.safetensors"
    assert main(["convert", str(tmp_path / "loha.safetensors"), "--to", "kohya", "--rank", "4", "-o", str(out),
                 "-q"]) == 0
    shapes = {k: tuple(v.shape) for k, v in load_file(str(out)).items()}
    assert shapes[f"{proj}.lora_down.weight"] == (4, 8, 1, 1) and shapes[f"{proj}.lora_up.weight"] == (8, 4, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd, alphas = StableDiffusionPipeline.lora_state_dict(str(out))
        unet.load_lora_adapter({k: v for k, v in sd.items() if k.startswith("unet.")}, network_alphas=alphas,
                               prefix="unet", adapter_name="x")
    layer = unet.down_blocks[0].attentions[0].proj_in
    w0 = layer.base_layer.weight.detach().clone()
    unet.fuse_lora()
    got = (layer.weight.detach() - w0).double().reshape(8, 8).numpy()
    d = {k: v.double().numpy() for k, v in t.items() if k.startswith(proj)}
    want = (d[f"{proj}.hada_w1_a"] @ d[f"{proj}.hada_w1_b"]) * (d[f"{proj}.hada_w2_a"] @ d[f"{proj}.hada_w2_b"])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


# ----------------------------------------------------------------------------- hostile files and arguments


def test_a_gguf_array_longer_than_its_file_is_refused_at_once(tmp_path: Path) -> None:
    """A 68-byte GGUF declaring an array of 2^62 uint8 elements made gguf's reader allocate without bound
    (info, and the ownership check of an existing -o X.gguf)."""
    import struct
    import subprocess
    import sys

    key = b"x.u8"
    bad = tmp_path / "huge.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                    + struct.pack("<I", 9) + struct.pack("<IQ", 0, 2**62) + b"\0" * 16)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "from lorafuse.cli import main; sys.exit(main(['info', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "header is damaged" in done.stderr, done.stderr[-500:]
    from lorafuse.io.manifest import file_is_ours, gguf_bounded

    assert gguf_bounded(bad) is not None and not file_is_ours(bad)


def test_info_of_a_fifo_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "lorafuse", "info", str(fifo)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "FIFO" in done.stderr, done.stderr


def test_a_nul_in_a_recipe_path_is_a_recipe_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text('merge_method: linear\nmodels:\n - model: "a\\0b"\n')
    assert main(["run", str(recipe), "-o", str(tmp_path / "o")]) == 2
    assert "line 3, models[0].model: a path cannot hold a NUL character" in capsys.readouterr().err


def test_release_flags_on_memory_that_is_not_a_file_mapping_are_ignored() -> None:
    """release=True on ordinary arrays made the core MADV_DONTNEED the caller's memory: it read back zeros."""
    from lorafuse.backends import FactorListJob, get_backend

    rng = np.random.default_rng(0)
    b = rng.standard_normal((256, 16)).astype(np.float32)
    a = rng.standard_normal((16, 8192)).astype(np.float32)
    a.flags.writeable = False
    keep_a, keep_b = a.copy(), b.copy()
    res = get_backend("cpu").factored_svd_lists([FactorListJob("m", [(b, a)], [1.0])], [4], release=[[True]])
    np.testing.assert_array_equal(a, keep_a)
    np.testing.assert_array_equal(b, keep_b)
    s = np.linalg.svd(keep_b.astype(np.float64) @ keep_a, compute_uv=False)[:4]
    np.testing.assert_allclose(res[0].s[:4], s, rtol=1e-4)


def test_merge_output_partly_overlapping_an_input_is_refused() -> None:
    from lorafuse.backends import LowRankStage, MergeJob, get_backend
    from lorafuse.errors import LorafuseValueError

    buf = np.random.default_rng(1).standard_normal((65, 32)).astype(np.float32)
    w, out = buf[:64], buf[1:]
    b, a = np.ones((64, 2), np.float32), np.full((2, 32), 0.5, np.float32)
    with pytest.raises(LorafuseValueError, match="overlaps w"):
        get_backend("cpu").merge_batch([MergeJob("m", w, "F32", out, "F32", [LowRankStage(b, a)])])
    w2 = buf[:64].copy()
    want = w2.astype(np.float64) + b.astype(np.float64) @ a
    get_backend("cpu").merge_batch([MergeJob("m", w2, "F32", w2, "F32", [LowRankStage(b, a)])])  # in place: fine
    np.testing.assert_allclose(w2, want, rtol=1e-6)


def test_a_module_of_no_rows_or_columns_is_refused_by_resize(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """lora_A (4, 0): resize wrote an adapter with r=0 that lorafuse and PEFT refuse to load (apply still merges
    it as nothing: test_messages.py)."""
    folder = tmp_path / "zw"
    folder.mkdir()
    p = f"{PREFIX}model.layers.0.self_attn.q_proj."
    save_file({p + "lora_A.weight": np.zeros((4, 0), np.float32), p + "lora_B.weight": np.ones((64, 4), np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj"]}))
    assert main(["resize", str(folder), "--rank", "1", "-o", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "UnsupportedError" in err and str(folder) in err and "no rows or no columns" in err
    assert not (tmp_path / "r").exists()


def test_numbers_beyond_float_range_and_dataless_tensors_are_lorafuse_errors(tmp_path: Path) -> None:

    import lorafuse
    from lorafuse import Adapter
    from lorafuse.errors import LorafuseValueError

    ad = _peft(tmp_path / "ad", LLM, 1)
    a = lorafuse.load(ad)
    sd = a.state_dict("torch")
    for call in (lambda: a * 10**400, lambda: lorafuse.combine([ad, ad], [10**400, 1]),
                 lambda: lorafuse.resize(str(ad), sv_fro=10**400),
                 lambda: Adapter.from_state_dict({k: v.to("meta") for k, v in sd.items()}),
                 lambda: Adapter.from_state_dict({k: v.to_sparse() for k, v in sd.items()})):
        with pytest.raises(LorafuseValueError):
            call()


# ----------------------------------------------------------------------------- what a result may overwrite


def _tiny_llm(tmp_path: Path) -> tuple[Path, Path]:
    shapes = {"model.layers.0.self_attn.q_proj": (H, H), "model.layers.0.mlp.up_proj": (2 * H, H)}
    base = _base(tmp_path / "base", shapes)
    rng = np.random.default_rng(5)
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({f"{m}.weight": (rng.standard_normal(s) * 0.1).astype(np.float32)
               + np.asarray(__import__("safetensors.numpy", fromlist=["load_file"]).load_file(
                   str(base / "model.safetensors"))[f"{m}.weight"]) for m, s in shapes.items()},
              str(ft / "model.safetensors"))
    (ft / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return base, ft


def test_an_extracted_adapter_never_replaces_its_checkpoints(tmp_path: Path) -> None:
    """extract(...).adapter had no sources: saving it to the fine-tuned folder replaced that checkpoint."""
    import lorafuse
    from lorafuse.errors import OutputError

    base, ft = _tiny_llm(tmp_path)
    res = lorafuse.extract(str(base), str(ft), rank=2)
    assert {p.resolve() for p in res.adapter.sources()} == {base.resolve(), ft.resolve()}
    before = (ft / "model.safetensors").read_bytes()
    for target in (ft, base):
        with pytest.raises(OutputError, match="would overwrite the input"):
            res.adapter.save(str(target), overwrite=True)
    assert (ft / "model.safetensors").read_bytes() == before


def test_apply_of_an_in_memory_result_never_replaces_the_files_it_came_from(tmp_path: Path) -> None:
    """apply(base, [combine([x, y])], out=x) replaced the adapter folder x (a lorafuse output) with a merge."""
    import lorafuse
    from lorafuse.errors import OutputError

    x = tmp_path / "x"
    assert main(["resize", str(_peft(tmp_path / "ad", LLM, 1)), "--rank", "1", "-o", str(x), "-q"]) == 0
    y = _peft(tmp_path / "y", LLM, 2, rank=1, alpha=1)
    base = _base(tmp_path / "base", LLM)
    kept = (x / "adapter_model.safetensors").read_bytes()
    for adapter in (lorafuse.combine([str(x), str(y)]), 0.5 * lorafuse.load(str(x))):
        with pytest.raises(OutputError, match="would overwrite the input"):
            lorafuse.apply(str(base), [adapter], out=str(x))
    assert (x / "adapter_model.safetensors").read_bytes() == kept


def _bind(src: Path, dst: Path) -> bool:
    import subprocess

    return subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode == 0


def test_overwrite_never_deletes_through_a_mount_inside_the_output(tmp_path: Path) -> None:
    """An input bind-mounted inside the output folder: --overwrite emptied the input (rmtree went through the
    mount). Needs mount (root); skipped where it cannot be done."""
    import subprocess

    ad = _peft(tmp_path / "ad", LLM, 1)
    out = tmp_path / "out"
    (out / "mnt").mkdir(parents=True)
    if not _bind(ad, out / "mnt"):
        pytest.skip("mount --bind is not allowed here (needs root)")
    try:
        assert main(["combine", str(ad), str(ad), "-o", str(out), "--overwrite", "-q"]) == 1
        assert sorted(p.name for p in ad.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    finally:
        subprocess.run(["umount", str(out / "mnt")], check=False)


def test_an_input_named_through_a_bind_mount_of_a_folder_inside_the_output_is_refused(tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "out"
    ad = _peft(out / "ad", LLM, 1)  # the input lives inside the output folder ...
    alias = tmp_path / "alias"
    alias.mkdir()
    if not _bind(ad, alias):  # ... and is named through a bind mount elsewhere
        pytest.skip("mount --bind is not allowed here (needs root)")
    try:
        assert main(["combine", str(alias), "-o", str(out), "--overwrite", "-q"]) == 1
        assert (ad / "adapter_model.safetensors").is_file()
    finally:
        subprocess.run(["umount", str(alias)], check=False)


def test_a_gguf_cut_short_by_a_file_size_limit_is_not_committed(tmp_path: Path) -> None:
    """numpy's tofile lost ENOSPC / EFBIG: convert --to gguf reported success for a truncated file and replaced a
    good earlier output with it."""
    import resource
    import subprocess
    import sys

    pytest.importorskip("gguf")
    ad = _peft(tmp_path / "ad", {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.up_proj": (128, 64)},
               1, rank=4, alpha=4)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": 32}))
    out = tmp_path / "o.gguf"
    assert main(["convert", str(ad), "--to", "gguf", "--base-config", str(tmp_path / "config.json"), "-o",
                 str(out), "-q"]) == 0
    good = out.read_bytes()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) // 2, len(good) // 2))

    done = subprocess.run([sys.executable, "-m", "lorafuse", "convert", str(ad), "--to", "gguf", "--base-config",
                           str(tmp_path / "config.json"), "-o", str(out), "--overwrite"], capture_output=True,
                          text=True, preexec_fn=limit, timeout=120)
    assert done.returncode == 1 and "OutputError" in done.stderr, done.stderr[-400:]
    assert out.read_bytes() == good


def test_a_pdf_plot_on_a_full_disk_is_an_output_error(tmp_path: Path) -> None:
    """matplotlib's PDF backend turned ENOSPC / EFBIG into an AttributeError: a raw traceback."""
    import resource
    import subprocess
    import sys

    ad1, ad2 = _peft(tmp_path / "a1", LLM, 1), _peft(tmp_path / "a2", LLM, 2)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    done = subprocess.run([sys.executable, "-m", "lorafuse", "similarity", str(ad1), str(ad2), "--plot",
                           str(tmp_path / "sim.pdf")], capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert done.returncode == 1 and "OutputError" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "sim.pdf").exists()


def test_a_signal_during_the_commit_waits_for_it_and_the_message_says_what_was_written(tmp_path: Path) -> None:
    """SIGTERM between moving the old output aside and renaming the new one in left no output at all (without
    renameat2's exchange), and after a commit the CLI said 'no output was written'."""
    import os
    import signal

    from lorafuse.cli import _stopped_note
    from lorafuse.io import atomic

    got: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with atomic._signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []  # held while the output is put in place
        assert got == [signal.SIGTERM]  # and handled right after
    finally:
        signal.signal(signal.SIGTERM, before)
    n = len(atomic.COMMITTED)
    assert _stopped_note(n) == "; no output was written"
    assert main(["resize", str(_peft(tmp_path / "ad", LLM, 1)), "--rank", "1", "-o", str(tmp_path / "o"), "-q"]) == 0
    assert _stopped_note(n) == f" after {tmp_path / 'o'} was written"


def test_weight_files_in_an_output_folder_follow_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o002)
    try:
        assert main(["resize", str(_peft(tmp_path / "ad", LLM, 1)), "--rank", "1", "-o", str(tmp_path / "o"),
                     "-q"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o" / "adapter_model.safetensors").stat().st_mode) == 0o664


def test_a_read_only_previous_output_leaves_no_hidden_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod -R a-w on an earlier output: it was replaced, but its whole copy stayed behind as .out.tmp-*
    (rmtree failed silently). Root ignores the permissions, so the refusal an ordinary user gets is played by
    os.unlink / os.rmdir refusing in a folder without its owner's write permission."""
    import os
    import stat
    import subprocess

    from lorafuse.io import atomic

    old = tmp_path / ".out.tmp-1-abcdefgh"
    (old / "sub").mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"x" * 100)
    (old / "sub" / "f").write_bytes(b"y")
    subprocess.run(["chmod", "-R", "a-w", str(old)], check=True)
    real_unlink, real_rmdir = os.unlink, os.rmdir

    def as_user(real):  # type: ignore[no-untyped-def]
        def call(path, *args, dir_fd=None, **kw):  # type: ignore[no-untyped-def]
            parent = os.path.dirname(os.path.join("/proc/self/fd", str(dir_fd), path) if dir_fd is not None
                                     else os.fspath(path))
            if not os.stat(parent).st_mode & stat.S_IWUSR:
                raise PermissionError(13, "Permission denied", path)
            return real(path, *args, dir_fd=dir_fd, **kw)
        return call

    monkeypatch.setattr(os, "unlink", as_user(real_unlink))
    monkeypatch.setattr(os, "rmdir", as_user(real_rmdir))
    atomic.remove_entry(old)
    assert not old.exists()


def test_requantize_on_a_base_that_is_not_quantized_says_so(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    base = _base(tmp_path / "base", LLM)
    ad = _peft(tmp_path / "ad", LLM, 1)
    assert main(["apply", str(base), str(ad), "-o", str(tmp_path / "m"), "--requantize"]) == 0
    shown = capsys.readouterr()
    assert "requantize has no effect: the base is not quantized" in shown.out + shown.err


def test_a_diffusers_lora_with_alpha_tensors_is_read_as_diffusers_reads_it(tmp_path: Path) -> None:
    """TheLastBen-style Flux LoRAs: diffusers-named factors with `<module>.alpha` scalars, which diffusers' loader
    takes as the module's alpha (scale alpha / r). lorafuse refused the file ('not a diffusers LoRA tensor')."""
    import lorafuse
    from lorafuse.errors import FormatError

    rng = np.random.default_rng(3)
    mods = {"transformer.transformer_blocks.0.attn.to_q": (32, 32, 2.0), "transformer.proj_out": (16, 32, 8.0)}
    t: dict[str, np.ndarray] = {}
    for m, (o, i, alpha) in mods.items():
        t[f"{m}.lora_A.weight"] = rng.standard_normal((4, i)).astype(np.float32)
        t[f"{m}.lora_B.weight"] = rng.standard_normal((o, 4)).astype(np.float32)
        t[f"{m}.alpha"] = np.array(alpha, dtype=np.float32)
    f = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(t, str(f))
    a = lorafuse.load(str(f))
    for m, (_, _, alpha) in mods.items():
        want = t[f"{m}.lora_B.weight"].astype(np.float64) @ t[f"{m}.lora_A.weight"] * alpha / 4
        np.testing.assert_allclose(a.updates[m].delta(), want, rtol=1e-6)
    del t["transformer.proj_out.lora_A.weight"], t["transformer.proj_out.lora_B.weight"]
    save_file(t, str(f))
    with pytest.raises(FormatError, match="alpha of a module that has no lora_A"):
        lorafuse.load(str(f))


def test_kohya_modules_are_not_written_into_a_peft_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """combine --format peft of kohya files wrote a PEFT folder with flat kohya names that neither PEFT nor
    lorafuse apply could use (exit 0)."""
    rng = np.random.default_rng(0)
    files = []
    for seed in (1, 2):
        n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        f = tmp_path / f"k{seed}.safetensors"
        save_file({f"{n}.lora_down.weight": rng.standard_normal((2, 8)).astype(np.float32),
                   f"{n}.lora_up.weight": rng.standard_normal((8, 2)).astype(np.float32),
                   f"{n}.alpha": np.array(2.0, np.float32)}, str(f))
        files.append(str(f))
    assert main(["combine", *files, "--format", "peft", "--rank", "2", "-o", str(tmp_path / "o")]) == 2
    assert "is a kohya name" in (err := capsys.readouterr().err) and "a PEFT adapter folder cannot hold" in err
    assert not (tmp_path / "o").exists()


def test_kohya_rank_metadata_says_dynamic_for_mixed_ranks_and_conv_args_follow(tmp_path: Path) -> None:
    """After a combine that leaves modules of different ranks, ss_network_dim named one of them; and a resize
    kept ss_network_args' conv_dim / conv_alpha of the input (sd-scripts writes "Dynamic", and the new conv
    rank)."""
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
            "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "4"})}

    def kohya(path: Path, mods: dict[str, tuple[int, ...]]) -> str:
        t = {}
        for n, shape in mods.items():
            r = 4
            t[f"{n}.lora_down.weight"] = rng.standard_normal((r, *shape[1:])).astype(np.float32)
            t[f"{n}.lora_up.weight"] = rng.standard_normal((shape[0], r, *([1, 1] if len(shape) == 4 else []))
                                                           ).astype(np.float32)
            t[f"{n}.alpha"] = np.array(4.0, np.float32)
        save_file(t, str(path), metadata=meta)
        return str(path)

    a = kohya(tmp_path / "a.safetensors", {q: (16, 16), k: (16, 16), conv: (16, 16, 3, 3)})
    b = kohya(tmp_path / "b.safetensors", {q: (16, 16)})
    out = tmp_path / "cat.safetensors"
    assert main(["combine", a, b, "--method", "cat", "-o", str(out), "-q"]) == 0
    got = safe_open(str(out), "np").metadata()
    assert got["ss_network_dim"] == "Dynamic" and got["ss_network_alpha"] == "Dynamic"  # q: rank 8, k: rank 4
    out2 = tmp_path / "r2.safetensors"
    assert main(["resize", a, "--rank", "2", "-o", str(out2), "-q"]) == 0
    got = safe_open(str(out2), "np").metadata()
    assert (got["ss_network_dim"], got["ss_network_alpha"]) == ("2", "2.0")  # scale 1 kept: alpha = 2
    assert json.loads(got["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}


def test_a_config_without_tie_word_embeddings_ties_as_transformers_does(tmp_path: Path) -> None:
    """transformers 4.x left tie_word_embeddings out of GPT-2's config.json (its default is true); lorafuse read
    it as false and merged an embedding LoRA into the weight lm_head no longer shared: logits 37.8 off PEFT's.
    Checked against the unmerged PEFT model's logits."""
    import torch
    import transformers as tf
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, tie_word_embeddings=True)
    model = tf.GPT2LMHeadModel(cfg).eval()
    base = tmp_path / "base"
    model.save_pretrained(base)
    c = json.loads((base / "config.json").read_text())
    c.pop("tie_word_embeddings", None)
    (base / "config.json").write_text(json.dumps(c))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["wte", "c_attn"],
                                                  fan_in_fan_out=True, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(tf.GPT2LMHeadModel(cfg).eval(), tmp_path / "lora")
        ref.load_state_dict(peft_model.state_dict())
        want = ref(input_ids=x).logits
    assert main(["apply", str(base), str(tmp_path / "lora"), "-o", str(tmp_path / "m"), "-q"]) == 0
    merged = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        got = merged(input_ids=x).logits
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))


def test_info_of_a_tucker_locon_counts_its_stored_tensors(tmp_path: Path) -> None:
    """info said 'F32: 1, F16: 1' and counted the contracted factor (1,408 parameters) for a file of three F16
    tensors (528 parameters)."""
    import lorafuse

    n = "lora_unet_down_blocks_0_resnets_0_conv1"
    rng = np.random.default_rng(0)
    t = {f"{n}.lora_down.weight": rng.standard_normal((4, 32, 1, 1)).astype(np.float16),
         f"{n}.lora_mid.weight": rng.standard_normal((4, 4, 3, 3)).astype(np.float16),
         f"{n}.lora_up.weight": rng.standard_normal((64, 4, 1, 1)).astype(np.float16),
         f"{n}.alpha": np.array(4.0, np.float16)}
    f = tmp_path / "tucker.safetensors"
    save_file(t, str(f))
    d = lorafuse.describe(str(f))
    assert d["parameters"] == sum(v.size for k, v in t.items() if not k.endswith(".alpha")) == 528
    assert d["dtypes"] == {"F16": 3}


@pytest.mark.parametrize(("option", "hint"), [("--ratios", "--weights"), ("--concat", "--method cat"),
                                              ("--new_conv_rank", "--conv-rank")])
def test_kohya_option_names_get_their_lorafuse_names(option: str, hint: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["combine", "a", "b", option, *(["1,2"] if option != "--concat" else []), "-o", "x"])
    assert e.value.code == 2 and hint in capsys.readouterr().err


def test_a_resize_of_factors_holding_nan_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ad = _peft(tmp_path / "ad", LLM, 1)
    from safetensors.numpy import load_file

    t = load_file(str(ad / "adapter_model.safetensors"))
    t[f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight"][0, 0] = np.nan
    save_file(t, str(ad / "adapter_model.safetensors"))
    assert main(["resize", str(ad), "--rank", "1", "-o", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "NonFiniteError" in err and str(ad) in err and "up_proj" in err


def test_a_single_file_base_without_config_says_its_embedding_merge_may_be_tied(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    base = tmp_path / "m.safetensors"
    save_file({"model.embed_tokens.weight": rng.standard_normal((32, H)).astype(np.float32),
               "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((H, H)).astype(np.float32)}, str(base))
    folder = tmp_path / "ad"
    folder.mkdir()
    p = f"{PREFIX}model.embed_tokens."
    save_file({p + "lora_embedding_A": rng.standard_normal((R, 32)).astype(np.float32),
               p + "lora_embedding_B": rng.standard_normal((H, R)).astype(np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": R,
                                                            "target_modules": ["embed_tokens"]}))
    assert main(["apply", str(base), str(folder), "-o", str(tmp_path / "o.safetensors")]) == 0
    shown = capsys.readouterr()
    assert "says whether lm_head is tied to it" in shown.out + shown.err


# ----------------------------------------------------------------------------- recipes as a mergekit user writes them


def test_recipe_requantize_false_is_passed_as_no_requantize(tmp_path: Path) -> None:
    """`requantize: false` was dropped (False looked like the default): an FP8 base stayed FP8 where the user asked
    for it dequantized. Now the stage runs `apply --no-requantize`, as lorafuse.apply(requantize=False) does."""
    import lorafuse
    from lorafuse.recipes.checks import check
    from lorafuse.recipes.runner import argv_of, load_recipe

    text = load_recipe({"merge_method": "apply", "base_model": "b", "models": [{"model": "a"}],
                        "parameters": {"requantize": False}})
    stage = check(text)[0]
    assert "--no-requantize" in argv_of(stage, text, tmp_path / "o", {})
    assert lorafuse.cli.build_parser().parse_args(["apply", "b", "a", "-o", "o", "--no-requantize"]).requantize \
        is False


@pytest.mark.parametrize(("params", "dtype", "field"), [({"max_shard_size": "1KB"}, None, "max_shard_size"),
                                                       ({"requantize": True}, "bf16", "requantize")])
def test_recipe_values_apply_refuses_are_refused_before_the_first_stage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, object], dtype: str | None,
        field: str) -> None:
    """A shard size below the minimum, or requantize with dtype, failed only when the apply stage ran, after the
    stages before it had done their work."""
    ad = _peft(tmp_path / "ad", LLM, 1)
    base = _base(tmp_path / "base", LLM)
    first = f"name: pooled\nmerge_method: linear\nmodels:\n  - model: {ad}\n---\n"
    second = (f"name: merged\nmerge_method: apply\nbase_model: {base}\nmodels:\n  - model: pooled\nparameters:\n"
              + "".join(f"  {k}: {v}\n" for k, v in params.items()) + (f"dtype: {dtype}\n" if dtype else ""))
    recipe = tmp_path / "r.yml"
    recipe.write_text(first + second)
    assert main(["run", str(recipe), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"parameters.{field}" in err and "stage 'pooled'" not in err  # refused before the first stage
    assert not (tmp_path / "o").exists()


def test_recipe_notes_a_base_model_resize_ignores_and_refuses_gradients(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    ad = _peft(tmp_path / "ad", LLM, 1)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: resize\nbase_model: {tmp_path}\nmodels:\n  - model: {ad}\nparameters:\n"
                      "  rank: 1\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "o")]) == 0
    assert "base_model is not read by resize" in capsys.readouterr().err  # a note: on stderr (round 9)
    recipe.write_text(f"merge_method: ties\nmodels:\n  - model: {ad}\n    parameters: {{weight: [0, 0.5, 1]}}\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "o2")]) == 2
    assert "per-layer gradient" in capsys.readouterr().err

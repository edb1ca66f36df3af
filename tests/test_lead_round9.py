"""The lead's tests of session 2026-12-07 (2): the streamed combine's chunks widened and folded one module per
thread while the next chunk is read (ops.combine.many._Folding), and the path checks that a thousand inputs made
slow (io.atomic's per-check stat memo, io.provenance.hub_blob_sha256's shortcut)."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lorafuse
from lorafuse.errors import InputChangedError, NonFiniteError, OutputError
from lorafuse.ops.combine import CombineOptions, combine_to, many

MODULES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 40)}


def _adapters(root: Path, n: int, ranks: tuple[int, ...] = (2, 3, 5), seed: int = 3) -> list[Path]:
    """n PEFT adapters of mixed ranks, float32 factors, lora_alpha = 2r (scale 2)."""
    g = np.random.default_rng(seed)
    paths = []
    for j in range(n):
        r = ranks[j % len(ranks)]
        p = root / f"a{j:03d}"
        p.mkdir(parents=True)
        save_file({f"base_model.model.{m}.lora_{x}.weight": g.standard_normal(s).astype(np.float32)
                   for m, (o, i) in MODULES.items() for x, s in (("A", (r, i)), ("B", (o, r)))},
                  str(p / "adapter_model.safetensors"))
        (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                           "target_modules": ["q_proj", "down_proj"]}))
        paths.append(p)
    return paths


def _range_reference(paths: list[Path], weights: list[float], x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """D X per module in float64, D = sum_i w_i s_i B_i A_i from the stored factors."""
    out: dict[str, np.ndarray] = {}
    for p, w in zip(paths, weights):
        for name, u in lorafuse.load(p).updates.items():
            out[name] = out.get(name, 0.0) + w * (u.delta().astype(np.float64) @ x[name])
    return out


def test_pass_folds_are_the_same_for_any_thread_count_and_chunk_size_and_match_numpy(tmp_path: Path) -> None:
    """A pass's accumulators (D [Omega Phi] in pass 1) do not depend on how many threads fold the modules nor on
    how many adapters a chunk holds (each module's sums keep their order: bit for bit), with Replays and with
    adapters loaded again; and they are D X of numpy float64 to float32 rounding."""
    paths = _adapters(tmp_path, 11)
    weights = list(np.random.default_rng(0).uniform(0.2, 1.5, len(paths)))
    sources, ws = many.gather(paths, weights)
    plan = many.check_sources(sources, ws, "svd")
    job = many.Sketching(plan, CombineOptions(rank=3, passes=2)).job
    runs = ((1, 4, plan.replays), (2, 4, plan.replays), (2, 1, plan.replays), (2, 3, None), (1, 64, plan.replays))
    got = []
    for workers, chunk, replays in runs:
        partial, nbytes = many.fold_sources(dataclasses.replace(job, chunk=chunk), 1, None, plan.sources,
                                            plan.weights, plan.fingerprints, replays=replays, workers=workers)
        assert nbytes == sum(t.nbytes for p in paths for t in _factors(p))
        got.append(partial)
    for name in MODULES:
        for a, b in zip(got[0][name], got[1][name]):
            np.testing.assert_array_equal(a, b)  # two threads or one: the same sums in the same order
    x32 = {name: many.first_operand(spec, job.widths[name], job.seed, False)[0].astype(np.float32)
           for name, spec in plan.modules.items()}
    want = _range_reference(paths, [float(w) for w in weights], {n: v.astype(np.float64) for n, v in x32.items()})
    for partial in got:
        for name in MODULES:
            np.testing.assert_allclose(partial[name][0], want[name], rtol=0, atol=2e-5 * np.abs(want[name]).max())


def _factors(p: Path) -> list[np.ndarray]:
    from safetensors.numpy import load_file

    return list(load_file(str(p / "adapter_model.safetensors")).values())


def _threads_settle(before: int) -> bool:
    for _ in range(100):
        if threading.active_count() <= before:
            return True
        threading.Event().wait(0.05)
    return False


def test_an_adapter_replaced_while_the_chunk_before_it_folds_is_refused_and_no_thread_is_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter of a later chunk replaced during pass 2 (its fingerprint changes) is refused naming its position
    while the previous chunk's modules are still being folded in the pool: the error waits for them (no thread
    may still read a chunk's buffers), nothing is written, and the fold threads are gone afterwards."""
    paths = _adapters(tmp_path / "ad", 9)
    real = many._SvdSketch.start

    def start(self: many._SvdSketch, pass_no: int) -> None:
        if pass_no == 2:
            f = paths[7] / "adapter_model.safetensors"
            data = f.read_bytes()
            f.unlink()
            f.write_bytes(data)  # the same bytes in a new file: another inode
        real(self, pass_no)

    monkeypatch.setattr(many._SvdSketch, "start", start)
    monkeypatch.setattr(many, "chunk_size", lambda plan, budget: 2)
    before = threading.active_count()
    out = tmp_path / "out"
    with pytest.raises(InputChangedError, match="adapter 8 .*changed since combine started"):
        combine_to(paths, None, CombineOptions(rank=3, passes=2, threads=2), out)
    assert not out.exists()
    assert _threads_settle(before)


def test_a_nan_in_a_later_chunk_names_its_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN in the factors of an adapter of the third chunk (chunks of 2, folded by 2 threads) is refused naming
    that adapter and the module, before anything is written."""
    paths = _adapters(tmp_path / "ad", 7)
    f = paths[5] / "adapter_model.safetensors"
    from safetensors.numpy import load_file

    t = load_file(str(f))
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    t[key][1, 3] = np.nan
    save_file(t, str(f))
    monkeypatch.setattr(many, "chunk_size", lambda plan, budget: 2)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"adapter 6 .*'model\.layers\.0\.mlp\.down_proj'.*NaN"):
        combine_to(paths, None, CombineOptions(rank=3, passes=2, threads=2), out)
    assert not out.exists()


def test_an_output_inside_one_of_many_inputs_is_still_refused(tmp_path: Path) -> None:
    """The per-check stat memo and the text test for 'inside' keep every refusal: an output inside the 200th of
    300 input folders, an output that holds them all, and an output named through a link to an input folder."""
    from lorafuse.io.atomic import check_output_path

    root = tmp_path / "inputs"
    folders = []
    for j in range(300):
        (root / f"a{j:03d}").mkdir(parents=True)
        folders.append(root / f"a{j:03d}")
    with pytest.raises(OutputError, match="inside the input folder"):
        check_output_path(folders[199] / "merged", folders)
    with pytest.raises(OutputError, match="would overwrite the input"):
        check_output_path(root, folders)
    os.symlink(folders[250], tmp_path / "link")
    with pytest.raises(OutputError):
        check_output_path(tmp_path / "link", folders)
    check_output_path(tmp_path / "elsewhere", folders)  # beside them: fine
    (tmp_path / "inputs2").mkdir()
    check_output_path(tmp_path / "inputs2", folders)  # a name that starts like an input folder's: fine


def test_hub_blob_sha256_still_reads_snapshot_links_and_skips_plain_files(tmp_path: Path) -> None:
    """A file of a Hugging Face snapshot (a link into blobs/<sha256>) gives its blob's name; a plain file gives None
    without resolving it; a file in a `blobs` folder named by 64 hex digits gives its name."""
    from lorafuse.io.provenance import hub_blob_sha256

    digest = "a" * 64
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / digest).write_bytes(b"x")
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    os.symlink(Path("..") / ".." / "blobs" / digest, snap / "adapter_model.safetensors")
    plain = tmp_path / "adapter_model.safetensors"
    plain.write_bytes(b"x")
    assert hub_blob_sha256(snap / "adapter_model.safetensors") == digest
    assert hub_blob_sha256(blobs / digest) == digest
    assert hub_blob_sha256(plain) is None
    os.symlink(snap, tmp_path / "snaplink")  # a link to the folder, the file itself no link
    assert hub_blob_sha256(tmp_path / "snaplink" / "adapter_model.safetensors") == digest


def test_ctrl_c_at_any_moment_of_the_console_scripts_start_is_one_line(tmp_path: Path) -> None:
    """SIGINT sent at 40 moments of the console script's start (Python's own start-up, lorafuse_entry's own import,
    its handlers being set, lorafuse's imports): never a traceback through lorafuse; where lorafuse said anything,
    it is its one line and status 130. (A Ctrl-C while lorafuse_entry itself was being imported, or while its
    handlers were being set, printed a traceback: the full suite hit it about once in a few runs.)"""
    import signal
    import subprocess
    import sys
    import time

    paths = _adapters(tmp_path, 1)
    stub = "import sys; from lorafuse_entry import main; sys.exit(main())"
    ours = 0
    for delay in np.linspace(0.012, 0.09, 40):
        p = subprocess.Popen([sys.executable, "-c", stub, "info", str(paths[0])], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        time.sleep(float(delay))
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        text = err.decode()
        assert "Traceback" not in text or "lorafuse" not in text, text
        if "lorafuse" in text:
            ours += 1
            assert p.returncode == 130 and text.strip().endswith("interrupted; no output was written"), text
    assert ours > 0  # some landed while lorafuse ran


def test_a_fold_thread_that_cannot_start_folds_in_the_callers_thread(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no thread can be started (a process or thread limit: ThreadPoolExecutor.submit raises RuntimeError),
    each module is folded in the caller's thread: the same result, bit for bit, not a traceback."""
    from concurrent.futures import ThreadPoolExecutor

    paths = _adapters(tmp_path / "ad", 6)
    want = lorafuse.combine(paths, rank=3, passes=2, threads=2)

    def refuse(self: ThreadPoolExecutor, *a: object, **k: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(ThreadPoolExecutor, "submit", refuse)
    got = lorafuse.combine(paths, rank=3, passes=2, threads=2)
    for name, u in want.updates.items():
        np.testing.assert_array_equal(got.updates[name].delta(), u.delta())


def test_fp8_requantization_without_threads_writes_the_same_bytes(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An FP8 base's merged rows are requantized in row pieces on threads; where no thread can be started
    (ThreadPoolExecutor.submit raises RuntimeError: a process or thread limit) the pieces are requantized one by
    one in this thread: the same bytes, not a traceback."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from safetensors.torch import save_file as save_torch

    rows, cols, block = 1024, 640, 128
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) * 0.05
    scale = w.reshape(rows // block, block, cols // block, block).abs().amax(dim=(1, 3)) / 448.0
    codes = (w / scale.repeat_interleave(block, 0).repeat_interleave(block, 1)).clamp(-448, 448)
    base = tmp_path / "base"
    base.mkdir()
    save_torch({"model.layers.0.mlp.up_proj.weight": codes.to(torch.float8_e4m3fn),
                "model.layers.0.mlp.up_proj.weight_scale_inv": scale}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16",
                                                  "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                          "activation_scheme": "dynamic",
                                                                          "weight_block_size": [block, block]}}))
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight":
               np.random.default_rng(1).standard_normal((4, cols)).astype(np.float32) * 0.1,
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight":
               np.random.default_rng(2).standard_normal((rows, 4)).astype(np.float32) * 0.1},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                        "target_modules": ["up_proj"]}))
    lorafuse.apply(base, [ad], out=tmp_path / "threads", progress=False, threads=2)

    def refuse(self: ThreadPoolExecutor, *a: object, **k: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(ThreadPoolExecutor, "submit", refuse)
    lorafuse.apply(base, [ad], out=tmp_path / "alone", progress=False, threads=2)
    assert (tmp_path / "alone/model.safetensors").read_bytes() == (tmp_path / "threads/model.safetensors").read_bytes()


def test_a_streamed_error_shows_the_adapters_path_once(tmp_path: Path) -> None:
    """A bad adapter file named by its path: 'adapter 2 (PATH): why', not 'adapter 2 (PATH): PATH: why'."""
    from lorafuse.errors import FormatError

    good = tmp_path / "good.safetensors"
    save_file({"lora_unet_x.lora_down.weight": np.ones((2, 4), np.float32),
               "lora_unet_x.lora_up.weight": np.ones((4, 2), np.float32)}, str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(FormatError) as e:
        lorafuse.combine([good, bad], rank=2, engine="stream")
    assert str(e.value).startswith(f"adapter 2 ({bad}): ") and str(e.value).count(str(bad)) == 1, e.value

"""Round 8 (lead): the streamed combine's `oversample` (the sketch's width beyond the rank) and its folds on one
BLAS thread per module.

Checked against numpy float64: the summed delta D of the adapters and its optimal rank-k error, from the
stored factors. `oversample` is what bounds 2 passes' error (no power iteration); a width that covers the
module's range is exact; the fold's threads do not change a bit of the result; BLAS's thread count is put back
after a combination; and the option is refused where it does nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from threadpoolctl import threadpool_info

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseValueError
from lorafuse.ops.combine import CombineOptions, CombineReport, combine_to
from lorafuse.ops.combine.many import read_list, sketch_width

PREFIX = "base_model.model.model.layers.0."
MODULES = {"self_attn.q_proj": (320, 256), "mlp.down_proj": (256, 384)}
NAME = "model.layers.0.self_attn.q_proj"
SPECTRUM = 0.85 ** np.arange(32)


def _adapters(root: Path, n: int = 30, r: int = 8, noise: float = 0.6) -> list[Path]:
    """n PEFT adapters of rank r: a shared part of decaying spectrum plus each one's noise (flat: what 2 passes
    with a narrow sketch approximate worst)."""
    g0 = np.random.default_rng(0)
    shared = {m: (np.linalg.qr(g0.standard_normal((o, 32)))[0] * np.sqrt(SPECTRUM),
                  (np.linalg.qr(g0.standard_normal((i, 32)))[0] * np.sqrt(SPECTRUM)).T)
              for m, (o, i) in MODULES.items()}
    g = np.random.default_rng(1)
    paths = []
    for j in range(n):
        p = root / f"a{j:03d}"
        p.mkdir(parents=True)
        tensors = {}
        for m, (o, i) in MODULES.items():
            u, v = shared[m]
            c = g.standard_normal((32, r)) / np.sqrt(r)
            tensors[f"{PREFIX}{m}.lora_B.weight"] = (u @ c + noise * g.standard_normal((o, r)) / np.sqrt(o)
                                                     ).astype(np.float32)
            tensors[f"{PREFIX}{m}.lora_A.weight"] = (c.T @ v + noise * g.standard_normal((r, i)) / np.sqrt(i)
                                                     ).astype(np.float32)
        save_file(tensors, str(p / "adapter_model.safetensors"))
        (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r,
                                                           "target_modules": ["q_proj", "down_proj"]}))
        paths.append(p)
    return paths


def _summed(paths: list[Path]) -> np.ndarray:
    d = np.zeros(MODULES["self_attn.q_proj"])
    for p in paths:
        u = lorafuse.load(p).updates[NAME]
        b, a = u.stored_factors()
        d += (u.scale / len(paths)) * (b.astype(np.float64) @ a.astype(np.float64))
    return d


def _error(out: Path, d: np.ndarray) -> float:
    return float(np.linalg.norm(d - lorafuse.load(out).updates[NAME].delta()))


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray, float]:
    paths = _adapters(tmp_path_factory.mktemp("many"))
    d = _summed(paths)
    s = np.linalg.svd(d, compute_uv=False)
    return paths, d, float(np.sqrt(np.sum(s[8:] ** 2)))


def _report(paths: list[Path], out: Path, **kw: object) -> CombineReport:
    weights = [1.0 / len(paths)] * len(paths)  # as a list file's default, and _summed's
    return combine_to(paths, weights, CombineOptions(rank=8, dtype="fp32", **kw), out)  # type: ignore[arg-type]


def _combine(paths: list[Path], out: Path, **kw: object) -> Path:
    _report(paths, out, **kw)
    return out


def test_oversample_brings_two_passes_to_the_optimum(many, tmp_path):
    paths, d, optimum = many
    narrow = _error(_combine(paths, tmp_path / "narrow", passes=2), d) / optimum
    wide = _error(_combine(paths, tmp_path / "wide", passes=2, oversample=60), d) / optimum
    assert narrow > 1.05  # the flat noise: 2 passes at k + 10 columns are far from the optimum here
    assert wide < 1.02 < narrow, (narrow, wide)


def test_a_sketch_as_wide_as_the_range_is_exact(many, tmp_path):
    paths, d, optimum = many
    assert sketch_width(8, 320, 256, 120) == 256  # 2 (8 + 120) >= min(320, 256): the whole range
    err = _error(_combine(paths, tmp_path / "full", passes=2, oversample=120), d)
    assert err == pytest.approx(optimum, rel=1e-4)


def test_the_folds_threads_change_no_bit(many, tmp_path):
    paths, _, _ = many
    one = lorafuse.load(_combine(paths, tmp_path / "t1", passes=3, threads=1))
    two = lorafuse.load(_combine(paths, tmp_path / "t2", passes=3, threads=2))
    for name, u in one.updates.items():
        b1, a1 = u.stored_factors()
        b2, a2 = two.updates[name].stored_factors()
        assert np.array_equal(b1, b2) and np.array_equal(a1, a2), name


def test_blas_threads_are_put_back(many, tmp_path):
    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    _combine(many[0], tmp_path / "o", passes=2)
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before


def test_oversample_selects_the_streamed_engine(many, tmp_path):
    report = _report(many[0][:5], tmp_path / "o", oversample=20)
    assert report.summary is not None and report.summary.engine == "stream"


@pytest.mark.parametrize("kw, said", [
    ({"engine": "memory"}, "engine memory"),
    ({"method": "linear"}, "method 'linear'"),
    ({"method": "cat"}, "method 'cat'"),
    ({"oversample": -1}, "oversample"),
])
def test_oversample_where_it_does_nothing_is_refused(many, tmp_path, kw, said):
    opts = {"oversample": 20, **kw}
    with pytest.raises(LorafuseValueError, match=said):
        _combine(many[0][:3], tmp_path / "o", **opts)
    assert not (tmp_path / "o").exists()


def test_cli_oversample_reaches_the_sketch(many, tmp_path, capsys):
    paths, d, optimum = many
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    assert main(["combine", "--from-list", str(listing), "--rank", "8", "--passes", "2", "--oversample", "60",
                 "--dtype", "fp32", "-o", str(tmp_path / "cli")]) == 0
    api = _combine(list(read_list(listing)[0]), tmp_path / "api", passes=2, oversample=60)
    cli = lorafuse.load(tmp_path / "cli").updates[NAME].delta()
    assert np.array_equal(cli, lorafuse.load(api).updates[NAME].delta())
    assert _error(tmp_path / "cli", d) / optimum < 1.02


def test_resize_with_a_max_rank_below_the_ranks_does_not_say_nothing_was_reduced(tmp_path, capsys):
    """--rank at or above every rank says nothing was reduced; a --max-rank below them reduces them even so."""
    g = np.random.default_rng(0)
    src = tmp_path / "a"
    src.mkdir()
    save_file({f"{PREFIX}self_attn.q_proj.lora_A.weight": g.standard_normal((2, 32)).astype(np.float32),
               f"{PREFIX}self_attn.q_proj.lora_B.weight": g.standard_normal((48, 2)).astype(np.float32)},
              str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                         "target_modules": ["q_proj"]}))
    assert main(["resize", str(src), "--rank", "2", "--max-rank", "1", "-o", str(tmp_path / "o1")]) == 0
    err = capsys.readouterr().err
    assert lorafuse.load(tmp_path / "o1").updates[NAME].rank == 1
    assert "nothing was reduced" not in err
    assert main(["resize", str(src), "--rank", "2", "-o", str(tmp_path / "o2")]) == 0
    assert "nothing was reduced" in capsys.readouterr().err


def _kohya(path: Path) -> Path:
    g = np.random.default_rng(3)
    t: dict[str, np.ndarray] = {}
    for m in ("lora_unet_a_proj", "lora_unet_b_proj"):
        t[f"{m}.lora_down.weight"] = g.standard_normal((4, 32)).astype(np.float32)
        t[f"{m}.lora_up.weight"] = g.standard_normal((32, 4)).astype(np.float32)
        t[f"{m}.alpha"] = np.array(4, np.float32)
    save_file(t, str(path))
    return path


def _keeps_xattrs(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"x")
    try:
        import os

        os.setxattr(probe, "user.lorafuse.probe", b"1")
        return True
    except OSError:
        return False


def test_a_copied_or_downloaded_lorafuse_output_is_the_users(tmp_path, capsys):
    """A lorafuse-made file or folder copied (cp drops the stamp), downloaded or rewritten by another tool may be
    the user's only copy: replacing it takes --overwrite; a re-run into lorafuse's own output does not."""
    import shutil

    if not _keeps_xattrs(tmp_path):
        pytest.skip("this file system keeps no user extended attributes: the mark alone decides here")
    k, k2 = _kohya(tmp_path / "k.safetensors"), _kohya(tmp_path / "k2.safetensors")
    made = tmp_path / "made.safetensors"
    assert main(["resize", str(k), "--rank", "2", "-o", str(made), "-q"]) == 0
    copy = tmp_path / "downloaded.safetensors"
    shutil.copyfile(made, copy)
    before = copy.read_bytes()
    assert main(["combine", str(k), str(k2), "-o", str(copy)]) == 1
    assert "not as lorafuse left it" in capsys.readouterr().err and copy.read_bytes() == before
    assert main(["resize", str(k), "--rank", "2", "-o", str(made), "-q"]) == 0  # a re-run: its own output
    peft = _adapters(tmp_path / "peft", n=1)[0]
    folder = tmp_path / "made"
    assert main(["resize", str(peft), "--rank", "2", "-o", str(folder), "-q"]) == 0
    assert (folder / "lorafuse_manifest.json").is_file()
    shutil.copytree(folder, tmp_path / "copied", copy_function=shutil.copyfile)  # as cp -r, or a download
    files = {p.name: p.read_bytes() for p in (tmp_path / "copied").iterdir()}
    assert main(["resize", str(peft), "--rank", "2", "-o", str(tmp_path / "copied"), "-q"]) == 1
    assert "copied or downloaded here" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "copied").iterdir()} == files
    assert main(["resize", str(peft), "--rank", "2", "-o", str(folder), "-q"]) == 0  # a re-run: its own output
    assert main(["resize", str(k), "--rank", "2", "-o", str(copy), "--overwrite", "-q"]) == 0


def test_a_recipes_combine_stage_takes_oversample(many, tmp_path):
    """`oversample` in a recipe's combine stage is combine's --oversample (the same factors); refused for a method
    whose sketch it is not."""
    paths = many[0][:6]
    models = "".join(f"  - model: {p}\n    parameters: {{weight: {1 / len(paths)!r}}}\n" for p in paths)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: svd\nmodels:\n{models}parameters: {{rank: 8, passes: 2, oversample: 30}}\n"
                      "dtype: float32\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "viarecipe"), "-q"]) == 0
    direct = _combine(paths, tmp_path / "direct", passes=2, oversample=30)
    got = lorafuse.load(tmp_path / "viarecipe").updates[NAME].delta()
    assert np.array_equal(got, lorafuse.load(direct).updates[NAME].delta())
    recipe.write_text(f"merge_method: linear\nmodels:\n{models}parameters: {{oversample: 30}}\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "lin"), "-q"]) == 2
    assert not (tmp_path / "lin").exists()


_STUCK = """
import sys, threading, time
from lorafuse import cli
from lorafuse.io.atomic import atomic_dir
cli.arm_stop_watch()  # as the console script does
cli._catch_ending()
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "part.bin").write_bytes(b"x" * 1000)
    lock = threading.Lock()
    lock.acquire()
    try:
        print("ready", flush=True)
        lock.acquire()  # the stop's exception lands here
    except BaseException:
        pass
    while True:  # then stuck, as a main thread joining a worker that waits for a lock the stop left held
        try:
            time.sleep(0.05)
        except BaseException:
            pass
"""


@pytest.mark.parametrize("signum, status", [(15, 143), (2, 130)])
def test_a_stopped_command_whose_threads_hang_ends_and_leaves_no_temporary_output(tmp_path, signum, status):
    """A stop (SIGTERM, Ctrl-C) whose unwinding hangs (a lock the stop's exception left held: CPython gh-74174)
    ends the process after LORAFUSE_STOP_GRACE seconds with the signal's status, the temporary output removed."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "LORAFUSE_STOP_GRACE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _STUCK, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]  # being written
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == status, err
    assert "did not finish within 1 s: ended at once" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


def test_main_called_from_python_is_never_ended_by_the_stop_watch():
    """Only the console script arms the watch: a program (this test) calling lorafuse.cli.main keeps running
    however long a stop takes to unwind."""
    import threading

    from lorafuse import cli

    assert not cli._ARMED  # pytest imported lorafuse.cli, not the console script's entry
    cli._watch_stop(130, "test")
    assert not any(t.name == "lorafuse-stop-watch" for t in threading.enumerate())


@pytest.mark.parametrize("verb", ["resize", "combine", "arith"])
def test_f64_factors_beyond_float32_are_refused_saying_so(tmp_path, capsys, verb):
    """An F64 adapter whose finite values float32 cannot hold (1e300) is refused naming the value and why (lorafuse
    computes in float32), not as "holds NaN or Inf"."""
    g = np.random.default_rng(0)
    a = g.standard_normal((4, 32))
    a[0, 0] = 1e300
    src = tmp_path / "a"
    src.mkdir()
    save_file({f"{PREFIX}self_attn.q_proj.lora_A.weight": a,
               f"{PREFIX}self_attn.q_proj.lora_B.weight": g.standard_normal((48, 4))},
              str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                         "target_modules": ["q_proj"]}))
    if verb == "arith":
        from lorafuse.errors import NonFiniteError

        with pytest.raises(NonFiniteError, match=r"holds 1e\+300 in its F64 factors, beyond float32's range"):
            lorafuse.load(src) + lorafuse.load(src)
        return
    argv = ["resize", str(src), "--rank", "2"] if verb == "resize" else ["combine", str(src), str(src)]
    assert main([*argv, "-o", str(tmp_path / "o")]) == 1
    assert "holds 1e+300 in its F64 factors, beyond float32's range" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_index_naming_its_shards_with_a_leading_dot_slash_is_read(tmp_path):
    """transformers joins a weight_map value to the folder, so './model-00001-of-00002.safetensors' is the shard
    beside the index: apply reads it (the same merge as the plain names), and the output's index names the file."""
    import shutil

    import torch
    from fault_tools import llama_specs, write_checkpoint, write_peft_adapter
    from safetensors.torch import load_file

    specs = llama_specs(layers=1, hidden=16, inter=32, vocab=32)
    plain, dotted, ad = tmp_path / "plain", tmp_path / "dotted", tmp_path / "ad"
    write_checkpoint(plain, specs, shards=2)
    write_peft_adapter(ad, specs, ["q_proj"])
    shutil.copytree(plain, dotted)
    index = dotted / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: "./" + v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    assert main(["apply", str(plain), str(ad), "-o", str(tmp_path / "o1"), "-q"]) == 0
    assert main(["apply", str(dotted), str(ad), "-o", str(tmp_path / "o2"), "-q"]) == 0
    written = json.loads((tmp_path / "o2" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(v.startswith("./") for v in written.values())
    one = {k: v for f in sorted((tmp_path / "o1").glob("*.safetensors")) for k, v in load_file(f).items()}
    two = {k: v for f in sorted((tmp_path / "o2").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)

"""combine's method registry, its options object and its grouped, streaming loop.

Values are checked against numpy float64 (and PEFT's own merge_utils for the element-wise merges);
test_combine_peft.py compares whole adapters with PEFT's add_weighted_adapter."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.utils import merge_utils
from safetensors.numpy import save_file

import lorafuse
from lorafuse.backends import FactorJob, FactorListJob, get_backend
from lorafuse.cli import build_parser, main
from lorafuse.io.pages import releasable, release_pages
from lorafuse.ops.combine import METHODS, REGISTRY, CombineOptions, check_options, combine_with
from lorafuse.ops.combine import svd as svd_mod
from lorafuse.ops.combine.context import Context
from lorafuse.ops.combine.terms import Term, terms_by_module

PREFIX = "base_model.model.model.layers.0."
MODULES = {"self_attn.q_proj": (24, 20), "mlp.up_proj": (40, 16)}  # name -> (out, in)


def write_peft(path: Path, factors: dict[str, tuple[np.ndarray, np.ndarray]], r: int, alpha: float) -> Path:
    """A PEFT adapter folder written with the safetensors package: {module: (A, B)}."""
    path.mkdir(parents=True)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    targets = sorted({n.rsplit(".", 1)[-1] for n in factors})
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets}))
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[dict], list[float]]:
    """Three rank-4 adapters (scales 2, 0.5, 1) on two modules; their float32 factors and scales."""
    tmp = tmp_path_factory.mktemp("methods")
    rng = np.random.default_rng(5)
    dirs, factors, scales = [], [], []
    for i, alpha in enumerate((8.0, 2.0, 4.0)):
        f = {n: (rng.standard_normal((4, i_), dtype=np.float32), rng.standard_normal((o, 4), dtype=np.float32))
             for n, (o, i_) in MODULES.items()}
        dirs.append(write_peft(tmp / f"a{i}", f, 4, alpha))
        factors.append(f)
        scales.append(alpha / 4)
    return dirs, factors, scales


WEIGHTS = [1.0, 0.6, -0.8]


def dense(factors: list[dict], scales: list[float], name: str) -> list[np.ndarray]:
    """s_i B_i A_i per adapter, float64."""
    return [s * (f[name][1].astype(np.float64) @ f[name][0].astype(np.float64)) for f, s in zip(factors, scales)]


def optimum(d: np.ndarray, k: int) -> float:
    s = np.linalg.svd(d, compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2)))


def peft_merge(method: str, tensors: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    """PEFT's merge_utils on float64 tensors (what add_weighted_adapter applies)."""
    t = [torch.from_numpy(x) for x in tensors]
    w = torch.tensor(weights, dtype=torch.float64)
    if method == "linear":
        return merge_utils.task_arithmetic(t, w).numpy()
    if method == "ties":
        return merge_utils.ties(t, w, density).numpy()
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(t, w, density).numpy()
    if method == "dare_linear":  # density 1: nothing dropped, nothing rescaled
        return merge_utils.task_arithmetic(t, w).numpy()
    if method == "dare_ties":  # density 1: TIES without pruning (PEFT warns that nothing is pruned)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The density 1.0", UserWarning)
            return merge_utils.ties(t, w, 1.0).numpy()
    raise AssertionError(method)


def method_args(name: str) -> list[str]:
    m = REGISTRY[name]
    args = []
    if m.takes_density:
        args += ["--density", "1.0" if name.startswith("dare") else "0.6"]
    if m.takes_rank:
        args += ["--rank", "3"]
    return args


# ----------------------------------------------------------------------------- the registry and the CLI


def test_cli_choices_and_help_come_from_the_registry() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command" or getattr(a, "choices", None)
               and "combine" in a.choices)
    combine_parser = sub.choices["combine"]
    method = next(a for a in combine_parser._actions if a.dest == "method")
    text = combine_parser.format_help()  # the choices and the epilog are filled in when help is shown
    assert method.metavar == "{" + ",".join(REGISTRY) + "}" and METHODS == tuple(REGISTRY)
    assert method.default == "svd" and METHODS[0] == "svd"
    assert "[--method {svd,cat,linear,ties," in text
    for m in REGISTRY.values():
        assert f"  {m.name} " in text and m.help[:40] in " ".join(text.split())
    assert {m for m in METHODS if REGISTRY[m].exact} == {"svd", "cat"}


def test_an_unknown_method_is_refused_by_the_cli_and_the_api(adapters, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    dirs, _, _ = adapters
    with pytest.raises(SystemExit) as exit_info:
        main(["combine", str(dirs[0]), "--method", "mean", "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "argument --method: unknown method 'mean' (choose from svd, cat, linear, ties" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["combine", str(dirs[0]), "--method", "dare-ties", "-o", str(tmp_path / "x")])
    assert "unknown method 'dare-ties'; did you mean 'dare_ties'?" in capsys.readouterr().err
    with pytest.raises(lorafuse.LorafuseValueError, match="unknown method 'mean'; choose one of svd, cat, linear"):
        lorafuse.combine(dirs, method="mean")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", METHODS)
def test_options_are_checked_from_the_registry(adapters, name: str) -> None:
    dirs, _, _ = adapters
    m = REGISTRY[name]
    base = CombineOptions(method=name, density=0.5 if m.takes_density else None)
    assert check_options(base).method == name
    if m.takes_density:
        with pytest.raises(lorafuse.LorafuseValueError,
                           match=f"method '{name}' needs a density: the fraction of entries it keeps, "
                                 "between 0 and 1 \\(e.g. --density 0.5"):
            lorafuse.combine(dirs, method=name)
    else:
        with pytest.raises(lorafuse.LorafuseValueError, match=f"method '{name}' takes no density"):
            lorafuse.combine(dirs, method=name, density=0.5)
    if not m.takes_rank:
        for key in ("rank", "conv_rank"):
            with pytest.raises(lorafuse.LorafuseValueError, match=f"method '{name}' takes no rank"):
                check_options(dataclasses.replace(base, **{key: 2}))
    else:
        assert check_options(dataclasses.replace(base, rank=2, conv_rank=1)).rank == 2
    if name != "svd":
        with pytest.raises(lorafuse.LorafuseValueError, match=r"exact \(--exact\) applies to method 'svd'"):
            check_options(dataclasses.replace(base, exact=True))
    with pytest.raises(lorafuse.LorafuseValueError, match="group_bytes must be a positive integer"):
        check_options(dataclasses.replace(base, group_bytes=0))
    with pytest.raises(lorafuse.LorafuseValueError, match="split must be 'B'"):
        check_options(dataclasses.replace(base, split="C"))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_from_the_cli_matches_float64(adapters, name: str, tmp_path: Path) -> None:
    """Each registry entry is reachable from `lorafuse combine --method` and gives its formula's value."""
    dirs, factors, scales = adapters
    out = tmp_path / "out"
    weights = ",".join(map(str, WEIGHTS))
    assert main(["combine", *map(str, dirs), "--method", name, *method_args(name), f"--weights={weights}",
                 "-q", "-o", str(out)]) == 0
    result = lorafuse.load(out)
    assert set(result.updates) == {"model.layers.0." + n for n in MODULES}
    for module in MODULES:
        got = result.updates["model.layers.0." + module].delta()
        deltas = dense(factors, scales, module)
        total = sum(w * d for w, d in zip(WEIGHTS, deltas))
        if name == "cat":
            ref = total
        elif name == "svd":
            err = np.linalg.norm(got - total)
            assert err == pytest.approx(optimum(total, 3), rel=1e-5)
            continue
        elif name.endswith("_svd"):  # PEFT: merge the dense deltas, then the best rank 3
            merged = peft_merge(name.removesuffix("_svd"), deltas, WEIGHTS, 1.0 if "dare" in name else 0.6)
            assert np.linalg.norm(got - merged) == pytest.approx(optimum(merged, 3), rel=1e-4, abs=1e-6)
            continue
        else:  # factor-wise: A with sign(c) sqrt|c|, B with sqrt|c|, merged separately
            coefs = [w * s for w, s in zip(WEIGHTS, scales)]
            wa = [math.copysign(math.sqrt(abs(c)), c) for c in coefs]
            wb = [math.sqrt(abs(c)) for c in coefs]
            density = 1.0 if "dare" in name else 0.6
            a = peft_merge(name, [f[module][0].astype(np.float64) for f in factors], wa, density)
            b = peft_merge(name, [f[module][1].astype(np.float64) for f in factors], wb, density)
            ref = b @ a
        assert np.abs(got - ref).max() <= 2e-5 * np.abs(ref).max(), (name, module)


# ----------------------------------------------------------------------------- groups, routes, pages


@pytest.mark.parametrize("name", ["svd", "cat", "linear", "ties", "ties_svd"])
def test_groups_of_any_size_give_the_same_bytes(adapters, name: str) -> None:
    """One module per group or all in one: the same calls per module, the same result."""
    dirs, _, _ = adapters
    m = REGISTRY[name]
    opts = CombineOptions(method=name, density=0.6 if m.takes_density else None, rank=3 if m.takes_rank else None)
    one = combine_with(dirs, WEIGHTS, opts)
    # group_bytes=1: every module alone; svd keeps the stacked route here (stacked rank 12 < min(out, in))
    each = combine_with(dirs, WEIGHTS, dataclasses.replace(opts, group_bytes=1))
    for n, u in one.updates.items():
        for x, y in zip(u.stored_factors(), each.updates[n].stored_factors()):
            np.testing.assert_array_equal(x, y)


def _many(tmp: Path, n: int, out: int, inn: int, r: int, seed: int) -> tuple[list[Path], np.ndarray]:
    rng = np.random.default_rng(seed)
    dirs, total = [], np.zeros((out, inn))
    for i in range(n):
        a = rng.standard_normal((r, inn), dtype=np.float32)
        b = rng.standard_normal((out, r), dtype=np.float32) * np.float32(1 + i % 3)
        dirs.append(write_peft(tmp / f"m{i}", {"self_attn.q_proj": (a, b)}, r, float(r)))
        total += b.astype(np.float64) @ a.astype(np.float64)
    return dirs, total


@pytest.mark.parametrize("exact", [False, True])
def test_a_large_stack_reaching_full_rank_forms_d_in_chunks_or_takes_the_lists(
        tmp_path: Path, exact: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacked rank R = 400 >= min(out, in) = 60 and a stack over group_bytes. Where the stacked call is exact,
    D is accumulated a few adapters at a time; where it is randomized, the per-adapter factors go to the core's
    factored_svd_lists (nothing stacked or formed). Either way the result is the stacked call's (the same exact
    or randomized choice and sketch; the lists differ from the stack by float32 rounding only)."""
    dirs, total = _many(tmp_path, 100, 90, 60, 4, seed=3)
    opts = CombineOptions(rank=4, exact=exact)
    stacked = combine_with(dirs, None, opts)  # the stack (0.24 MB) fits the default group
    calls: dict[str, list[str]] = {"_dense": [], "_list_job": []}
    for fn, seen in calls.items():
        real = getattr(svd_mod, fn)
        monkeypatch.setattr(svd_mod, fn, lambda *a, _f=real, _c=seen: _c.append(a[0]) or _f(*a))
    chunked = combine_with(dirs, None, dataclasses.replace(opts, group_bytes=64 << 10))
    name = "model.layers.0.self_attn.q_proj"
    assert calls == ({"_dense": [name], "_list_job": []} if exact else {"_dense": [], "_list_job": [name]})
    assert stacked.randomized == chunked.randomized == ([] if exact else [name])
    best = optimum(total, 4)
    for res in (stacked, chunked):
        err = np.linalg.norm(res.updates[name].delta() - total)
        assert best <= err * (1 + 1e-6) and err <= best * (1 + 1e-5 if exact else 1.02)
    x, y = stacked.updates[name].delta(), chunked.updates[name].delta()
    assert np.linalg.norm(x - y) <= (1e-5 if exact else 1e-3) * np.linalg.norm(x)


def test_randomized_full_rank_module_in_chunks_matches_the_stacked_sketch(tmp_path: Path) -> None:
    """A module where the factored path is randomized and dense_svd's rule agrees: dense_svd of D."""
    dirs, total = _many(tmp_path, 60, 200, 180, 4, seed=4)  # R = 240 >= 180; k + 10 < 180 / 4
    stacked = combine_with(dirs, None, CombineOptions(rank=4))
    chunked = combine_with(dirs, None, CombineOptions(rank=4, group_bytes=256 << 10))
    name = "model.layers.0.self_attn.q_proj"
    assert stacked.randomized == chunked.randomized == [name]
    x, y = stacked.updates[name].delta(), chunked.updates[name].delta()
    assert np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(x)
    assert np.linalg.norm(y - total) <= 1.02 * optimum(total, 4)


def test_the_lists_route_is_bit_identical_for_any_thread_count(tmp_path: Path) -> None:
    """Several over-budget modules in one factored_svd_lists call, run on 1 or 2 threads: the same bytes."""
    rng = np.random.default_rng(8)
    shapes = {"self_attn.q_proj": (96, 80), "mlp.up_proj": (120, 64)}  # R = 300: randomized, like the stack
    dirs, totals = [], {n: np.zeros(s) for n, s in shapes.items()}
    for i in range(100):
        f = {n: (rng.standard_normal((3, s[1]), dtype=np.float32), rng.standard_normal((s[0], 3), dtype=np.float32))
             for n, s in shapes.items()}
        dirs.append(write_peft(tmp_path / f"t{i}", f, 3, 3.0))
        for n, (a, b) in f.items():
            totals[n] += b.astype(np.float64) @ a.astype(np.float64)
    runs = [combine_with(dirs, None, CombineOptions(rank=3, group_bytes=64 << 10, threads=t)) for t in (1, 2)]
    assert sorted(runs[0].randomized) == sorted(PREFIX.removeprefix("base_model.model.") + n for n in shapes)
    for n, u in runs[0].updates.items():
        for x, y in zip(u.stored_factors(), runs[1].updates[n].stored_factors()):
            np.testing.assert_array_equal(x, y)
        total = totals[n.removeprefix(PREFIX.removeprefix("base_model.model."))]
        assert np.linalg.norm(u.delta() - total) <= 1.02 * optimum(total, 3)


def test_factored_svd_lists_releases_mapped_pages_and_keeps_the_result(tmp_path: Path) -> None:
    """release flags on read-only mapped factors: the same result bit for bit, and the pages of the inputs
    leave the resident set (they are read again from the page cache on every product)."""
    rng = np.random.default_rng(9)
    name, out, inn, r, n = "model.layers.0.self_attn.q_proj", 4096, 2048, 16, 16
    for i in range(n):
        write_peft(tmp_path / f"p{i}", {"self_attn.q_proj": (rng.standard_normal((r, inn), dtype=np.float32),
                                                           rng.standard_normal((out, r), dtype=np.float32))},
                   r, float(r))
    pairs = [lorafuse.load(tmp_path / f"p{i}").updates[name].stored_factors() for i in range(n)]
    assert all(releasable(b) and releasable(a) for b, a in pairs)
    arrays = [x for p in pairs for x in p]
    weights = [1.0 + 0.25 * i for i in range(n)]
    job = FactorListJob(name, pairs, weights)
    be = get_backend()
    kw = dict(split="B", mode="randomized", seed=5)
    release_pages(arrays)
    before = _rss_file_kib()
    kept = be.factored_svd_lists([job], [8], threads=1, **kw)[0]
    assert _rss_file_kib() - before >= 5 * 1024  # the 6 MiB of factors stayed resident
    release_pages(arrays)
    before = _rss_file_kib()
    dropped = be.factored_svd_lists([job], [8], threads=2, release=[[True] * n], **kw)[0]
    assert _rss_file_kib() - before <= 512  # at most the partial pages at the ends of the 32 arrays
    own = [(b.copy(), a.copy()) for b, a in pairs]  # anonymous memory, never released
    mine = be.factored_svd_lists([FactorListJob(name, own, weights)], [8], threads=1, release=[None], **kw)[0]
    for res in (dropped, mine):
        for x, y in zip(kept, res):
            np.testing.assert_array_equal(x, y)
    for (b, a), (b0, a0) in zip(own, pairs):  # the released mapped pages read back unchanged
        np.testing.assert_array_equal(b, b0)
        np.testing.assert_array_equal(a, a0)
    stacked_b = np.hstack([np.float32(w) * b for (b, _), w in zip(pairs, weights)])
    ref = be.factored_svd([FactorJob(name, stacked_b, np.vstack([a for _, a in pairs]))], [8], "B", 1,
                          mode="randomized", seed=5)[0]
    x, y = kept.b @ kept.a, ref.b @ ref.a
    assert np.linalg.norm(x - y) <= 1e-5 * np.linalg.norm(y)
    with pytest.raises(lorafuse.ShapeMismatchError, match=r"q_proj: 1 release flags for 16 pairs"):
        be.factored_svd_lists([job], [8], release=[[True]], **kw)
    with pytest.raises(lorafuse.LorafuseValueError, match=r"q_proj: release flag 0 must be a bool"):
        be.factored_svd_lists([job], [8], release=[[1] * n], **kw)


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_release_pages_drops_mapped_pages_and_keeps_the_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 1 << 16), dtype=np.float32)  # 4 MiB
    b = rng.standard_normal((1 << 12, 16), dtype=np.float32)
    d = write_peft(tmp_path / "big", {"self_attn.q_proj": (a, b)}, 16, 16.0)
    u = lorafuse.load(d).updates["model.layers.0.self_attn.q_proj"]
    view = u.A.raw
    assert not view.flags.writeable
    before = _rss_file_kib()
    assert float(np.asarray(view, dtype=np.float64).sum()) == pytest.approx(float(a.astype(np.float64).sum()))
    touched = _rss_file_kib()
    assert touched - before >= 3 * 1024  # the 4 MiB of A are resident now
    assert release_pages([view]) >= a.nbytes
    assert touched - _rss_file_kib() >= 3 * 1024
    np.testing.assert_array_equal(view, a)  # read back from the page cache
    own = a.copy()  # not a mapping: left alone (DONTNEED would zero anonymous memory)
    own.flags.writeable = False
    assert release_pages([own, a]) == 0
    np.testing.assert_array_equal(own, a)


def test_a_nan_in_a_chunked_module_is_refused_naming_it(tmp_path: Path) -> None:
    dirs, _ = _many(tmp_path, 20, 30, 24, 2, seed=6)  # R = 40 >= 24
    bad = np.zeros((2, 24), dtype=np.float32)
    bad[1, 5] = np.nan
    dirs.append(write_peft(tmp_path / "bad", {"self_attn.q_proj": (bad, np.ones((30, 2), np.float32))}, 2, 2.0))
    for group_bytes in (1 << 30, 1024):  # stacked, then D accumulated in chunks
        with pytest.raises(lorafuse.NonFiniteError, match=r"model\.layers\.0\.self_attn\.q_proj: input holds NaN"):
            combine_with(dirs, None, CombineOptions(rank=2, group_bytes=group_bytes))


def test_a_lists_module_keeps_its_first_group_bytes_resident(tmp_path: Path) -> None:
    """The release flags of the lists route: the terms that end within the group's bytes stay resident (no
    fault at every product), the terms past them are dropped as they are used; own (anonymous) arrays never."""
    dirs, _ = _many(tmp_path, 10, 90, 60, 4, seed=4)  # each term: 4 * (90 + 60) * 4 = 2,400 bytes
    adapters = [lorafuse.load(d) for d in dirs]
    name = "model.layers.0.self_attn.q_proj"
    terms = terms_by_module(adapters, [1.0] * len(adapters))[name]
    ctx = Context(CombineOptions(group_bytes=3 * 2400 + 100), get_backend(), {name: 4})
    job, flags = svd_mod._list_job(name, terms, ctx)
    assert len(job.pairs) == 10 and flags == [False] * 3 + [True] * 7
    assert svd_mod.working_bytes(name, terms, ctx) >= 3 * 2400  # the kept inputs count in the group's bytes
    _, everything = svd_mod._list_job(name, terms, Context(CombineOptions(), get_backend(), {name: 4}))
    assert everything == [False] * 10  # the default group holds all 24 KB
    own = [Term(t.weight, t.update.with_factors(*(x.copy() for x in t.update.stored_factors()), t.update.scale))
           for t in terms]
    assert svd_mod._list_job(name, own, ctx)[1] == [False] * 10

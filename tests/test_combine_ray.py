"""combine's engine 'ray' (ops.combine.ray_engine): the streamed engine's passes as Ray tasks over shards.

One local Ray of 2 CPUs serves the whole module. Checked: the Ray result against the local streamed engine
(svd with 1, 2 and 3 passes, linear) and, where the sketch captures D exactly, against D summed in numpy
float64; the result bit-identical whatever the order in which shards finish and however many tasks run at
once; a worker killed in the middle of a task (os._exit on the task's first attempt) retried by Ray with
the same result; an adapter changed between passes refused from inside a task, naming it; the refusals
(an Adapter in memory, Ray not installed, ray_address without engine 'ray') before any work."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from safetensors.numpy import save_file

import lorafuse
from lorafuse.errors import InputChangedError, LorafuseError, LorafuseValueError, UnsupportedError
from lorafuse.ops.combine import CombineOptions, CombineReport, combine_to, combine_with, many, ray_engine

PREFIX = "base_model.model.model.layers.0."
MODULES = {"self_attn.q_proj": (96, 64), "mlp.down_proj": (64, 160)}
NAMES = [f"model.layers.0.{m}" for m in MODULES]
SPECTRUM = 0.7 ** np.arange(16)
N = 12  # 4 shards of 3


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module (starting one takes seconds); shut down at the end."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def make_adapters(root: Path, n: int, ranks: tuple[int, ...], seed: int = 1) -> list[Path]:
    """n PEFT adapters: B_j = U C_j + noise, A_j = C_j^T V^T + noise, with U S V^T a shared part of decaying
    spectrum (SPECTRUM) and C_j a random mixing: their sum is the shared part plus noise."""
    g = np.random.default_rng(seed)
    root_s = np.sqrt(SPECTRUM)
    shared = {m: (np.linalg.qr(g.standard_normal((o, len(root_s))))[0] * root_s,
                  (np.linalg.qr(g.standard_normal((i, len(root_s))))[0] * root_s).T) for m, (o, i) in MODULES.items()}
    paths = []
    for j in range(n):
        r = ranks[j % len(ranks)]
        p = root / f"adapter{j:03d}"
        p.mkdir(parents=True)
        tensors = {}
        for m, (o, i) in MODULES.items():
            u, v = shared[m]
            c = g.standard_normal((len(root_s), r)) / np.sqrt(r)
            tensors[f"{PREFIX}{m}.lora_B.weight"] = (u @ c + 0.3 * g.standard_normal((o, r)) / np.sqrt(o)
                                                     ).astype(np.float32)
            tensors[f"{PREFIX}{m}.lora_A.weight"] = (c.T @ v + 0.3 * g.standard_normal((r, i)) / np.sqrt(i)
                                                     ).astype(np.float32)
        save_file(tensors, str(p / "adapter_model.safetensors"))
        (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                           "target_modules": ["q_proj", "down_proj"]}))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[float]]:
    paths = make_adapters(tmp_path_factory.mktemp("mixed"), N, ranks=(4, 6, 8))
    return paths, list(np.random.default_rng(5).uniform(-0.5, 1.5, N))


def relative(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def same_bits(x: lorafuse.Adapter, y: lorafuse.Adapter) -> None:
    assert list(x.updates) == list(y.updates)
    for n, u in x.updates.items():
        np.testing.assert_array_equal(u.A.raw, y.updates[n].A.raw)
        np.testing.assert_array_equal(u.B.raw, y.updates[n].B.raw)


Taken = list[dict[str, list[np.ndarray]]]  # each pass's summed float64 accumulators, as the driver took them


def run(paths: list[Path], weights: list[float], options: CombineOptions,
        **kwargs: object) -> tuple[lorafuse.Adapter, Taken]:
    """combine_with with engine 'ray' through ray_engine.run_ray's test parameters (task, task_options), and
    the float64 sums the driver took in each pass (bits that the float32 result could round away)."""
    real_run, real_take = ray_engine.run_ray, many.Sketching.take
    taken: Taken = []

    def patched(plan: many.Plan, o: CombineOptions, on_module):  # type: ignore[no-untyped-def]
        return real_run(plan, o, on_module, **kwargs)

    def take(self: many.Sketching, partial: dict[str, list[np.ndarray]]) -> None:
        taken.append({n: [x.copy() for x in arrays] for n, arrays in partial.items()})
        real_take(self, partial)

    mp = pytest.MonkeyPatch()
    mp.setattr(ray_engine, "run_ray", patched)
    mp.setattr(many.Sketching, "take", take)
    try:
        return combine_with(paths, weights, options), taken
    finally:
        mp.undo()


def same_sums(x: Taken, y: Taken) -> None:
    assert len(x) == len(y) and all(list(a) == list(b) for a, b in zip(x, y))
    for a, b in zip(x, y):
        for n in a:
            assert len(a[n]) == len(b[n])
            for p, q in zip(a[n], b[n]):
                np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_svd_on_ray_is_the_local_engine(mixed: tuple[list[Path], list[float]], tmp_path: Path, passes: int):
    paths, weights = mixed
    options = CombineOptions(rank=6, passes=passes, dtype="fp32")
    local = combine_to(paths, weights, options, tmp_path / "local")
    on_ray = combine_to(paths, weights, CombineOptions(rank=6, passes=passes, dtype="fp32", engine="ray"),
                        tmp_path / "ray")
    assert isinstance(on_ray, CombineReport) and on_ray.engine == "ray" and local.engine == "stream"
    s, t = on_ray.summary, local.summary
    assert s is not None and t is not None
    assert (s.engine, s.adapters, s.passes, s.bytes_read) == ("ray", N, passes, t.bytes_read)
    assert s.shards == 4 and 1 <= s.workers <= 2
    lines = "\n".join(s.lines())
    assert "on Ray: 4 shards" in lines and f"{4 * passes} tasks" in lines and "(the driver)" in lines
    a, b = lorafuse.load(tmp_path / "ray"), lorafuse.load(tmp_path / "local")
    for n in NAMES:
        assert a.updates[n].rank == b.updates[n].rank == 6
        assert relative(a.updates[n].delta(), b.updates[n].delta()) <= 1e-6, n
        assert s.errors[n] == pytest.approx(t.errors[n], rel=1e-5)


def test_linear_on_ray_is_the_local_and_in_memory_linear(tmp_path: Path):
    paths = make_adapters(tmp_path, 10, ranks=(4,), seed=2)
    weights = [0.3 * (j % 4) - 0.4 for j in range(10)]  # negative weights too
    memory = lorafuse.combine(paths, weights, method="linear", engine="memory")
    local = lorafuse.combine(paths, weights, method="linear", engine="stream")
    on_ray = lorafuse.combine(paths, weights, method="linear", engine="ray")
    assert on_ray.randomized == []
    for n in NAMES:
        for t in ("A", "B"):
            x = getattr(on_ray.updates[n], t).f32()
            np.testing.assert_allclose(x, getattr(local.updates[n], t).f32(), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(x, getattr(memory.updates[n], t).f32(), rtol=1e-5, atol=1e-6)


def test_exact_rank_case_is_numpys_float64_sum(tmp_path: Path):
    """5 adapters of rank 2: D has rank 10 <= k, so 2 passes capture it whole: the result is D itself."""
    paths = make_adapters(tmp_path, 5, ranks=(2,), seed=3)
    weights = [1.0, -0.5, 0.25, 2.0, 0.75]
    result = lorafuse.combine(paths, weights, rank=10, passes=2, engine="ray", dtype="fp32")
    for n in NAMES:
        d = np.zeros(MODULES[n.split(".", 3)[-1]])
        for p, w in zip(paths, weights):
            u = lorafuse.load(p).updates[n]
            d += w * u.scale * (u.B.f32().astype(np.float64) @ u.A.f32().astype(np.float64))
        assert relative(result.updates[n].delta(), d) <= 2e-6, n


def test_result_independent_of_completion_order_and_parallelism(mixed: tuple[list[Path], list[float]]):
    """The first shard made to finish last, and one task at a time (each task takes both CPUs), give the
    bits of the plain run: the partials are summed in a tree fixed by the number of shards. (Weights from
    1e-8 to 1e8: float64 sums of float32 products of like magnitudes are exact in any order, these are not.)"""
    paths, _ = mixed
    g = np.random.default_rng(7)
    weights = list(g.choice([-1.0, 1.0], N) * 10.0 ** g.uniform(-8, 8, N))
    options = CombineOptions(rank=6, passes=3, dtype="fp32", engine="ray")
    plain, plain_sums = run(paths, weights, options)

    def first_last(*args):
        if args[3][0].item.name == "adapter000":
            time.sleep(0.5)  # the first shard finishes last (the other CPU runs the others meanwhile)
        return ray_engine.shard_task(*args)

    reversed_order, reversed_sums = run(paths, weights, options, task=first_last)
    serial, serial_sums = run(paths, weights, options, task_options={"num_cpus": 2})
    assert len(plain_sums) == 3
    for result, sums in ((reversed_order, reversed_sums), (serial, serial_sums)):
        same_sums(sums, plain_sums)
        same_bits(result, plain)


def test_a_killed_task_is_retried_with_the_same_result(mixed: tuple[list[Path], list[float]], tmp_path: Path):
    """The worker running pass 2's task of the second shard dies (os._exit) on the task's first attempt; Ray
    runs it again and the result is the one of an undisturbed run (and the local engine's)."""
    paths, weights = mixed
    marker = tmp_path / "killed"
    options = CombineOptions(rank=6, passes=3, dtype="fp32", engine="ray")

    def dies_once(*args):
        pass_no, sources = args[1], args[3]
        if pass_no == 2 and sources[0].item.name == "adapter003":
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # the retry
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
        return ray_engine.shard_task(*args)

    killed, killed_sums = run(paths, weights, options, task=dies_once)
    assert marker.exists()  # the kill happened
    undisturbed, undisturbed_sums = run(paths, weights, options)
    same_sums(killed_sums, undisturbed_sums)
    same_bits(killed, undisturbed)
    local = combine_with(paths, weights, CombineOptions(rank=6, passes=3, dtype="fp32"))
    for n in NAMES:
        assert relative(killed.updates[n].delta(), local.updates[n].delta()) <= 1e-6
    # without retries the same kill fails the run, as a lorafuse error, and nothing is written
    marker.unlink()
    out = tmp_path / "out"
    with pytest.raises(LorafuseError, match="engine 'ray': .*Worker"):
        with pytest.MonkeyPatch.context() as mp:
            real = ray_engine.run_ray
            mp.setattr(ray_engine, "run_ray", lambda plan, o, on_module: real(
                plan, o, on_module, task=dies_once, task_options={"max_retries": 0}))
            combine_to(paths, weights, options, out)
    assert marker.exists() and not out.exists()


def test_an_adapter_changed_between_passes_is_refused_from_the_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    paths = make_adapters(tmp_path / "ad", 6, ranks=(4,))
    real = many._SvdSketch.start

    def start(self: many._SvdSketch, pass_no: int) -> None:
        if pass_no == 2:
            f = paths[4] / "adapter_model.safetensors"
            f.write_bytes(f.read_bytes())  # same bytes, new modification time: a re-download in place
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
        real(self, pass_no)

    monkeypatch.setattr(many._SvdSketch, "start", start)
    out = tmp_path / "out"
    with pytest.raises(InputChangedError, match="adapter 5 .*changed since combine started"):
        combine_to(paths, None, CombineOptions(rank=4, passes=2, engine="ray"), out)
    assert not out.exists()


def test_an_adapter_swapped_for_one_of_the_same_size_and_time_is_refused_from_the_task(tmp_path: Path, at_pass,
                                                                                      swap_in):
    """Tasks on the driver's node read the factor bytes the header pass located (many.Replay) and check the file
    is the one it read: another adapter put in its place with the same size and modification time is refused."""
    paths = make_adapters(tmp_path / "ad", 6, ranks=(4,))
    at_pass(2, lambda: swap_in(paths[1] / "adapter_model.safetensors", paths[2] / "adapter_model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(InputChangedError, match="adapter 2 .*changed since combine started"):
        combine_to(paths, None, CombineOptions(rank=4, passes=2, engine="ray"), out)
    assert not out.exists()


def test_ray_already_running_is_used_and_left_running(mixed: tuple[list[Path], list[float]],
                                                      monkeypatch: pytest.MonkeyPatch):
    """With Ray initialized, run_ray uses it (no init, no shutdown); without, it calls ray.init(address=
    ray_address) and ray.shutdown() at the end (recorded here, the module's Ray standing in for the new one)."""
    paths, weights = mixed
    eight = paths[2::3]  # the adapters of rank 8 (linear takes equal ranks)
    combine_with(eight, None, CombineOptions(method="linear", engine="ray"))
    assert ray.is_initialized()
    calls: list[object] = []

    class Fresh:  # ray as a process that has not initialized it sees it; the rest is the real ray
        def __getattr__(self, name: str) -> object:
            return getattr(ray, name)

        def is_initialized(self) -> bool:
            return False

        def init(self, **kw: object) -> None:
            calls.append(("init", kw))

        def shutdown(self) -> None:
            calls.append("shutdown")

    monkeypatch.setattr(ray_engine, "require_ray", Fresh)
    checked: list[str | None] = []
    monkeypatch.setattr(ray_engine, "_check_reachable", checked.append)  # no cluster at head:10001 here
    combine_with(eight, None, CombineOptions(method="linear", engine="ray", ray_address="ray://head:10001"))
    assert checked == ["ray://head:10001"]  # the address is tried before ray.init
    # quiet (no progress): Ray's own start-up lines are kept off stderr too
    assert calls == [("init", {"address": "ray://head:10001", "logging_level": logging.ERROR, "log_to_driver": False}),
                     "shutdown"]


def test_refusals_before_any_work(mixed: tuple[list[Path], list[float]], monkeypatch: pytest.MonkeyPatch):
    paths, weights = mixed

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(many, "check_sources", no_work)
    loaded = [paths[0], lorafuse.load(paths[1]), *paths[2:]]
    with pytest.raises(UnsupportedError, match=r"adapter 2 \(.*\): an adapter loaded in memory cannot go to Ray"):
        lorafuse.combine(loaded, weights, engine="ray")
    with pytest.raises(LorafuseValueError, match="ray_address applies to engine 'ray'"):
        combine_with(paths, weights, CombineOptions(engine="stream", ray_address="auto"))
    with pytest.raises(LorafuseValueError, match="does not stream"):
        lorafuse.combine(paths, weights, method="ties", density=0.5, engine="ray")
    with pytest.raises(LorafuseValueError, match="exclude each other"):
        lorafuse.combine(paths, weights, exact=True, engine="ray")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(UnsupportedError, match=r"needs Ray.*pip install 'lorafuse\[ray\]'"):
        lorafuse.combine(paths, weights, engine="ray")


def test_shards_and_the_reduction_order_are_fixed_by_n():
    assert ray_engine.shard_bounds(1) == [(0, 1)]
    assert ray_engine.shard_bounds(10) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    bounds = ray_engine.shard_bounds(1000)
    assert len(bounds) == 32 and bounds[0][0] == 0 and bounds[-1][1] == 1000
    assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
    assert {b - a for a, b in bounds} == {31, 32}
    assert ray_engine.tree_sum(lambda x, y: f"({x}+{y})", list("abcde")) == "(((a+b)+(c+d))+e)"
    assert ray_engine.tree_sum(lambda x, y: f"({x}+{y})", ["a"]) == "a"


def test_a_ray_it_started_gives_the_signal_handlers_back(mixed: tuple[list[Path], list[float]]):
    """ray.init replaces the process's SIGTERM handler (its own exits with status 1); once combine has shut down
    the Ray it started, the caller's handlers are back (the CLI's removes the temporary output and exits 143).
    In a child process: this module's Ray is running here."""
    import subprocess
    import textwrap

    paths, _ = mixed
    script = textwrap.dedent(f"""
        import signal
        from lorafuse.ops.combine import CombineOptions, combine_with

        def mine(signum, frame):
            pass

        signal.signal(signal.SIGTERM, mine)
        before_int = signal.getsignal(signal.SIGINT)
        combine_with({[str(p) for p in paths[2::3]]!r}, None, CombineOptions(method="linear", engine="ray"))
        assert signal.getsignal(signal.SIGTERM) is mine, signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is before_int
        print("handlers back")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "handlers back" in done.stdout, done.stderr[-2000:]


def test_the_cli_sends_adapters_given_by_path_to_ray(mixed: tuple[list[Path], list[float]], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]):
    """`lorafuse combine A B C --engine ray`: the CLI loads the adapters (the output's format and name) and
    hands Ray their paths (an Adapter in memory cannot go to a task); the result is the local engine's."""
    from lorafuse.cli import main

    paths, _ = mixed
    three = [str(p) for p in paths[:3]]
    assert main(["combine", *three, "--engine", "ray", "--passes", "3", "--rank", "4", "--dtype", "fp32",
                 "-o", str(tmp_path / "ray")]) == 0
    assert "on Ray" in capsys.readouterr().out
    assert main(["combine", *three, "--engine", "stream", "--passes", "3", "--rank", "4", "--dtype", "fp32", "-q",
                 "-o", str(tmp_path / "local")]) == 0
    on_ray, local = lorafuse.load(tmp_path / "ray"), lorafuse.load(tmp_path / "local")
    for n in NAMES:
        assert relative(on_ray.updates[n].delta(), local.updates[n].delta()) <= 1e-6

"""Red team, round 9: combine over many adapters (--from-list, the streamed engine, the Python API).

1. A relative path in a list is read from the list's folder (docs/cli.md), never from the current directory: a
   Hub-shaped name (`adapters/a0`) missing from the list's folder but present in the current directory was
   combined from there, silently.
2. One stray adapter of another model among adapters of one model was combined into the output (a Llama adapter
   holding a GPT-2 module) as soon as two of the others shared a module: the refusal of adapters that share no
   module and no root held only when no module at all was shared.
3. `--method cat --from-list` refused adapters that share no module, telling the user to use the method cat,
   while the same adapters given as arguments were put side by side as cat promises.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import peft_deltas, peft_folder, run_cli

import lorafuse
from lorafuse.errors import UnsharedModulesError

Q = "model.layers.0.self_attn.q_proj"
GPT2 = "transformer.h.0.attn.c_attn"


def _written(out: Path) -> dict[str, np.ndarray]:
    """The delta of every module of a written PEFT folder, in float64 (peft_deltas, from the files)."""
    return peft_deltas(out)


# ----------------------------------------------------------------------------- 1. relative paths of a list


def test_a_relative_list_path_is_not_read_from_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    peft_folder(tmp_path / "adapters" / "a0", {Q: (12, 10)}, 1)
    peft_folder(tmp_path / "adapters" / "a1", {Q: (12, 10)}, 2)
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "l.txt"
    listing.write_text("adapters/a0\nadapters/a1\n")  # lists/adapters/... does not exist
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub look-up, if any, fails here instead of reaching out
    out = tmp_path / "out"
    code, _, err = run_cli(["combine", "--from-list", "lists/l.txt", "-o", str(out), "-q"])
    assert code != 0 and not out.exists(), err
    assert "line 1" in err and "Traceback" not in err, err


def test_a_relative_list_path_is_read_from_the_lists_folder_whatever_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = peft_folder(tmp_path / "lists" / "adapters" / "a0", {Q: (12, 10)}, 1)
    b = peft_folder(tmp_path / "lists" / "adapters" / "a1", {Q: (12, 10)}, 2)
    peft_folder(tmp_path / "adapters" / "a0", {Q: (12, 10)}, 7)  # same names under the current folder: not read
    peft_folder(tmp_path / "adapters" / "a1", {Q: (12, 10)}, 8)
    (tmp_path / "lists" / "l.txt").write_text("adapters/a0 0.5\nadapters/a1 -2\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(["combine", "--from-list", "lists/l.txt", "-o", str(out), "--method", "cat", "-q"])
    assert code == 0, err
    want = 0.5 * peft_deltas(a)[Q] - 2 * peft_deltas(b)[Q]
    np.testing.assert_allclose(_written(out)[Q], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 2. one stray adapter


@pytest.fixture
def stray(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Two Llama adapters sharing q_proj and a GPT-2 adapter (another model), and a list of the three."""
    paths = [peft_folder(tmp_path / "a", {Q: (12, 10)}, 1), peft_folder(tmp_path / "b", {Q: (12, 10)}, 2),
             peft_folder(tmp_path / "g", {GPT2: (12, 10)}, 3)]
    listing = tmp_path / "l.txt"
    listing.write_text("a\nb\ng\n")
    return listing, paths


@pytest.mark.parametrize("extra", [[], ["--engine", "memory"], ["--passes", "2"], ["--engine", "stream"],
                                   ["--method", "linear"], ["--method", "linear", "--engine", "stream"]])
def test_a_stray_adapter_of_another_model_in_a_list_is_refused_naming_its_line(
        stray: tuple[Path, list[Path]], extra: list[str]) -> None:
    listing, _ = stray
    out = listing.parent / "out"
    code, _, err = run_cli(["combine", "--from-list", str(listing), "-o", str(out), *extra])
    assert code == 1 and not out.exists(), err
    assert "line 3" in err and "share no module" in err and "Traceback" not in err, err


def test_a_stray_adapter_given_as_an_argument_is_refused(stray: tuple[Path, list[Path]]) -> None:
    listing, paths = stray
    out = listing.parent / "out"
    code, _, err = run_cli(["combine", *map(str, paths), "-o", str(out)])
    assert code == 1 and not out.exists(), err
    assert "share no module" in err and str(paths[2]) in err, err


@pytest.mark.parametrize("engine", ["auto", "memory", "stream"])
def test_python_combine_refuses_a_stray_adapter(stray: tuple[Path, list[Path]], engine: str) -> None:
    _, paths = stray
    with pytest.raises(UnsharedModulesError, match="share no module"):
        lorafuse.combine(paths, None, engine=engine)
    with pytest.raises(UnsharedModulesError, match="share no module"):
        lorafuse.combine((p for p in paths), None, engine=engine)  # a generator: the header pass's check


def test_adapters_linked_through_a_third_one_still_combine(tmp_path: Path) -> None:
    """q_proj adapters and an lm_head adapter of one model: the lm_head one shares its root with an adapter that
    has both, so the list is one model (as before, against numpy float64)."""
    a = peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    b = peft_folder(tmp_path / "b", {Q: (12, 10), "lm_head": (20, 10)}, 2)
    c = peft_folder(tmp_path / "c", {"lm_head": (20, 10)}, 3)
    for engine in ("memory", "stream"):
        out = tmp_path / f"out_{engine}"
        lorafuse.combine([a, b, c], [1.0, 0.5, -1.0], engine=engine, rank=8).save(out)
        d = _written(out)
        np.testing.assert_allclose(d[Q], peft_deltas(a)[Q] + 0.5 * peft_deltas(b)[Q], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d["lm_head"], 0.5 * peft_deltas(b)["lm_head"] - peft_deltas(c)["lm_head"],
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- 3. cat of a list


def test_cat_from_a_list_puts_disjoint_adapters_side_by_side_as_from_arguments(tmp_path: Path) -> None:
    a = peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    g = peft_folder(tmp_path / "g", {GPT2: (12, 10)}, 3)
    listing = tmp_path / "l.txt"
    listing.write_text("a 0.5\ng 2\n")
    code, _, err = run_cli(["combine", "--from-list", str(listing), "-o", str(tmp_path / "listed"), "--method",
                            "cat", "-q"])
    assert code == 0, err
    code, _, err = run_cli(["combine", str(a), str(g), "--weights", "0.5,2", "-o", str(tmp_path / "given"),
                            "--method", "cat", "-q"])
    assert code == 0, err
    for out in (tmp_path / "listed", tmp_path / "given"):
        d = _written(out)
        np.testing.assert_allclose(d[Q], 0.5 * peft_deltas(a)[Q], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(d[GPT2], 2 * peft_deltas(g)[GPT2], rtol=1e-6, atol=1e-7)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert sorted(cfg["target_modules"]) == ["c_attn", "q_proj"]


# ----------------------------------------------------------------------------- 4. what `randomized` says


def _mixed(root: Path, n: int = 6) -> list[Path]:
    return [peft_folder(root / f"m{j}", {Q: (64, 48)}, 10 + j, rank=8, alpha=8) for j in range(n)]


@pytest.mark.parametrize(("rank", "oversample"), [(20, 0), (20, 10), (5, 100), (5, 10)])
def test_a_module_left_out_of_randomized_is_the_best_rank_k_approximation(tmp_path: Path, rank: int,
                                                                         oversample: int) -> None:
    """`randomized` lists the modules the streamed svd sketched by k + oversample columns; a module it leaves out
    was sketched whole, so it is the optimum (Eckart-Young, numpy float64). It was computed with the default
    oversample whatever --oversample said: k = 20, oversample 0 came out 1.58x the optimum, said exact; k = 5,
    oversample 100 came out exact, said randomized."""
    paths = _mixed(tmp_path)
    d = sum(peft_deltas(p)[Q] for p in paths)
    sv = np.linalg.svd(d, compute_uv=False)
    optimum = float(np.sqrt(np.sum(sv[rank:] ** 2)))
    got = lorafuse.combine(paths, None, rank=rank, oversample=oversample, passes=2)
    err = float(np.linalg.norm(got.updates[Q].delta() - d))
    whole = 2 * (rank + oversample) >= 48  # sketch_width's rule, as docs/cli.md states it
    assert (Q in got.randomized) == (not whole), (got.randomized, err / optimum)
    if Q not in got.randomized:
        assert err <= optimum * (1 + 1e-4) + 1e-6 * float(np.linalg.norm(d)), (err, optimum)


# ----------------------------------------------------------------------------- 5. a list of blank lines


def test_a_list_of_millions_of_blank_lines_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """A list is read up to 256 MiB: 64 Mi newlines took 87 s and 630 MB (a Python list of every line, each
    looked at in turn). Its lines are now found in the text: memory near the text's size, the numbers kept."""
    import tracemalloc

    from lorafuse.ops.combine.many import read_list

    peft_folder(tmp_path / "a", {Q: (12, 10)}, 1)
    blank = 1 << 20
    listing = tmp_path / "l.txt"
    listing.write_bytes(b"\n" * blank + b"a 0.5\r\nmissing\n")
    tracemalloc.start()
    try:
        with pytest.raises(lorafuse.LorafuseError, match=f"line {blank + 2}: no such file"):
            read_list(listing)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * blank, peak  # the text, its bytes and one copy: not 8 bytes per line on top
    listing.write_bytes(b"\r\n" * blank + b"a 0.5\r")
    sources, weights = read_list(listing)
    assert [s.where for s in sources] == [f"{listing} line {blank + 1}"] and weights == [0.5]

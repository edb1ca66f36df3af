"""Red-team round 6, combining many adapters (`combine --from-list`, lorafuse.combine over iterables, the
streamed and Ray engines): each test fails on the code before its fix.

- `--engine memory` skipped the header pass, so a bad adapter of a list (a shape that differs, adapters of
  different models, a DoRA) was said by its position and path, not by its list line as the other engines say it;
- the streamed engine listed every svd module as `randomized` (report, --json, Adapter.randomized), though a
  module sketched whole (2(k + 10) >= min(out, in)) is the best rank-k approximation, as the docs say;
- bytes paths (documented for every path argument) combined in memory but were refused by the streamed engines,
  and by engine 'auto' given a generator (`adapter 1: expected a path or an Adapter, got bytes`);
- a list path written with shell quoting (`"my lora" 0.5`, `my\\ lora`), or followed by a word that is no weight
  (`lora +-1`), was said to be missing with no word about why, though the path it meant exists;
- an adapter's loading notes (AdapterNote) were printed once per opening: two or three times for one adapter
  (the CLI's format check, the header pass, the in-memory engine);
- `lorafuse.combine(read_list(path))` (the pair, not unpacked) said "expected a path ..., got list [Source(...".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import peft_folder

import lorafuse
from lorafuse.cli import main
from lorafuse.ops.combine import CombineOptions, combine_to, combine_with

SMALL = {"model.layers.0.self_attn.q_proj": (16, 12)}  # rank 2: sketched whole (2 (2 + 10) >= 12)
BIG = {"model.layers.0.mlp.up_proj": (64, 48)}  # rank 2: randomized (24 < 48)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def summed(pairs: list[tuple[Path, float]]) -> dict[str, np.ndarray]:
    """The float64 sum of the weighted deltas (the oracle)."""
    out: dict[str, np.ndarray] = {}
    for p, w in pairs:
        for n, u in lorafuse.load(p).updates.items():
            out[n] = out.get(n, 0.0) + w * np.asarray(u.delta(), np.float64)
    return out


def best(d: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


# ---- --engine memory names the list line, as the other engines ------------------------------------------


@pytest.mark.parametrize("second", ["other_model", "dora"])  # (fan_in_fan_out alone: the same factors, round 7)
@pytest.mark.parametrize("engine", ["memory", "auto"])
def test_engine_memory_names_the_list_line_of_a_bad_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             second: str, engine: str):
    conv1d = {"transformer.h.0.attn.c_attn": (24, 8)}
    peft_folder(tmp_path / "first", conv1d, seed=1, extra={"fan_in_fan_out": True})
    if second == "other_model":
        peft_folder(tmp_path / "bad", {"model.layers.0.self_attn.q_proj": (8, 8)}, seed=2)
    else:
        peft_folder(tmp_path / "bad", conv1d, seed=2, extra={"fan_in_fan_out": True, "use_dora": True},
                    tensors={"base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector":
                             np.ones(24, np.float32)})
    lst = write_list(tmp_path / "list.txt", ["# clients", "first 1", "", "bad 0.5"])
    code, _, err = run_cli(["combine", "--from-list", str(lst), "-o", str(tmp_path / "out"), "--engine", engine],
                           capsys)
    assert code == 1
    assert "list.txt line 4" in err, err
    assert not (tmp_path / "out").exists()


# ---- the streamed engine's `randomized` --------------------------------------------------------------------


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_streamed_randomized_lists_only_modules_not_sketched_whole(tmp_path: Path, passes: int,
                                                                    capsys: pytest.CaptureFixture[str]):
    shapes = {**SMALL, **BIG}
    paths = [peft_folder(tmp_path / f"a{i}", shapes, seed=i, rank=2 + i) for i in range(3)]
    weights = [1.0, -0.5, 2.0]
    lst = write_list(tmp_path / "list.txt", [f"a{i} {w}" for i, w in enumerate(weights)])
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["combine", "--from-list", str(lst), "-o", str(out), "--rank", "2", "--passes",
                               str(passes), "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["engine"] == "stream"
    assert report["randomized"] == ["model.layers.0.mlp.up_proj"]
    # the module said exact is the best rank-2 approximation of the float64 sum
    d = summed(list(zip(paths, weights)))["model.layers.0.self_attn.q_proj"]
    got = lorafuse.load(out).updates["model.layers.0.self_attn.q_proj"].delta()
    assert np.linalg.norm(got - best(d, 2)) <= 1e-5 * np.linalg.norm(d)
    # the Python API's report and result say the same
    options = CombineOptions(method="svd", rank=2, passes=passes)
    assert combine_to(paths, weights, options, tmp_path / "py").randomized == ["model.layers.0.mlp.up_proj"]
    assert combine_with(paths, weights, options).randomized == ["model.layers.0.mlp.up_proj"]


# ---- bytes paths: every engine takes them, as every path argument --------------------------------------------


@pytest.mark.parametrize("engine", ["auto", "memory", "stream"])
def test_bytes_paths_combine_on_every_engine(tmp_path: Path, engine: str):
    paths = [peft_folder(tmp_path / f"a{i}", SMALL, seed=i, rank=2 + i) for i in range(2)]
    weights = [1.0, -0.5]
    # a generator (auto then takes the header pass, as a long list would) of bytes paths
    r = lorafuse.combine((bytes(p) for p in paths), weights, rank=4, engine=engine)
    d = summed(list(zip(paths, weights)))["model.layers.0.self_attn.q_proj"]
    got = r.updates["model.layers.0.self_attn.q_proj"].delta()
    assert np.linalg.norm(got - best(d, 4)) <= 1e-5 * np.linalg.norm(d)


# ---- a list path written with shell quoting -------------------------------------------------------------------


@pytest.mark.parametrize("written", ['"my lora" 0.5', "'my lora' 0.5", "my\\ lora 0.5"])
def test_a_quoted_list_path_says_the_list_takes_paths_as_written(tmp_path: Path, written: str,
                                                                 capsys: pytest.CaptureFixture[str]):
    peft_folder(tmp_path / "my lora", SMALL, seed=1)
    peft_folder(tmp_path / "other", SMALL, seed=2)
    lst = write_list(tmp_path / "list.txt", ["other 1", written])
    code, _, err = run_cli(["combine", "--from-list", str(lst), "-o", str(tmp_path / "out")], capsys)
    assert code == 1
    assert "list.txt line 2" in err and "'my lora' exists" in err and "without quotes" in err, err
    # written plainly, the same line combines
    write_list(lst, ["other 1", "my lora 0.5"])
    code, _, err = run_cli(["combine", "--from-list", str(lst), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("weight", ["+-1", "weight=0.5", "\u221e"])
def test_a_listed_path_with_a_word_that_is_no_weight_says_so(tmp_path: Path, weight: str,
                                                              capsys: pytest.CaptureFixture[str]):
    peft_folder(tmp_path / "lora", SMALL, seed=1)
    lst = write_list(tmp_path / "list.txt", ["# clients", f"lora {weight}"])
    code, _, err = run_cli(["combine", "--from-list", str(lst), "-o", str(tmp_path / "out")], capsys)
    assert code in (1, 2)
    assert "list.txt line 2" in err and "'lora' exists" in err and "no weight" in err, err
    assert not (tmp_path / "out").exists()


# ---- an adapter's loading notes, said once however often combine opens it -------------------------------------


@pytest.mark.parametrize("engine", ["auto", "memory", "stream"])
def test_an_adapters_loading_note_is_said_once(tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: str):
    shapes = {**SMALL, "model.layers.0.self_attn.v_proj": (16, 12)}
    for i in range(2):  # v_proj is stored but not targeted: PEFT ignores it, and loading says so (an AdapterNote)
        peft_folder(tmp_path / f"n{i}", shapes, seed=i, extra={"target_modules": ["q_proj"]})
    lst = write_list(tmp_path / "list.txt", ["n0 1", "n1 -1"])
    code, _, err = run_cli(["combine", "--from-list", str(lst), "-o", str(tmp_path / "out"), "--engine", engine],
                           capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and "n0: ignored 1 module" in notes[0] and "n1: ignored 1 module" in notes[1], notes


# ---- read_list's pair given as the adapters ---------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["auto", "stream"])
def test_read_lists_pair_given_whole_says_to_unpack_it(tmp_path: Path, engine: str):
    from lorafuse.errors import LorafuseValueError
    from lorafuse.ops.combine.many import read_list

    for i in range(2):
        peft_folder(tmp_path / f"a{i}", SMALL, seed=i)
    lst = write_list(tmp_path / "list.txt", ["a0 1", "a1 -0.5"])
    with pytest.raises(LorafuseValueError, match=r"read_list's pair .*\*read_list\(path\)"):
        lorafuse.combine(read_list(lst), rank=2, engine=engine)  # type: ignore[arg-type]
    unpacked = lorafuse.combine(*read_list(lst), rank=2, engine=engine)
    d = summed([(tmp_path / "a0", 1.0), (tmp_path / "a1", -0.5)])["model.layers.0.self_attn.q_proj"]
    got = unpacked.updates["model.layers.0.self_attn.q_proj"].delta()
    assert np.linalg.norm(got - best(d, 2)) <= 1e-5 * np.linalg.norm(d)

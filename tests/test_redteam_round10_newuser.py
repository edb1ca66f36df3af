"""Round 10, a new user: README.md, docs/ and the API's docstrings taken literally, on small files made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hub_fixtures import cache_repo, folder_files, offline_hub
from redteam_fixtures import llm_base, peft_folder, run_cli
from safetensors.numpy import load_file, save_file

import lorafuse

UP = "model.layers.0.mlp.up_proj"
N = 160  # a full-rank difference wider than extract's default sketch of 128 values


def _pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A base and a fine-tuned checkpoint of one N x N weight whose difference has full rank; the difference."""
    w = np.random.default_rng(1).standard_normal((N, N)).astype(np.float32)
    d = np.random.default_rng(2).standard_normal((N, N)).astype(np.float32)
    out = []
    for name, weight in (("base", w), ("ft", w + d)):
        folder = tmp_path / name
        folder.mkdir()
        save_file({f"{UP}.weight": weight}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        out.append(folder)
    delta = load_file(str(out[1] / "model.safetensors"))[f"{UP}.weight"].astype(np.float64) - w.astype(np.float64)
    return out[0], out[1], delta


def test_extract_sv_fro_cut_at_the_default_max_rank_says_so(tmp_path: Path) -> None:
    """extract's docstring: `max_rank` caps every rank and, for the spectrum rules, is how many singular values are
    computed (None: 128). A user asking for sv_fro=0.999 of a difference whose 128 leading values keep less got
    rank 128 with no word: the rule silently unmet. A note now says the default cap stopped it (and none when the
    user gave max_rank, which is what they asked for)."""
    base, ft, delta = _pair(tmp_path)
    s = np.linalg.svd(delta, compute_uv=False)
    assert np.sqrt(np.sum(s[:128] ** 2) / np.sum(s**2)) < 0.999  # float64: 128 values fall short of the rule
    r = lorafuse.extract(base, ft, sv_fro=0.999)
    assert r.ranks == {UP: 128}
    notes = [n for n in r.notes if "--max-rank" in n]
    assert len(notes) == 1 and "128" in notes[0] and "sv-fro 0.999" in notes[0] and UP in notes[0]
    assert "max_rank" in notes[0]  # the Python parameter too
    given = lorafuse.extract(base, ft, sv_fro=0.999, max_rank=128)
    assert given.ranks == {UP: 128} and not [n for n in given.notes if "--max-rank" in n]
    met = lorafuse.extract(base, ft, sv_fro=0.5)
    assert met.ranks[UP] < 128 and not [n for n in met.notes if "--max-rank" in n]


def test_extract_sv_ratio_cut_at_the_default_max_rank_says_so_on_the_cli(tmp_path: Path) -> None:
    base, ft, delta = _pair(tmp_path)
    s = np.linalg.svd(delta, compute_uv=False)
    assert s[127] > s[0] / 1000  # float64: the rule keeps more than 128 values
    code, out, err = run_cli(["extract", str(base), str(ft), "--sv-ratio", "1000", "-o", str(tmp_path / "x")])
    assert code == 0, err
    assert "note:" in err and "--max-rank" in err and "sv-ratio 1000" in err
    code, out, err = run_cli(["extract", str(base), str(ft), "--sv-ratio", "1000", "--max-rank", "128",
                              "-o", str(tmp_path / "y")])
    assert code == 0 and "--max-rank" not in err


@pytest.mark.parametrize("name", lorafuse.__all__)
def test_every_name_of_all_is_importable(name: str) -> None:
    assert getattr(lorafuse, name) is not None


SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8)}


@pytest.fixture
def hub_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache holding the model `org/model`; the current folder an empty `work/` holding an
    adapter for it (`lora/`), and no `org/` folder. The adapter's path."""
    llm_base(tmp_path / "model", SHAPES)
    home = tmp_path / "hf"
    cache_repo(home, "org/model", folder_files(tmp_path / "model"), "c" * 40)
    work = tmp_path / "work"
    offline_hub(monkeypatch, home, work)
    return peft_folder(work / "lora", SHAPES, 3)


@pytest.mark.parametrize("argv", [["info", "./org/model"], ["info", "./org/model", "--json"],
                                  ["apply", "./org/model", "lora", "-o", "merged"]])
def test_a_dot_slash_path_is_a_path_never_the_hub_id_it_looks_like(hub_model: Path, argv: list[str]) -> None:
    """README, Hub ids: "A spec that is not exactly NAMESPACE/NAME[@REVISION] (it starts with `.`, ...) is a path."
    `./org/model`, missing here, was read as the Hub model `org/model` by info and by apply's BASE (the first check
    saw the path, pathlib dropped the `./`, and the checkpoint reader took what was left for a Hub id): a merged
    model of a repository the user did not name. It is a missing path, exit status 1, naming it."""
    code, out, err = run_cli(argv)
    assert code == 1, out + err
    assert "org/model" in err and "no such file or directory" in err and "Hub" not in err
    assert not (hub_model.parent / "merged").exists()
    assert run_cli(["info", "org/model"])[0] == 0  # the id itself is the Hub's


def test_a_dot_slash_path_in_python_is_a_path_too(hub_model: Path) -> None:
    for spec in ("./org/model", "org//model", "org/./model", "org/model/"):  # not exactly an id: a path
        with pytest.raises(lorafuse.FormatError, match="no such file or directory"):
            lorafuse.describe(spec)
    with pytest.raises(lorafuse.FormatError, match="no such file or directory"):
        lorafuse.apply("./org/model", [hub_model], out="merged")
    assert lorafuse.describe("org/model")["type"] == "checkpoint"

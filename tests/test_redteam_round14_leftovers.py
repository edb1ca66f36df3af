"""Round 14, leftovers: small defects earlier rounds left open.

- a recipe given as Python data refused a pathlib.Path model and a numpy number weight;
- another tool's name of a recipe field (kohya's new_rank) was suggested as the nearest spelling (conv_rank);
- a Hub download drew huggingface_hub's own progress bars on stderr under -q / --json / --no-progress.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hub_fixtures import bar_recording_hub
from recipe_fixtures import MODULES, make_adapter
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import RecipeError


def _metadata(out: Path) -> dict[str, str]:
    f = out if out.is_file() else sorted(out.glob("*.safetensors"))[0]
    with safe_open(str(f), "np") as h:
        return dict(h.metadata() or {})


def _tensors(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out if out.is_file() else sorted(out.glob("*.safetensors"))[0]))


# ----------------------------------------------------------------------------- (2) Path and numpy values


def test_python_recipe_takes_paths_and_numpy_numbers(tmp_path: Path):
    a = make_adapter(tmp_path, "a", 4, 4.0, 0)
    b = make_adapter(tmp_path, "b", 4, 8.0, 1)
    plain = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                  {"model": str(b), "parameters": {"weight": 0.25}}]}
    given = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": np.float32(0.5)}},
                                                  {"model": b, "parameters": {"weight": np.array(0.25)}}]}
    lorafuse.run(plain, tmp_path / "out1")
    lorafuse.run(given, tmp_path / "out2")
    t1, t2 = _tensors(tmp_path / "out1"), _tensors(tmp_path / "out2")
    assert t1.keys() == t2.keys() and all(np.array_equal(t1[k], t2[k]) for k in t1)
    # the weights as the numbers given (0.5, 0.25), each input by its path
    inputs = json.loads(_metadata(tmp_path / "out2")["lorafuse.inputs"])
    assert [(i["name"], i["weight"]) for i in inputs] == [(str(a), 0.5), (str(b), 0.25)]


def test_python_recipe_with_an_integer_numpy_weight_and_a_path_base(tmp_path: Path):
    a = make_adapter(tmp_path, "a", 4, 4.0, 0)
    r = lorafuse.run({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": np.int64(1)}}]},
                     tmp_path / "out", dry_run=True)
    assert r is not None


def test_python_recipe_still_refuses_what_yaml_cannot_hold(tmp_path: Path):
    with pytest.raises(RecipeError, match="a complex value cannot be a recipe's"):
        lorafuse.run({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1j}}]},
                     tmp_path / "out", dry_run=True)


# ----------------------------------------------------------------------------- (3) other tools' field names


@pytest.mark.parametrize(("field", "where", "want"), [
    ("new_rank", "parameters", "kohya's new_rank is 'rank' here"),
    ("network_dim", "parameters", "kohya's network_dim is 'rank' here"),
    ("r", "parameters", "PEFT's r is 'rank' here"),
    ("conv_dim", "parameters", "kohya's conv_dim is 'conv_rank' here"),
    ("new_conv_rank", "parameters", "kohya's new_conv_rank is 'conv_rank' here"),
    ("save_precision", "stage", "kohya's save_precision is 'dtype' here"),
])
def test_recipe_field_of_another_tool_names_ours(tmp_path: Path, field: str, where: str, want: str):
    stage: dict[str, object] = {"merge_method": "svd", "models": [{"model": "a"}]}
    if where == "parameters":
        stage["parameters"] = {field: 4}
    else:
        stage[field] = "bf16"
    with pytest.raises(RecipeError) as e:
        lorafuse.run(stage, tmp_path / "out", dry_run=True)
    assert want in str(e.value)
    assert "did you mean" not in str(e.value)


def test_recipe_near_miss_still_suggested(tmp_path: Path):
    with pytest.raises(RecipeError, match=r"did you mean 'weight'"):
        lorafuse.run({"merge_method": "svd", "models": [{"model": "a", "parameters": {"weigth": 1}}]},
                     tmp_path / "out", dry_run=True)


# ----------------------------------------------------------------------------- (4) Hub downloads' bars


@pytest.fixture
def hub_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """org/ad in an offline cache, and snapshot_download drawing a huggingface_hub bar as a real download does:
    the list records whether bars were off during each download."""
    src = make_adapter(tmp_path, "src", 4, 4.0, 0)
    return bar_recording_hub(monkeypatch, tmp_path, src)


@pytest.mark.parametrize("flag", ["-q", "--json"])
def test_hub_download_draws_no_bar_when_quiet(tmp_path: Path, hub_adapter: list[bool],
                                              capsys: pytest.CaptureFixture[str], flag: str):
    from huggingface_hub.utils import are_progress_bars_disabled

    assert main(["resize", "--rank", "2", flag, "-o", str(tmp_path / "out"), "org/ad"]) == 0
    err = capsys.readouterr().err
    assert hub_adapter and all(hub_adapter)  # every download ran with huggingface_hub's bars off
    assert "Fetching files" not in err and "it/s" not in err
    assert not are_progress_bars_disabled()  # and they are back on after it


def test_hub_download_draws_no_bar_with_no_progress(tmp_path: Path, hub_adapter: list[bool],
                                                    capsys: pytest.CaptureFixture[str]):
    base = tmp_path / "base"
    base.mkdir()
    save_file({f"{m}.weight": np.zeros(s, np.float32) for m, s in MODULES.items()}, str(base / "model.safetensors"))
    assert main(["apply", "--no-progress", "-o", str(tmp_path / "out"), str(base), "org/ad"]) == 0
    assert hub_adapter and all(hub_adapter)
    assert "Fetching files" not in capsys.readouterr().err


def test_hub_download_keeps_its_bar_otherwise(tmp_path: Path, hub_adapter: list[bool],
                                              capsys: pytest.CaptureFixture[str]):
    assert main(["resize", "--rank", "2", "-o", str(tmp_path / "out"), "org/ad"]) == 0
    assert hub_adapter and not any(hub_adapter)
    assert "Fetching files" in capsys.readouterr().err

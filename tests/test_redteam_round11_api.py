"""Red-team round 11, the Python API: an Adapter's fields assigned by the caller (`adapter.config = None`,
`adapter.updates = [...]`) are checked when assigned, so that no later operation fails with a bare
AttributeError / TypeError from inside lorafuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import llm_base, peft_folder
from safetensors.numpy import load_file

import lorafuse

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (8, 6)}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return peft_folder(tmp_path / "a", SHAPES, 1)


@pytest.mark.parametrize(("field", "value"), [
    ("config", None), ("config", [("r", 2)]), ("updates", None), ("updates", []), ("full", None),
    ("format", None), ("notes", None), ("derived_from", None), ("path", 5),
])
def test_assigning_a_field_of_the_wrong_type_is_refused_naming_it(folder: Path, field: str, value: object) -> None:
    adapter = lorafuse.load(folder)
    with pytest.raises(lorafuse.LorafuseValueError, match=rf"Adapter\.{field} must be"):
        setattr(adapter, field, value)
    # the adapter is left as it was, and still works
    assert adapter.norm() > 0
    assert len(adapter.state_dict()) == 4


def test_an_update_that_is_not_one_is_refused_when_assigned(folder: Path) -> None:
    adapter = lorafuse.load(folder)
    with pytest.raises(lorafuse.LorafuseValueError, match="Adapter.updates must map module names"):
        adapter.updates = {"model.layers.0.self_attn.q_proj": "junk"}  # type: ignore[dict-item]


@pytest.mark.parametrize("op", ["save", "apply", "combine", "add", "to_rank"])
def test_every_operation_on_an_adapter_whose_config_was_replaced_by_none(folder: Path, tmp_path: Path,
                                                                           op: str) -> None:
    """Before: `adapter.config = None` was taken, and save / apply / combine / + / to_rank then raised
    AttributeError ('NoneType' object has no attribute 'items')."""
    base = llm_base(tmp_path / "base", SHAPES)
    adapter = lorafuse.load(folder)
    with pytest.raises(lorafuse.LorafuseError):
        adapter.config = None  # type: ignore[assignment]
    # what remains is the adapter as loaded: each operation gives what the file gives
    expect = lorafuse.load(folder)
    if op == "save":
        back = lorafuse.load(adapter.save(tmp_path / "s"))
        assert back.norm() == pytest.approx(expect.norm(), rel=1e-6)
    elif op == "apply":
        lorafuse.apply(base, [adapter], out=tmp_path / "m", progress=False)
        lorafuse.apply(base, [expect], out=tmp_path / "m2", progress=False)
        got, want = load_file(str(tmp_path / "m/model.safetensors")), load_file(str(tmp_path / "m2/model.safetensors"))
        assert all(np.array_equal(got[k], want[k]) for k in want)
    elif op == "combine":
        assert lorafuse.combine([adapter, adapter]).norm() == pytest.approx(2 * expect.norm(), rel=1e-5)
    elif op == "add":
        assert (adapter + adapter).norm() == pytest.approx(2 * expect.norm(), rel=1e-5)
    else:
        assert adapter.to_rank(1).norm() == pytest.approx(expect.to_rank(1).norm(), rel=1e-6)


def test_a_str_path_assigned_is_taken_as_a_path(folder: Path, tmp_path: Path) -> None:
    adapter = lorafuse.load(folder)
    adapter.path = str(folder)  # type: ignore[assignment]
    assert adapter.path == folder
    # saving over the adapter's own folder is still refused (its sources() name it)
    with pytest.raises(lorafuse.OutputError):
        adapter.save(folder, overwrite=True)
    assert (folder / "adapter_model.safetensors").is_file()


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(("b", "a", "error"), [
    (np.ones((9, 2), np.float32), np.ones((2, 6), np.float32), lorafuse.ShapeMismatchError),   # wrong out
    (np.ones((8, 3), np.float32), np.ones((2, 6), np.float32), lorafuse.ShapeMismatchError),   # ranks differ
    (np.ones((8, 2), np.float32), np.ones((2, 3, 2), np.float32), lorafuse.ShapeMismatchError),  # wrong in
    (np.ones(8, np.float32), np.ones(6, np.float32), lorafuse.ShapeMismatchError),             # vectors
    (np.ones((8, 0), np.float32), np.ones((0, 6), np.float32), lorafuse.ShapeMismatchError),   # rank 0
    ([[1.0] * 2] * 8, [[1.0] * 6] * 2, lorafuse.LorafuseValueError),                         # lists
    (np.ones((8, 2), np.complex64), np.ones((2, 6), np.complex64), lorafuse.LorafuseValueError),  # complex
    (np.ones((8, 2), np.int32), np.ones((2, 6), np.int32), lorafuse.LorafuseValueError),          # integers
])
def test_with_factors_refuses_what_is_not_a_pair_of_factors_of_the_module(folder: Path, b: object, a: object,
                                                                          error: type) -> None:
    """Before: a bare ValueError ('cannot reshape array of size 18 into shape (8,2)'), an AttributeError for a
    list, and complex factors silently lost their imaginary part (a ComplexWarning); factors of rank 0 were
    taken, and norm() / apply then raised a bare ValueError."""
    update = lorafuse.load(folder).updates[Q]
    with pytest.raises(error, match=Q):
        update.with_factors(b, a)  # type: ignore[arg-type]


def test_with_factors_of_the_module_are_taken_and_saved(folder: Path, tmp_path: Path) -> None:
    adapter = lorafuse.load(folder)
    rng = np.random.default_rng(5)
    b, a = rng.standard_normal((8, 3)), rng.standard_normal((3, 6))  # float64, rank 3 where the file has 2
    adapter.updates[Q] = adapter.updates[Q].with_factors(b, a, scale=0.5)
    back = lorafuse.load(adapter.save(tmp_path / "out"))
    want = 0.5 * b.astype(np.float32).astype(np.float64) @ a.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(np.asarray(back.updates[Q].delta(), np.float64), want, rtol=1e-5, atol=1e-6)
    assert back.updates[Q].rank == 3

"""Red team, round 7, area arith: exact adapter arithmetic and combine's methods, against numpy float64 and the
real PEFT / LyCORIS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redteam_fixtures as rf

import lorafuse

Q = "model.layers.0.q_proj"


def test_a_dense_method_names_the_input_whose_own_dense_delta_overflows(tmp_path: Path) -> None:
    """The *_svd methods form each s_i B_i A_i in float32 before weighting it (as PEFT): an input whose own dense
    delta overflows is named, with advice that holds (a smaller weight does not help), and no numpy RuntimeWarning
    escapes (pytest makes one an error). svd, which weights the factors first, combines the same inputs."""
    small = rf.peft_folder(tmp_path / "small", {Q: (16, 12)}, 1)
    huge = rf.peft_folder(tmp_path / "huge", {Q: (16, 12)}, 2, alpha=4e38)  # scale 2e38, factors ~1: delta > 3.4e38
    weights = [1.0, 1e-30]
    ok = lorafuse.combine([small, huge], weights, method="svd")
    expected = sum(w * lorafuse.load(p).updates[Q].delta() for w, p in zip(weights, (small, huge)))
    assert np.allclose(ok.updates[Q].delta(), expected, rtol=1e-5, atol=1e-6)
    for method in ("ties_svd", "dare_linear_svd", "magnitude_prune_svd"):
        with pytest.raises(lorafuse.NonFiniteError) as err:
            lorafuse.combine([small, huge], weights, method=method, density=0.5)
        text = str(err.value)
        assert "adapter 2" in text and str(huge) in text and "smaller weight does not help" in text, text
        assert "use smaller weights" not in text


def test_a_dense_method_on_the_cli_says_it_in_one_line(tmp_path: Path) -> None:
    """The same from the CLI: exit status 1 and one line on stderr naming the input, no Python warning lines."""
    small = rf.peft_folder(tmp_path / "small", {Q: (16, 12)}, 1)
    huge = rf.peft_folder(tmp_path / "huge", {Q: (16, 12)}, 2, alpha=4e38)
    code, _, err = rf.run_cli(["combine", str(small), str(huge), "--weights", "1,1e-30", "--method", "ties_svd",
                               "--density", "0.5", "-o", str(tmp_path / "out")])
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "adapter 2" in err and "smaller weight does not help" in err and "Warning" not in err, err
    assert not (tmp_path / "out").exists()


def test_norm_of_an_adapter_is_finite_where_its_modules_norms_are(tmp_path: Path) -> None:
    """Adapter.norm() is the Frobenius norm of all deltas together: sqrt of the sum of the squared module norms
    must not overflow where the norm itself is finite (a scale of 5e199: norms near 1e201, squares past
    float64's range), and equals numpy float64's norm of the deltas."""
    shapes = {Q: (16, 12), "model.layers.0.v_proj": (16, 12)}
    folder = rf.peft_folder(tmp_path / "big", shapes, 3, alpha=1e200)
    adapter = lorafuse.load(folder)
    deltas = rf.peft_deltas(folder)  # float64, entries near 1e200: fine; their squares are not
    norms = adapter.norms()
    assert all(np.isfinite(list(norms.values())))
    expected = 1e200 * float(np.linalg.norm([np.linalg.norm(d / 1e200) for d in deltas.values()]))
    assert np.isfinite(expected)
    assert adapter.norm() == pytest.approx(expected, rel=1e-12)
    assert (adapter * 1e-200).norm() == pytest.approx(expected * 1e-200, rel=1e-12)  # the same ratio, small


def test_arithmetic_and_to_rank_name_the_adapter_whose_scale_float32_cannot_hold(tmp_path: Path) -> None:
    """a + b, a - b and to_rank scale the factors by each module's scale in float32: a scale beyond float32 is
    refused naming the adapter's path and the module (not an 'input 2' and 'weights' the caller never gave), and
    the way round it that the message gives works: scaled down first, back up after, the exact result."""
    a = lorafuse.load(rf.peft_folder(tmp_path / "a", {Q: (16, 12)}, 1))
    big_path = rf.peft_folder(tmp_path / "big", {Q: (16, 12)}, 2, alpha=1e39)  # scale 5e38
    big = lorafuse.load(big_path)
    for what, attempt in (("adapter arithmetic", lambda: a + big), ("adapter arithmetic", lambda: big - a),
                          ("rank truncation", lambda: big.to_rank(1))):
        with pytest.raises(lorafuse.LorafuseValueError) as err:
            attempt()
        text = str(err.value)
        assert text.startswith(what) and str(big_path) in text and repr(Q) in text, text
        assert "weight" not in text and "input 2" not in text, text
    c = 1e-10
    total = (a * c + big * c) / c
    d_a, d_big = (rf.peft_deltas(p)[Q] for p in (tmp_path / "a", big_path))
    assert np.allclose(total.updates[Q].delta(), d_a + d_big, rtol=1e-5, atol=1e-6 * np.abs(d_big).max())
    best = (big * c).to_rank(1) / c
    u, s, vt = np.linalg.svd(d_big / 1e38)
    assert np.allclose(best.updates[Q].delta() / 1e38, s[0] * np.outer(u[:, 0], vt[0]), rtol=1e-4, atol=1e-5 * s[0])

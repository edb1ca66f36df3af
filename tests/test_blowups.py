"""Small files that describe huge things (issue #13 §4): a LoKr whose Kronecker product has billions of
elements, a LoHa whose exact factorization is hundreds of megabytes, a Tucker LoCon whose contracted
factor is gigabytes, a header of a million empty tensors, 90 MB of metadata, 60 MB of `{}` as a config.

Structured norms, spectra, inner products and rank-k approximations are checked against numpy float64
on small cases built from the same stored values (dense references); every strategy (Gram matrices,
dense tiles, terms through bilinear forms, randomized range finder) is forced once. The hostile files
run through the real CLI in a subprocess whose peak RSS (getrusage of its own child) and time are
bounded, or fail with the capped error; SIGTERM during a long similarity ends it within two seconds.
"""

from __future__ import annotations

import json
import resource
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lorafuse
import lorafuse.model.limits as limits
import lorafuse.model.spectral as spectral
import lorafuse.ops.combine as combine_mod
from lorafuse.errors import FormatError, UnsupportedError
from lorafuse.io.checkpoint import INDEX_JSON_BYTES, INDEX_JSON_VALUES, read_json
from lorafuse.io.safetensors import read_header
from lorafuse.model.structure import top_products
from lorafuse.ops.rank import RankRule
from lorafuse.ops.resize import resize
from lorafuse.ops.similarity import similarity
from lorafuse.plot import spectra

M = "lora_unet_down_blocks_0_attentions_0_proj_in"
MAX_RSS_MB = 400
MAX_SECONDS = 60


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """float16-exact values (the files store float16), as float64."""
    return (rng.standard_normal(shape) * 0.5).astype(np.float16).astype(np.float64)


def write(path: Path, tensors: dict[str, np.ndarray], alpha: float | None = None) -> Path:
    out = {f"{M}.{k}": v.astype(np.float16) for k, v in tensors.items()}
    if alpha is not None:
        out[f"{M}.alpha"] = np.array(alpha, np.float16)
    save_file(out, str(path))
    return path


# ----------------------------------------------------------------------------- dense references (numpy)


def tucker(core: np.ndarray, w_a: np.ndarray, w_b: np.ndarray) -> np.ndarray:
    """LyCORIS's Tucker rebuild: core (r, r2, kh, kw) x w_a (r, out) on dim 0, x w_b (r2, in) on dim 1."""
    return np.einsum("ijhw,io,jc->ochw", core, w_a, w_b).reshape(w_a.shape[1], -1)


def case(kind: str, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """(stored tensors, the 2-D delta in float64 without the scale, scale) of a small module of `kind`;
    every 2-D delta of the linear kinds is 12 x 20 (the conv kinds: 12 x 8*3*3)."""
    if kind == "lora":
        down, up = rand(rng, 3, 20), rand(rng, 12, 3)
        return {"lora_down.weight": down, "lora_up.weight": up}, up @ down, 1.0
    if kind == "lokr_full":
        w1, w2 = rand(rng, 3, 4), rand(rng, 4, 5)
        return {"lokr_w1": w1, "lokr_w2": w2}, np.kron(w1, w2), 1.0
    if kind == "lokr_other_split":  # the same 12 x 20 cut differently: (2 x 10) (x) (6 x 2)
        w1, w2 = rand(rng, 2, 10), rand(rng, 6, 2)
        return {"lokr_w1": w1, "lokr_w2": w2}, np.kron(w1, w2), 1.0
    if kind == "lokr_factored":
        a1, b1, a2, b2 = rand(rng, 3, 2), rand(rng, 2, 4), rand(rng, 4, 2), rand(rng, 2, 5)
        return ({"lokr_w1_a": a1, "lokr_w1_b": b1, "lokr_w2_a": a2, "lokr_w2_b": b2},
                np.kron(a1 @ b1, a2 @ b2), 1.0)
    if kind == "loha":
        h = [rand(rng, 12, 3), rand(rng, 3, 20), rand(rng, 12, 3), rand(rng, 3, 20)]
        return ({"hada_w1_a": h[0], "hada_w1_b": h[1], "hada_w2_a": h[2], "hada_w2_b": h[3]},
                (h[0] @ h[1]) * (h[2] @ h[3]), 1.0)
    if kind == "loha_rank2":  # another LoHa of the same shape, other ranks: r1 * r2 = 4
        h = [rand(rng, 12, 2), rand(rng, 2, 20), rand(rng, 12, 2), rand(rng, 2, 20)]
        return ({"hada_w1_a": h[0], "hada_w1_b": h[1], "hada_w2_a": h[2], "hada_w2_b": h[3]},
                (h[0] @ h[1]) * (h[2] @ h[3]), 1.0)
    # conv kinds: delta (12, 8, 3, 3), 2-D 12 x 72
    if kind == "locon_tucker":
        down, mid, up = rand(rng, 4, 8, 1, 1), rand(rng, 4, 4, 3, 3), rand(rng, 12, 4, 1, 1)
        d = up.reshape(12, 4) @ np.einsum("ijhw,jc->ichw", mid, down.reshape(4, 8)).reshape(4, -1)
        return {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}, d, 1.0
    if kind == "locon":
        down, up = rand(rng, 5, 8, 3, 3), rand(rng, 12, 5, 1, 1)
        return {"lora_down.weight": down, "lora_up.weight": up}, up.reshape(12, 5) @ down.reshape(5, -1), 1.0
    if kind == "loha_tucker":
        t1, a1, b1 = rand(rng, 3, 3, 3, 3), rand(rng, 3, 12), rand(rng, 3, 8)
        t2, a2, b2 = rand(rng, 3, 3, 3, 3), rand(rng, 3, 12), rand(rng, 3, 8)
        return ({"hada_t1": t1, "hada_w1_a": a1, "hada_w1_b": b1, "hada_t2": t2, "hada_w2_a": a2, "hada_w2_b": b2},
                tucker(t1, a1, b1) * tucker(t2, a2, b2), 1.0)
    if kind == "lokr_tucker":  # w1 (3 x 2) (x) Tucker w2 (4 x 4*3*3)
        w1, t2, a2, b2 = rand(rng, 3, 2), rand(rng, 2, 2, 3, 3), rand(rng, 2, 4), rand(rng, 2, 4)
        return {"lokr_w1": w1, "lokr_t2": t2, "lokr_w2_a": a2, "lokr_w2_b": b2}, np.kron(w1, tucker(t2, a2, b2)), 1.0
    if kind == "lokr_conv":  # full w2 (4, 4, 3, 3)
        w1, w2 = rand(rng, 3, 2), rand(rng, 4, 4, 3, 3)
        return {"lokr_w1": w1, "lokr_w2": w2}, np.kron(w1, w2.reshape(4, -1)), 1.0
    raise AssertionError(kind)


LINEAR = ["lora", "lokr_full", "lokr_other_split", "lokr_factored", "loha", "loha_rank2"]
CONV = ["locon_tucker", "locon", "loha_tucker", "lokr_tucker", "lokr_conv"]


def module(tmp_path: Path, kind: str, seed: int = 0) -> tuple[lorafuse.Adapter, np.ndarray]:
    """The kind's adapter (written and read back as a kohya / LyCORIS file) and its dense 2-D delta."""
    tensors, d, _ = case(kind, np.random.default_rng(seed))
    path = write(tmp_path / f"{kind}_{seed}.safetensors", tensors)
    return lorafuse.load(path), d


# ----------------------------------------------------------------------------- structured math vs numpy


@pytest.mark.parametrize("slowdown", [1e-9, 1e9])  # dense tiles, or Gram matrices / terms
@pytest.mark.parametrize("kind", LINEAR + CONV)
def test_norms_equal_the_dense_float64_norm(tmp_path, monkeypatch, kind, slowdown):
    monkeypatch.setattr(limits, "DENSE_SLOWDOWN", slowdown)
    adapter, d = module(tmp_path, kind)
    assert adapter.norms()[M] == pytest.approx(np.linalg.norm(d), rel=1e-12)
    assert spectral.frobenius_sq(adapter[M]) == pytest.approx(np.sum(d * d), rel=1e-12)


@pytest.mark.parametrize("slowdown", [1e-9, 1e9])  # LoHa: Gram of the dense delta, or of the Khatri-Rao factors
@pytest.mark.parametrize("kind", LINEAR + CONV)
def test_spectra_equal_the_dense_float64_singular_values(tmp_path, monkeypatch, kind, slowdown):
    monkeypatch.setattr(limits, "DENSE_SLOWDOWN", slowdown)
    adapter, d = module(tmp_path, kind)
    ref = np.linalg.svd(d, compute_uv=False)
    got = spectra(adapter)[M]
    assert np.all(np.diff(got) <= 1e-12 * ref[0])  # descending
    n = min(len(got), len(ref))
    np.testing.assert_allclose(got[:n], ref[:n], rtol=0, atol=1e-7 * ref[0])
    assert np.all(ref[n:] <= 1e-7 * ref[0])  # what is left out is zero


@pytest.mark.parametrize("slowdown", [1e-9, 6.0, 1e9])  # dense blocks, the default choice, terms / Gram
@pytest.mark.parametrize("kinds", [LINEAR, CONV])
def test_inner_products_of_every_pair_equal_numpy(tmp_path, monkeypatch, kinds, slowdown):
    monkeypatch.setattr(limits, "DENSE_SLOWDOWN", slowdown)
    mods = [module(tmp_path, k, seed=i) for i, k in enumerate(kinds)]
    for (a, da), ka in zip(mods, kinds):
        for (b, db), kb in zip(mods, kinds):
            got = spectral.inner(a[M], b[M])
            assert got == pytest.approx(np.vdot(da, db), rel=1e-10, abs=1e-12 * np.linalg.norm(da) *
                                        np.linalg.norm(db)), (ka, kb)


def test_similarity_of_mixed_adapters_is_the_numpy_cosine(tmp_path):
    """Adapters of several modules each (LoRA, LoKr, LoHa, Tucker), the same module names, compared as
    wholes: cos = <D_i, D_j> / (||D_i|| ||D_j||) over all modules."""
    rng = np.random.default_rng(7)
    names = [f"lora_unet_down_blocks_0_attentions_{i}_proj_in" for i in range(3)]
    layouts = [("lora", "lokr_full", "loha"), ("lokr_factored", "loha_rank2", "lora"), ("loha", "lora", "lokr_full")]
    paths, flats = [], []
    for j, kinds in enumerate(layouts):
        tensors, deltas = {}, []
        for name, kind in zip(names, kinds):
            t, d, _ = case(kind, rng)
            tensors.update({f"{name}.{k}": v.astype(np.float16) for k, v in t.items()})
            deltas.append(d.ravel())
        path = tmp_path / f"mixed{j}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
        flats.append(np.concatenate(deltas))
    g = np.array([[np.vdot(x, y) for y in flats] for x in flats])
    norms = np.sqrt(np.diag(g))
    np.testing.assert_allclose(similarity(paths), g / np.outer(norms, norms), rtol=1e-10, atol=1e-12)


def test_top_products_are_the_largest_products():
    rng = np.random.default_rng(3)
    for n1, n2, limit in [(7, 5, 10), (1, 9, 4), (30, 40, 1200), (30, 40, 5000), (6, 6, 1)]:
        s1, s2 = np.sort(rng.random(n1))[::-1], np.sort(rng.random(n2))[::-1]
        ref = np.sort(np.outer(s1, s2).ravel())[::-1][:limit]
        np.testing.assert_array_equal(top_products(s1, s2, limit), ref)


def optimum(d: np.ndarray, k: int) -> float:
    return float(np.sqrt(np.sum(np.linalg.svd(d, compute_uv=False)[k:] ** 2)))


@pytest.mark.parametrize("kind", ["lokr_full", "lokr_factored", "lokr_tucker", "lokr_conv", "loha", "loha_tucker"])
def test_rank_k_through_the_structure_is_the_eckart_young_optimum(tmp_path, monkeypatch, kind):
    """LoKr from the SVDs of its halves; LoHa through the Gram matrices of its Khatri-Rao factors (forced
    here on small modules); resize through the same, with its rank rules."""
    monkeypatch.setattr(limits, "SMALL_FACTORS", 0)
    adapter, d = module(tmp_path, kind)
    u = adapter[M]
    for k in (1, 3):
        lora = u.to_lora(k)
        assert lora.rank == min(k, u.rank)
        err = np.linalg.norm(lora.delta().reshape(d.shape) - d)
        assert err == pytest.approx(optimum(d, k), rel=1e-5, abs=1e-6 * np.linalg.norm(d))
    assert u.prefers_structure()
    small, report = resize(adapter, RankRule(sv_fro=0.9), split="sqrt", progress=False)
    s = np.linalg.svd(d, compute_uv=False)
    k = int(np.searchsorted(np.sqrt(np.cumsum(s ** 2) / np.sum(s ** 2)), 0.9 - 1e-12) + 1)
    assert report[0].rank_out == k and report[0].fro_kept == pytest.approx(np.sqrt(np.sum(s[:k] ** 2) /
                                                                                    np.sum(s ** 2)), rel=1e-9)
    err = np.linalg.norm(small[M].delta().reshape(d.shape) - d)
    assert err == pytest.approx(optimum(d, k), rel=1e-5, abs=1e-6 * np.linalg.norm(d))


def test_combine_through_the_structure_is_near_the_optimum(tmp_path, monkeypatch):
    """combine --method svd with LyCORIS terms whose exact factorizations would be large: a randomized SVD
    whose products go through the structures (forced here), within 1e-6 of the optimum of the weighted sum."""
    monkeypatch.setattr(combine_mod, "STRUCTURED_ABOVE", 0)
    rng = np.random.default_rng(11)
    w1, w2 = rand(rng, 6, 8), rand(rng, 8, 8)  # LoKr 48 x 64
    h = [rand(rng, 48, 3), rand(rng, 3, 64), rand(rng, 48, 3), rand(rng, 3, 64)]  # LoHa 48 x 64
    a = write(tmp_path / "a.safetensors", {"lokr_w1": w1, "lokr_w2": w2})
    b = write(tmp_path / "b.safetensors", {"hada_w1_a": h[0], "hada_w1_b": h[1], "hada_w2_a": h[2],
                                           "hada_w2_b": h[3]}, alpha=6.0)  # scale 2
    d = 0.7 * np.kron(w1, w2) - 1.3 * 2.0 * (h[0] @ h[1]) * (h[2] @ h[3])
    for split in ("B", "sqrt"):
        mix = lorafuse.combine([a, b], weights=[0.7, -1.3], rank=5, split=split)
        assert mix.randomized == [M] and mix[M].rank == 5
        err = np.linalg.norm(mix[M].delta() - d)
        assert optimum(d, 5) <= err <= optimum(d, 5) * (1 + 1e-6)


# ----------------------------------------------------------------------------- caps, checked before allocating


def test_dense_intermediates_are_refused_before_allocation(tmp_path):
    rng = np.random.default_rng(1)
    # 256 x 256 (x) 256 x 256: a 65536 x 65536 delta of exact rank 65536 (its factorization: 2^33 elements)
    big = write(tmp_path / "big.safetensors", {"lokr_w1": rand(rng, 256, 256), "lokr_w2": rand(rng, 256, 256)})
    # w1 1 x 1, w2 (40000 x 2)(2 x 40000): the dense w2 a merge would need has 1.6e9 elements
    half = write(tmp_path / "half.safetensors", {"lokr_w1": rand(rng, 1, 1), "lokr_w2_a": rand(rng, 40000, 2),
                                                 "lokr_w2_b": rand(rng, 2, 40000)})
    # lora_mid (4, 4, 128, 128) and a 1x1 lora_down (4, 8192): the contracted factor has 2^29 elements
    tucker_path = write(tmp_path / "tucker.safetensors", {
        "lora_down.weight": rand(rng, 4, 8192, 1, 1), "lora_mid.weight": rand(rng, 4, 4, 128, 128),
        "lora_up.weight": rand(rng, 64, 4, 1, 1)})
    checks = [
        (big, lambda u: u.stored_factors(), ("the exact factorization of this lokr (rank 65536) needs a dense "
                                             "65536 x 131072 array (8,589,934,592 elements)")),
        (big, lambda u: u.delta(), "the dense delta of this lokr needs a dense 65536 x 65536 array"),
        (half, lambda u: u.merge_stage(1.0), ("the second LoKr half (w2) as a dense matrix needs a dense "
                                              "40000 x 40000 array (1,600,000,000 elements)")),
        (tucker_path, lambda u: u.A.f32(), ("the Tucker LoCon factor (lora_mid contracted with lora_down) needs a "
                                            "dense 4 x 8192 x 128 x 128 array (536,870,912 elements)")),
    ]
    for path, op, words in checks:
        u = lorafuse.load(path)[M]
        tracemalloc.start()
        try:
            with pytest.raises(UnsupportedError) as e:
                op(u)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(e.value).startswith(f"{path}: module {M!r}: {words}"), str(e.value)
        assert "more than the 268,435,456 elements (1 GiB of float32)" in str(e.value)
        assert peak < 64 << 20, (words, peak)  # refused before anything of that size was allocated
    # What goes through the structure still works on them, exactly.
    w = lorafuse.load(big)
    u = w[M]
    s1, s2 = (np.linalg.norm(_f16_stored(u.tensors[k])) for k in ("lokr_w1", "lokr_w2"))
    assert w.norms()[M] == pytest.approx(s1 * s2, rel=1e-12)
    t = lorafuse.load(tucker_path)
    down, mid, up = (_f16_stored(t[M].A.down).reshape(4, 8192), _f16_stored(t[M].A.mid).reshape(4, 4, -1),
                     _f16_stored(t[M].B).reshape(64, 4))
    gram_a = np.einsum("ijk,jc,lc,mlk->im", mid, down, down, mid, optimize=True)  # A A^T through the core
    assert t.norms()[M] == pytest.approx(np.sqrt(np.sum((up.T @ up) * gram_a)), rel=1e-10)


def _f16_stored(t: lorafuse.io.tensor.Tensor) -> np.ndarray:
    return t.f32().astype(np.float64)


# ----------------------------------------------------------------------------- the CLI on hostile files


def run_measured(*args: object, timeout: float = 120) -> dict[str, object]:
    """`lorafuse ARGS` in a child of a fresh Python, which reports the child's exit code, peak RSS
    (getrusage of its children: that child only) and wall time."""
    probe = ("import json, resource, subprocess, sys, time\n"
             "t = time.monotonic()\n"
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "print(json.dumps({'rc': p.returncode, 'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss"
             " / 1024, 'seconds': time.monotonic() - t, 'out': p.stdout[-4000:], 'err': p.stderr[-4000:]}))\n")
    cmd = [sys.executable, "-c", probe, sys.executable, "-m", "lorafuse", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(done.stdout)


def hostile_files(tmp: Path) -> dict[str, Path]:
    rng = np.random.default_rng(5)
    out = {}
    # 128 KiB (float32): two full 128 x 128 halves, a 16384 x 16384 delta of exact rank 16384 (its
    # factorization: 2^29 elements; its norm: 13 minutes and 10 GB before)
    path = tmp / "lokr128k.safetensors"
    save_file({f"{M}.lokr_w1": rand(rng, 128, 128).astype(np.float32),
               f"{M}.lokr_w2": rand(rng, 128, 128).astype(np.float32)}, str(path))
    out["lokr128k"] = path
    # 40 KiB: w1 128 x 128, w2 (512 x 4)(4 x 512): a 65536 x 65536 delta
    out["lokr65k"] = write(tmp / "lokr65k.safetensors", {
        "lokr_w1": rand(rng, 128, 128), "lokr_w2_a": rand(rng, 512, 4), "lokr_w2_b": rand(rng, 4, 512)})
    # 3 MiB: a LoHa of rank 32 on 12288 x 12288: Khatri-Rao factorization of rank 1024 (100 MB)
    n, r = 12288, 32
    out["loha"] = write(tmp / "loha.safetensors", {"hada_w1_a": rand(rng, n, r), "hada_w1_b": rand(rng, r, n),
                                                   "hada_w2_a": rand(rng, n, r), "hada_w2_b": rand(rng, r, n)})
    # 2 MiB: a Tucker LoCon whose contracted lora_down is 8 x 4096 x 128 x 128 (2^29 elements)
    out["tucker"] = write(tmp / "tucker.safetensors", {
        "lora_down.weight": rand(rng, 8, 4096, 1, 1), "lora_mid.weight": rand(rng, 8, 8, 128, 128),
        "lora_up.weight": rand(rng, 4096, 8, 1, 1)})
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    return hostile_files(tmp_path_factory.mktemp("hostile"))


# name -> commands that must fail with the capped error (the output itself would pass the cap)
CAPPED = {"tucker": {"convert", "combine", "resize"}}


@pytest.mark.parametrize("name", ["lokr128k", "lokr65k", "loha", "tucker"])
@pytest.mark.parametrize("command", ["info", "info --json", "info --spectrum", "similarity", "convert", "combine",
                                     "resize"])
def test_hostile_files_run_in_bounded_memory_and_time(hostile, tmp_path, name, command):
    path = hostile[name]
    args: list[object] = {
        "info": ["info", path], "info --json": ["info", "--json", path],
        "info --spectrum": ["info", path, "--spectrum", tmp_path / "s.png"],
        "similarity": ["similarity", path, path],
        # --rank for the LoHa / LoKr files; a Tucker LoCon is a LoRA, which convert refuses a --rank for
        "convert": ["convert", path, "--to", "peft", *([] if name == "tucker" else ["--rank", 4]), "-o",
                    tmp_path / "c.safetensors"],
        "combine": ["combine", path, path, "--rank", 4, "-o", tmp_path / "m.safetensors"],
        "resize": ["resize", path, "--rank", 4, "-o", tmp_path / "r.safetensors"],
    }[command]
    res = run_measured(*args)
    assert res["rss_mb"] < MAX_RSS_MB and res["seconds"] < MAX_SECONDS, (name, command, res)
    if command.split()[0] in CAPPED.get(name, ()):
        assert res["rc"] == 1, res
        assert "UnsupportedError" in res["err"] and "more than the 268,435,456 elements (1 GiB of float32)" in \
            res["err"] and f"module {M!r}" in res["err"] and str(path) in res["err"], res
        return
    assert res["rc"] == 0, (name, command, res)
    if command == "info --json":
        (m,) = json.loads(res["out"])["module_details"]
        if name == "lokr128k":  # ||w1 (x) w2|| = ||w1|| ||w2||, in numpy
            w = lorafuse.load(path)[M]
            ref = np.prod([np.linalg.norm(w.tensors[k].f32().astype(np.float64)) for k in ("lokr_w1", "lokr_w2")])
            assert m["delta_norm"] == pytest.approx(ref, rel=1e-12)
            assert m["shape"] == [16384, 16384] and m["rank"] is None  # (round 7: LyCORIS's dim; a LoKr of two
            # full halves has none)
    if command == "similarity":
        assert "1.0000   1.0000" in res["out"]


def test_headers_and_configs_are_capped(tmp_path):
    def safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
        header += b" " * (-len(header) % 8)
        path.write_bytes(struct.pack("<Q", len(header)) + header + data)
        return path

    entry = '"t{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    million = safetensors(tmp_path / "million.safetensors",
                          ("{" + ",".join(entry.format(i) for i in range(1_000_000)) + "}").encode())
    lora = {f"{M}.lora_down.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
            f"{M}.lora_up.weight": {"dtype": "F32", "shape": [2, 1], "data_offsets": [8, 16]}}
    meta = safetensors(tmp_path / "meta.safetensors",
                       json.dumps({"__metadata__": {"big": "a" * (90 << 20)}, **lora}).encode(), bytes(16))
    peft = tmp_path / "peft"
    peft.mkdir()
    safetensors(peft / "adapter_model.safetensors", json.dumps({
        "base_model.model.a.lora_A.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
        "base_model.model.a.lora_B.weight": {"dtype": "F32", "shape": [2, 1], "data_offsets": [8, 16]}}).encode(),
        bytes(16))
    config = '{"peft_type": "LORA", "r": 1, "lora_alpha": 1, "x": [' + ",".join(["{}"] * (20 << 20)) + "]}"
    (peft / "adapter_config.json").write_text(config)  # 60 MiB of {}
    expect = [
        (million, "the header lists 1,000,000 tensors (entries with data_offsets), more than the 262,144"),
        (meta, "__metadata__ holds 94,371,843 bytes of text, more than the 16,777,216"),
        (peft, "adapter_config.json: the adapter config is 62,914,614 bytes, more than the 16,777,216-byte limit"),
    ]
    for path, words in expect:
        res = run_measured("info", path)
        assert res["rc"] == 1 and "FormatError" in res["err"] and words in res["err"], res
        assert res["rss_mb"] < MAX_RSS_MB and res["seconds"] < MAX_SECONDS, res
    # Under the byte limit, over the value limit: 15 MiB of {} is refused before it is parsed.
    (peft / "adapter_config.json").write_text(config[: 15 << 20] + "{}]}")
    with pytest.raises(FormatError, match=r"adapter_config\.json: the adapter config holds about [\d,]+ JSON values "
                                          r"\(counted from its commas and brackets\), more than the 1,048,576"):
        lorafuse.load(peft)
    # A sharded checkpoint's index legitimately lists many tensors: 600,000 entries (28 MB) pass its limits
    # and not a config's.
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {f"model.layers.{i}.weight": "model-1.safetensors"
                                                                 for i in range(600_000)}}))
    assert len(read_json(index, "the shard index", INDEX_JSON_BYTES, INDEX_JSON_VALUES)["weight_map"]) == 600_000
    with pytest.raises(FormatError, match=r"the shard index is [\d,]+ bytes, more than the 16,777,216-byte limit"):
        read_json(index, "the shard index")
    # 50,000 tensors are under the header's limits, and read in proportion to their number (< 1 KB each).
    many = safetensors(tmp_path / "many.safetensors",
                       ("{" + ",".join(entry.format(i) for i in range(50_000)) + "}").encode())
    tracemalloc.start()
    try:
        tensors, _, _ = read_header(many)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(tensors) == 50_000 and peak < 50_000 * 1000, peak


# ----------------------------------------------------------------------------- cancellation


def sigterm_after(delay: float, *args: object) -> tuple[bool, float, int, str]:
    """(still running when signalled, seconds from SIGTERM to exit, exit code, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "lorafuse", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(delay)
        alive = p.poll() is None
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        return alive, time.monotonic() - t, p.returncode, err
    finally:
        if p.poll() is None:
            p.kill()


def test_sigterm_stops_a_long_similarity_within_two_seconds(tmp_path, hostile):
    """Stored LoRA factors go to the core in batches of bounded work; LoHa / LoKr go through Python tiles:
    either way the SIGTERM handler runs within a fraction of a second (before: after the whole batch)."""
    rng = np.random.default_rng(2)
    tensors = {}
    for i in range(16):
        name = f"lora_unet_down_blocks_0_attentions_{i}_proj_in"
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((512, 1024)) * 0.02).astype(np.float16)
        tensors[f"{name}.lora_up.weight"] = (rng.standard_normal((1024, 512)) * 0.02).astype(np.float16)
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    for args in ([plain] * 6 + ["--threads", 1], [hostile["loha"]] * 5):
        alive, seconds, rc, err = sigterm_after(1.5, "similarity", *args)
        assert alive, "the similarity ended before the signal: make it longer"
        assert rc == 143 and "terminated (SIGTERM)" in err, (rc, err)
        assert seconds < 2.0, seconds


def test_rusage_measures_the_child_only():
    """The probe's peak is that of its own child: a child that allocates 300 MB reports about that."""
    probe = ("import resource, subprocess, sys\n"
             "subprocess.run([sys.executable, '-c', 'x = bytearray(300 << 20); x[::4096] = b\"1\" * len(x[::4096])'])\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n")
    peak = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert 300 <= peak < 400
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_json_inside_metadata_is_bounded_by_its_values(tmp_path):
    """diffusers' lora_adapter_metadata and kohya records are JSON inside a metadata string: counted
    before they are parsed, like every JSON file lorafuse reads."""
    from safetensors.numpy import save_file as st_save

    from lorafuse.errors import FormatError

    path = tmp_path / "pytorch_lora_weights.safetensors"
    tensors = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": np.ones((2, 8), np.float32),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": np.ones((8, 2), np.float32)}
    st_save(tensors, str(path), metadata={"lora_adapter_metadata": "[" + "{}," * 1_500_000 + "{}]"})
    with pytest.raises(FormatError, match=r"lora_adapter_metadata'\] holds about [\d,]+ JSON values, more than"):
        lorafuse.load(path)
    st_save(tensors, str(path), metadata={"lora_adapter_metadata": "[" * 100_000})
    with pytest.raises(FormatError, match=r"lora_adapter_metadata'\] is not valid JSON"):
        lorafuse.load(path)

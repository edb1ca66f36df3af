"""Red-team round 4, lorafuse as a Python library (the API's findings, fixed).

1. A set (or a mapping) given as the adapters or the weights is refused in every entry point: its order is its
   elements' hash order, which gave each adapter another's weight (and, for paths, a different model in every
   process). A dict's keys keep their order and are taken.
2. A base given as bytes, or in a folder whose name is not UTF-8, is merged and extracted from (the provenance
   records the name with its bytes as \\xNN) instead of crashing after the work.
3. resize takes torch / numpy dtypes, as apply, combine and extract do.
4. Adapter.to_rank(k) keeps a module whose rank is k or less at its rank, as resize does, never padded.
5. Adapter.save, ops.combine.combine_to and plan_combine give `out` the CLI's meaning (ops.outputs, shared).
6. run(intermediate_dir=), a recipe's path and read_list check their paths (empty refused, bytes taken).
7. The annotations take what docs/api.md documents; typing.get_type_hints(lorafuse.run) resolves.
8. from_state_dict resolves torch's negation / conjugation bits.
9. Errors that name a CLI flag name the Python parameter too.
10. extract's refusal says what include / exclude matched when they leave no module.
11. numpy integers for passes, text options given arrays or lists, overwrite checked without an out.
12. An abandoned open_stream writer closes its file; ops.api's docstring states the reports as they are.

Independent references: deltas in numpy float64 from the factors written here, files read back with the
`safetensors` package, torch's own resolve_neg.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import llm_base, peft_folder
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse import LorafuseValueError, UnsupportedError
from lorafuse.ops.combine import CombineOptions, combine_to
from lorafuse.ops.combine.many import read_list

PREFIX = "base_model.model."
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
LLM = {Q: (12, 10), V: (12, 10)}
UNET = {"unet.down_blocks.0.attentions.0.proj_in": (8, 8), "unet.mid_block.attentions.0.proj_out": (8, 6)}
KOHYA = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k")


# ----------------------------------------------------------------------------- references


def peft_deltas(folder: Path) -> dict[str, np.ndarray]:
    """(lora_alpha / r) B @ A per module of a PEFT folder, in float64, from its files."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = load_file(str(folder / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    return {k[len(PREFIX):-len(".lora_A.weight")]: scale * (t[k.replace("lora_A", "lora_B")].astype(np.float64)
                                                               @ t[k].astype(np.float64))
            for k in t if k.endswith(".lora_A.weight")}


def kohya_deltas(path: Path) -> dict[str, np.ndarray]:
    """(alpha / rank) up @ down per module of a kohya file, in float64, read with safetensors."""
    t = load_file(str(path))
    out = {}
    for k in t:
        if k.endswith(".lora_down.weight"):
            name = k[: -len(".lora_down.weight")]
            down, up = t[k].astype(np.float64), t[f"{name}.lora_up.weight"].astype(np.float64)
            out[name] = float(t[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    return out


def kohya_file(path: Path, seed: int, rank: int = 4) -> Path:
    g = np.random.default_rng(seed)
    t = {}
    for name in KOHYA:
        t[f"{name}.lora_down.weight"] = g.standard_normal((rank, 16)).astype(np.float32)
        t[f"{name}.lora_up.weight"] = g.standard_normal((16, rank)).astype(np.float32)
        t[f"{name}.alpha"] = np.array(2.0, np.float32)
    save_file(t, str(path))
    return path


def module_delta(adapter: lorafuse.Adapter, name: str) -> np.ndarray:
    return np.asarray(adapter[name].delta(), np.float64)


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, Path]:
    return peft_folder(tmp_path / "a", LLM, 1, rank=4, alpha=8), peft_folder(tmp_path / "b", LLM, 2, rank=2, alpha=2)


# ----------------------------------------------------------------------------- 1. sets and mappings


def test_a_set_of_weights_or_of_adapters_is_refused_everywhere(two, tmp_path):
    a, b = map(str, two)
    base = llm_base(tmp_path / "base", LLM)
    ws = {1.0, 0.25}
    calls = {
        "combine weights": lambda: lorafuse.combine([a, b], weights=ws, method="cat"),
        "combine weights (stream)": lambda: lorafuse.combine(iter([a, b]), weights=ws, engine="stream"),
        "combine weights dict": lambda: lorafuse.combine([a, b], weights={1.0: "x", 0.25: "y"}, method="cat"),
        "apply weights": lambda: lorafuse.apply(base, [a, b], weights=ws, out=tmp_path / "m1"),
        "combine_to weights": lambda: combine_to([a, b], ws, CombineOptions(method="cat"), tmp_path / "c1"),
    }
    for what, call in calls.items():
        with pytest.raises(LorafuseValueError, match=r"weights must be .*, not a (set|dict) .*(no order|its keys)"):
            call()
            pytest.fail(what)
    takers = {
        "combine": lambda x: lorafuse.combine(x, weights=[1.0, 0.25], method="cat"),
        "combine (stream)": lambda x: lorafuse.combine(x, engine="stream"),
        "apply": lambda x: lorafuse.apply(base, x, out=tmp_path / "m2"),
        "similarity": lambda x: lorafuse.similarity(x),
        "combine_to": lambda x: combine_to(x, None, CombineOptions(method="cat"), tmp_path / "c2"),
    }
    for kind in (set, frozenset):
        for what, take in takers.items():
            with pytest.raises(LorafuseValueError, match=rf"adapters must be an ordered .*not a {kind.__name__}: a set "
                                                         "has no order"):
                take(kind([a, b]))
                pytest.fail(what)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "base"]  # nothing written


def test_a_dicts_keys_and_values_keep_their_order(two):
    a, b = map(str, two)
    d = {a: 1.0, b: 0.25}
    got = lorafuse.combine(d.keys(), d.values(), method="cat")
    want = {m: 1.0 * peft_deltas(two[0])[m] + 0.25 * peft_deltas(two[1])[m] for m in LLM}
    for m in LLM:
        np.testing.assert_allclose(module_delta(got, m), want[m], rtol=1e-6, atol=1e-6)


def test_plot_labels_as_a_set_are_refused(tmp_path):
    from lorafuse.plot import plot_similarity

    with pytest.raises(LorafuseValueError, match="labels must be a list in the matrix's row order, not a set"):
        plot_similarity(np.eye(2), {"a", "b"}, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


# ----------------------------------------------------------------------------- 2. bytes and non-UTF-8 base paths


def test_apply_and_extract_take_bytes_and_non_utf8_base_paths(two, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/\xff"))  # a folder name that is not UTF-8
    base = llm_base(odd / "base", LLM)
    w = load_file(str(base / "model.safetensors"))
    ft = odd / "ft"
    ft.mkdir()
    shutil.copy(base / "config.json", ft)
    g = np.random.default_rng(5)
    save_file({k: v + (0.1 * g.standard_normal(v.shape)).astype(np.float32) for k, v in w.items()},
              str(ft / "model.safetensors"))
    deltas = peft_deltas(two[0])
    for given, out in ((os.fsencode(base), tmp_path / "m_bytes"), (base, tmp_path / "m_odd")):
        report = lorafuse.apply(given, [two[0]], out=out, progress=False)
        merged = load_file(str(report.out / "model.safetensors"))
        for m in LLM:
            np.testing.assert_allclose(merged[f"{m}.weight"], w[f"{m}.weight"] + deltas[m], rtol=1e-5, atol=1e-5)
        with safe_open(str(report.out / "model.safetensors"), "np") as f:
            recorded = f.metadata()["lorafuse.base_model"]
        assert recorded == str(tmp_path) + "/\\xff/base"  # the byte as \xNN: UTF-8 text
    res = lorafuse.extract(odd / "base", os.fsencode(ft), tmp_path / "ex", rank=2, progress=False)
    cfg = json.loads((res.out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path) + "/\\xff/base"
    assert sorted(res.ranks) == sorted(LLM)


# ----------------------------------------------------------------------------- 3. resize dtype


@pytest.mark.parametrize("dtype, stored, recorded", [(torch.bfloat16, "BF16", "torch.bfloat16"),
                                                     (np.float16, "F16", "float16"),
                                                     (np.dtype("float16"), "F16", "float16")])
def test_resize_takes_torch_and_numpy_dtypes(two, tmp_path, dtype, stored, recorded):
    res = lorafuse.resize(two[0], rank=2, dtype=dtype, out=tmp_path / "r", progress=False)
    with safe_open(str(tmp_path / "r" / "adapter_model.safetensors"), "np") as f:
        meta = f.metadata()
    params = json.loads(meta["lorafuse.parameters"])
    assert params["dtype"] == recorded
    assert {t.dtype for m in res.adapter.updates.values() for t in m.stored_tensors()} == {stored}
    tol = 1e-2 if stored == "BF16" else 2e-3
    for m, d in peft_deltas(two[0]).items():
        u, s, vt = np.linalg.svd(d)
        best = (u[:, :2] * s[:2]) @ vt[:2]
        np.testing.assert_allclose(module_delta(res.adapter, m), best, rtol=0, atol=tol * np.abs(d).max())


# ----------------------------------------------------------------------------- 4. to_rank


def test_to_rank_keeps_the_rank_of_a_module_that_has_less(two):
    b = lorafuse.load(two[1])  # rank 2
    ref = peft_deltas(two[1])
    for k in (2, 16):
        t = b.to_rank(k)
        assert {u.rank for u in t.updates.values()} == {2} and t.config["r"] == 2
        for m in LLM:
            np.testing.assert_allclose(module_delta(t, m), ref[m], rtol=1e-5, atol=1e-5)
            # no zero column was padded in
            assert np.all(np.linalg.norm(t[m].B.f32(), axis=0) > 0)
    doubled = (b + b).to_rank(100)  # a stacked rank of 4 (ranks add up), full rank 10: kept at 4, as resize keeps it
    assert {u.rank for u in doubled.updates.values()} == {4}
    assert set(lorafuse.resize(b + b, rank=100, progress=False).ranks.values()) == {4}
    for m in LLM:
        np.testing.assert_allclose(module_delta(doubled, m), 2 * ref[m], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 5. output names


def test_adapter_save_names_its_output_as_the_cli_does(two, tmp_path):
    mix = lorafuse.combine(list(map(str, two)), rank=2)  # an LLM PEFT adapter: no one-file format names it
    with pytest.raises(LorafuseValueError, match=r"ends in \.safetensors, which names one file.*give a folder name"):
        mix.save(tmp_path / "mixed.safetensors")
    with pytest.raises(LorafuseValueError, match=r"but format='peft' writes a folder"):
        mix.save(tmp_path / "mixed.safetensors", format="peft")
    assert not (tmp_path / "mixed.safetensors").exists()
    k = lorafuse.load(kohya_file(tmp_path / "k.safetensors", 3))
    into = tmp_path / "kdir"
    into.mkdir()
    # a name ending in a separator (the folder there or not), an existing folder: the file goes inside
    for out, folder in ((f"{tmp_path}/new/", tmp_path / "new"), (f"{into}/", into), (into, into)):
        written = k.save(out, overwrite=True)
        assert written == folder / "k.safetensors" and written.is_file()
        got, want = kohya_deltas(written), kohya_deltas(tmp_path / "k.safetensors")
        for name in KOHYA:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
    computed = (k * 2).save(f"{tmp_path}/k2dir/")  # a computed adapter: the first file it comes from names it
    assert computed == tmp_path / "k2dir" / "k.safetensors"
    for name in KOHYA:
        np.testing.assert_allclose(kohya_deltas(computed)[name], 2 * kohya_deltas(tmp_path / "k.safetensors")[name],
                                   rtol=1e-6, atol=1e-6)
    unet = lorafuse.load(peft_folder(tmp_path / "unet", UNET, 4))  # diffusers names: one diffusers file
    with pytest.warns(UserWarning, match=r"ends in \.safetensors: written as one diffusers LoRA file"):
        one = unet.save(tmp_path / "unet.safetensors")
    assert one.is_file()
    with safe_open(str(one), "np") as f:
        assert all(key.startswith("unet.") for key in f.keys())
    again, want = lorafuse.load(one), peft_deltas(tmp_path / "unet")
    for m in UNET:
        np.testing.assert_allclose(module_delta(again, m), want[m], rtol=1e-6, atol=1e-6)


def test_combine_to_names_its_output_as_the_cli_does(two, tmp_path, monkeypatch):
    from lorafuse.ops import combine as ops_combine
    from lorafuse.ops.plan import plan_combine

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a module was computed")

    with monkeypatch.context() as m:  # refused before any module is computed
        m.setattr(ops_combine, "_outputs", boom)
        with pytest.raises(LorafuseValueError, match=r"ends in \.safetensors, which names one file"):
            combine_to(list(map(str, two)), None, CombineOptions(rank=2), tmp_path / "ct.safetensors")
        with pytest.raises(LorafuseValueError, match=r"ends in \.safetensors, which names one file"):
            plan_combine(list(map(str, two)), None, CombineOptions(rank=2), tmp_path / "ct.safetensors")
    assert not (tmp_path / "ct.safetensors").exists()
    k1, k2 = kohya_file(tmp_path / "k.safetensors", 3), kohya_file(tmp_path / "k2.safetensors", 4)
    for engine in ("memory", "stream"):
        out = f"{tmp_path}/ck_{engine}/"
        # svd at the stacked rank 8: the exact sum (the streamed engine's randomized range holds all of it)
        report = combine_to([k1, k2], [1.0, -0.5], CombineOptions(rank=8, engine=engine), out)
        assert report.out == Path(out) / "k.safetensors" and report.out.is_file()
        want = {n: kohya_deltas(k1)[n] - 0.5 * kohya_deltas(k2)[n] for n in KOHYA}
        for n in KOHYA:
            np.testing.assert_allclose(kohya_deltas(report.out)[n], want[n], rtol=0, atol=1e-4 * np.abs(want[n]).max())
    unet = peft_folder(tmp_path / "unet", UNET, 4)
    plan = plan_combine([unet], None, CombineOptions(method="cat"), tmp_path / "u.safetensors")
    assert plan.out == tmp_path / "u.safetensors" and any("diffusers LoRA file" in n for n in plan.notes)
    report = combine_to([unet], None, CombineOptions(method="cat"), tmp_path / "u.safetensors")
    assert report.out.is_file() and any("written as one diffusers LoRA file" in n for n in report.notes)
    assert isinstance(report, lorafuse.AdapterReport)


# ----------------------------------------------------------------------------- 6. run and read_list paths


def _recipe(a: Path, b: Path) -> list[dict[str, object]]:
    return [{"name": "s1", "merge_method": "svd", "models": [{"model": str(a)}, {"model": str(b)}],
             "parameters": {"rank": 6}},
            {"name": "s2", "merge_method": "resize", "models": [{"model": "s1"}], "parameters": {"rank": 1}}]


def test_run_checks_intermediate_dir_and_takes_bytes_paths(two, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    rec = _recipe(*two)
    with pytest.raises(LorafuseValueError, match="intermediate_dir must be a path, got an empty string"):
        lorafuse.run(rec, "out", intermediate_dir="")
    with pytest.raises(LorafuseValueError, match=r"intermediate_dir must be a path \(.*got 1.5"):
        lorafuse.run(rec, "out", intermediate_dir=1.5)
    assert os.listdir(work) == []  # nothing written into the current folder
    report = lorafuse.run(rec, b"out", intermediate_dir=b"keep")
    assert os.listdir(work / "keep") == ["s1"] and (work / report.out / "adapter_model.safetensors").is_file()
    want = {m: peft_deltas(two[0])[m] + peft_deltas(two[1])[m] for m in LLM}  # s1: rank 6, the sum's whole rank
    s1 = lorafuse.load(work / "keep" / "s1")
    for m in LLM:
        np.testing.assert_allclose(module_delta(s1, m), want[m], rtol=1e-4, atol=1e-4 * np.abs(want[m]).max())
    res = subprocess.run([sys.executable, "-m", "lorafuse", "run", str(work / "r.yml"), "-o", "x",
                          "--intermediate-dir", ""], capture_output=True, text=True, cwd=work, timeout=300)
    assert res.returncode == 2 and "intermediate_dir must be a path, got an empty string" in res.stderr


def test_a_recipe_path_and_a_list_file_may_be_bytes(two, tmp_path):
    import yaml

    class BytesPath:
        def __fspath__(self) -> bytes:
            return os.fsencode(tmp_path / "r.yml")

    (tmp_path / "r.yml").write_text(yaml.safe_dump_all(_recipe(*two)))
    for given in (BytesPath(), os.fsencode(tmp_path / "r.yml")):
        plan = lorafuse.run(given, tmp_path / "o", dry_run=True)
        assert [s.verb for s in plan.stages] == ["combine", "resize"]
    with pytest.raises(lorafuse.RecipeError, match="recipe must be a path, got an empty string"):
        lorafuse.run(b"", tmp_path / "o")
    listed = tmp_path / "list.txt"
    listed.write_text(f"{two[0]} 0.5\n{two[1]} 2\n")
    for given in (os.fsencode(listed), listed):
        sources, weights = read_list(given)
        assert [s.path for s in sources] == [two[0], two[1]] and weights == [0.5, 2.0]
    with pytest.raises(LorafuseValueError, match="path must be a path, got an empty string"):
        read_list(b"")


# ----------------------------------------------------------------------------- 7. annotations


def test_the_annotations_take_what_the_docs_promise():
    hints = typing.get_type_hints(lorafuse.run)
    assert bytes in typing.get_args(hints["recipe"]) and bytes in typing.get_args(hints["intermediate_dir"])
    for name in ("load", "detect_format", "describe"):
        assert bytes in typing.get_args(typing.get_type_hints(getattr(lorafuse, name))["path"]), name
    apply = typing.get_type_hints(lorafuse.apply)
    assert typing.get_origin(apply["adapters"]) is typing.get_origin(typing.Iterable[int])
    assert apply["dtype"] is object and typing.get_type_hints(lorafuse.combine)["dtype"] is object
    assert typing.get_type_hints(lorafuse.resize)["dtype"] is object
    assert np.ndarray in [typing.get_origin(t) or t for t in typing.get_args(apply["weights"])] or \
        any("ArrayLike" in str(t) or "_SupportsArray" in str(t) for t in typing.get_args(apply["weights"]))
    assert typing.get_origin(typing.get_type_hints(lorafuse.similarity)["adapters"]) is typing.get_origin(
        typing.Iterable[int])
    typing.get_type_hints(lorafuse.Adapter.save)


# ----------------------------------------------------------------------------- 8. torch's lazy bits


def test_from_state_dict_resolves_negative_and_conjugate_bits():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 10, generator=g), torch.randn(12, 4, generator=g)
    z = torch.randn(4, 10, dtype=torch.complex64, generator=g)
    for lora_a in (a._neg_view(), z.conj().imag):
        assert lora_a.is_neg()  # (the first is contiguous too: .contiguous() keeps the bit)
        ad = lorafuse.Adapter.from_state_dict({f"{PREFIX}{Q}.lora_A.weight": lora_a, f"{PREFIX}{Q}.lora_B.weight": b},
                                              {"r": 4, "lora_alpha": 8})
        want = 2.0 * (b.double().numpy() @ lora_a.resolve_neg().double().numpy())
        np.testing.assert_allclose(module_delta(ad, Q), want, rtol=1e-6, atol=1e-6)
    # a dtype refusal, not numpy()'s RuntimeError: a LorafuseValueError, as docs/api.md says of from_state_dict
    with pytest.raises(lorafuse.LorafuseValueError, match="complex64"):
        lorafuse.Adapter.from_state_dict({f"{PREFIX}{Q}.lora_A.weight": z.conj(), f"{PREFIX}{Q}.lora_B.weight": b})


# ----------------------------------------------------------------------------- 9. the Python parameter named


def test_errors_that_name_a_flag_name_the_python_parameter(two, tmp_path):
    with pytest.raises(LorafuseValueError, match=r"pass --arch .* or --base-config .*\(Python: arch= or base_config="):
        lorafuse.convert(two[0], tmp_path / "x.gguf", to="gguf")
    g = np.random.default_rng(0)
    name = KOHYA[0]
    save_file({f"{name}.hada_w1_a": g.standard_normal((16, 2)).astype(np.float32),
               f"{name}.hada_w1_b": g.standard_normal((2, 16)).astype(np.float32),
               f"{name}.hada_w2_a": g.standard_normal((16, 2)).astype(np.float32),
               f"{name}.hada_w2_b": g.standard_normal((2, 16)).astype(np.float32),
               f"{name}.alpha": np.array(2.0, np.float32)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(UnsupportedError, match=r"pass --rank K .*Python: rank=K"):
        lorafuse.convert(tmp_path / "loha.safetensors", tmp_path / "l.safetensors", to="kohya")
    with pytest.raises(LorafuseValueError, match=r"--max-shard-size splits .* \(Python: max_shard_size=\)"):
        base = llm_base(tmp_path / "base", LLM)
        lorafuse.apply(base, [two[0]], out=tmp_path / "m.safetensors", max_shard_size="1MB")
    try:
        lorafuse.combine([two[0]], device="cuda")
    except lorafuse.DeviceError as e:
        assert "--device cpu (Python: device='cpu')" in str(e)


# ----------------------------------------------------------------------------- 10. extract's include / exclude


def test_extract_says_what_include_and_exclude_matched(tmp_path):
    base = llm_base(tmp_path / "base", LLM)
    ft = tmp_path / "ft"
    ft.mkdir()
    shutil.copy(base / "config.json", ft)
    save_file({k: v + 1 for k, v in load_file(str(base / "model.safetensors")).items()}, str(ft / "model.safetensors"))
    with safe_open(str(base / "model.safetensors"), "np") as f:  # the weight matrices, counted independently
        n = sum(1 for k in f.keys() if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2)
    with pytest.raises(UnsupportedError, match=rf"exclude='\.' matched all {n} weight matrices: no module is left"):
        lorafuse.extract(base, ft, rank=1, exclude=".")
    with pytest.raises(UnsupportedError, match=rf"include='q_proj' matched 1 of the {n} weight matrices and "
                                               r"exclude='layers' matched it: no module is left"):
        lorafuse.extract(base, ft, rank=1, include="q_proj", exclude="layers")
    with pytest.raises(UnsupportedError, match=rf"no module matched include='nomatch' \(none of the {n} weight"):
        lorafuse.extract(base, ft, rank=1, include="nomatch")


# ----------------------------------------------------------------------------- 11. small argument checks


def test_numpy_integer_passes_text_options_and_overwrite_without_out(two, tmp_path):
    paths = list(map(str, two))
    got = lorafuse.combine(paths, rank=2, passes=np.int64(2), seed=3)
    want = lorafuse.combine(paths, rank=2, passes=2, seed=3)
    for m in LLM:
        np.testing.assert_array_equal(module_delta(got, m), module_delta(want, m))
    assert got.provenance.parameters["passes"] == 2
    a = lorafuse.load(two[0])
    arr = np.array(["B", "sqrt"])
    for call, name in ((lambda v: lorafuse.resize(a, rank=2, split=v), "split"),
                       (lambda v: a.to_rank(2, split=v), "split"),
                       (lambda v: lorafuse.combine([a, a], split=v), "split"),
                       (lambda v: lorafuse.combine([a, a], method="ties", density=0.5, majority_sign=v),
                        "majority_sign"),
                       (lambda v: lorafuse.combine([a, a], engine=v), "engine"),
                       (lambda v: lorafuse.convert(two[0], tmp_path / "x.gguf", to="gguf", arch=v), "arch"),
                       (lambda v: lorafuse.convert(two[0], tmp_path / "x.gguf", to=v), "to"),
                       (lambda v: a.state_dict(v), "framework")):
        for v in (arr, np.array("B"), ["B"]):
            with pytest.raises(LorafuseValueError, match=rf"^{name} must be (one of .* \(a str\)|a str), got "):
                call(v)
    with pytest.raises(LorafuseValueError, match="overwrite must be True or False, got 'no'"):
        lorafuse.resize(a, rank=2, overwrite="no")
    with pytest.raises(LorafuseValueError, match="overwrite must be True or False, got None"):
        lorafuse.extract(two[0], two[1], rank=1, overwrite=None)


# ----------------------------------------------------------------------------- 12. an abandoned stream


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_an_abandoned_stream_writer_closes_its_file(two, tmp_path):
    from lorafuse.formats.streaming import open_stream
    from lorafuse.model.layout import AdapterLayout

    a = lorafuse.load(two[0])
    k = lorafuse.load(kohya_file(tmp_path / "k.safetensors", 3))
    gc.collect()
    before = _fds()
    for adapter, out in ((a, tmp_path / "s"), (k, tmp_path / "s.safetensors")) * 3:
        w = open_stream(None, out, AdapterLayout.of(adapter.updates), adapter)
        del w
    gc.collect()
    assert _fds() == before
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "k.safetensors"]  # no output, no temporary left


def test_the_api_docstring_states_the_reports_as_they_are():
    from lorafuse.ops import api

    assert "not yet" not in (api.__doc__ or "")
    r = combine_to.__doc__ or ""
    assert "python_output" in r
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(lorafuse.ops.combine.CombineReport(Path("x"), {}, []), lorafuse.AdapterReport)

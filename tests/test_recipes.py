"""lorafuse run: recipes (YAML, mergekit's field names) against the commands typed by hand and numpy float64.

Checked: a one-stage combine recipe and a two-stage recipe (combine, then apply the result to a base) give the
files the CLI commands give, tensor for tensor and bit for bit, and the values numpy float64 gives; per-model
parameters override the stage's; BASE+ADAPTER; resize and extract stages; schema errors name the line and the
field (a misspelled field, a bad value, a bad merge_method, a duplicated key, YAML that does not parse, stages
that name a later stage); a refused output or a failing stage leaves the output path as it was and no
intermediate folder behind; --print-schema; the Python API with a mapping.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hub_fixtures import cache_repo, folder_files
from recipe_fixtures import MODULES, PREFIX, make_adapter
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import OutputError, RecipeError


def make_base(root: Path, seed: int = 9) -> Path:
    g = np.random.default_rng(seed)
    p = root / "base"
    p.mkdir()
    tensors = {f"{m}.weight": g.standard_normal(shape).astype(np.float32) for m, shape in MODULES.items()}
    tensors["model.embed_tokens.weight"] = g.standard_normal((10, 32)).astype(np.float32)
    save_file(tensors, str(p / "model.safetensors"), metadata={"format": "pt"})
    (p / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    return p


def delta(adapter: Path) -> dict[str, np.ndarray]:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(str(adapter / "adapter_model.safetensors"))
    s = cfg["lora_alpha"] / cfg["r"]
    return {m: s * t[f"{PREFIX}{m}.lora_B.weight"].astype(np.float64) @ t[f"{PREFIX}{m}.lora_A.weight"].astype(
        np.float64) for m in MODULES}


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        out: dict[str, np.ndarray] = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    return load_file(str(path))


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert ta[k].tobytes() == tb[k].tobytes(), k


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    return {"a": make_adapter(tmp_path, "lora-a", 4, 8, 1), "b": make_adapter(tmp_path, "lora-b", 4, 4, 2),
            "c": make_adapter(tmp_path, "lora-c", 2, 2, 3), "base": make_base(tmp_path), "root": tmp_path}


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_one_stage_combine_equals_the_command_and_numpy(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    root = inputs["root"]
    recipe = write(root / "merge.yml", """\
        merge_method: cat
        models:
          - model: lora-a            # relative to the recipe's folder
            parameters: {weight: 0.6}
          - model: lora-b
          - model: lora-c
            parameters: {weight: -0.25}
        parameters: {weight: 0.5}
        dtype: float32
        """)
    assert main(["run", str(recipe), "-o", str(root / "by-recipe")]) == 0
    out = capsys.readouterr().out
    assert "stage 'stage': lorafuse combine" in out
    assert main(["combine", str(inputs["a"]), str(inputs["b"]), str(inputs["c"]), "--method", "cat",
                 "--weights=0.6,0.5,-0.25", "--dtype", "fp32", "-o", str(root / "by-hand")]) == 0
    same_tensors(root / "by-recipe", root / "by-hand")
    # the values: cat is exact, sum_i w_i s_i B_i A_i
    want = {m: 0.6 * delta(inputs["a"])[m] + 0.5 * delta(inputs["b"])[m] - 0.25 * delta(inputs["c"])[m]
            for m in MODULES}
    got = delta(root / "by-recipe")  # read back with safetensors and numpy
    for m in MODULES:
        d = got[m]
        np.testing.assert_allclose(d, want[m], rtol=0, atol=1e-4 * np.abs(want[m]).max())


def test_two_stages_equal_the_two_commands(inputs: dict[str, Path]):
    root = inputs["root"]
    recipe = write(root / "two.yml", f"""\
        name: pooled
        merge_method: svd
        models:
          - model: {inputs['a']}
            parameters: {{weight: 0.7}}
          - model: {inputs['b']}
            parameters: {{weight: 0.3}}
        parameters: {{rank: 6, seed: 7}}
        ---
        name: merged
        merge_method: apply
        base_model: base
        models:
          - model: pooled
            parameters: {{weight: 0.5}}
        """)
    report = lorafuse.run(recipe, root / "merged-by-recipe")
    assert [s.name for s in report.stages] == ["pooled", "merged"]
    assert report.out == root / "merged-by-recipe"
    assert not list(root.glob(".lorafuse-run-*"))  # the intermediate folder is gone
    assert main(["combine", str(inputs["a"]), str(inputs["b"]), "--method", "svd", "--weights=0.7,0.3", "--rank",
                 "6", "--seed", "7", "-q", "-o", str(root / "pooled-by-hand")]) == 0
    assert main(["apply", str(inputs["base"]), str(root / "pooled-by-hand"), "--weights=0.5", "-q",
                 "-o", str(root / "merged-by-hand")]) == 0
    same_tensors(root / "merged-by-recipe", root / "merged-by-hand")
    # and against numpy: W + 0.5 * best rank-6 approximation of 0.7 D_a + 0.3 D_b (rank 8 >= 6: truncated)
    base = load_file(str(inputs["base"] / "model.safetensors"))
    merged = tensors_of(root / "merged-by-recipe")
    for m in MODULES:
        d = 0.7 * delta(inputs["a"])[m] + 0.3 * delta(inputs["b"])[m]
        u, s, vt = np.linalg.svd(d)
        best = (u[:, :6] * s[:6]) @ vt[:6]
        want = base[f"{m}.weight"].astype(np.float64) + 0.5 * best
        np.testing.assert_allclose(merged[f"{m}.weight"], want, rtol=0, atol=2e-5 * np.abs(want).max())
    np.testing.assert_array_equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_kept_intermediates_and_base_plus_adapter(inputs: dict[str, Path]):
    root = inputs["root"]
    recipe = {"merge_method": "apply", "models": [{"model": f"{inputs['base']}+{inputs['a']}"},
                                                  {"model": f"{inputs['base']}+{inputs['c']}",
                                                   "parameters": {"weight": 2.0}}]}
    lorafuse.run(recipe, root / "baked")
    assert main(["apply", str(inputs["base"]), str(inputs["a"]), str(inputs["c"]), "--weights=1,2", "-q",
                 "-o", str(root / "baked-by-hand")]) == 0
    same_tensors(root / "baked", root / "baked-by-hand")
    stages = [{"name": "small", "merge_method": "resize", "models": [{"model": str(inputs["a"])}],
               "parameters": {"rank": 2}},
              {"name": "out", "merge_method": "linear", "models": [{"model": "small"}, {"model": "small"}]}]
    lorafuse.run(stages, root / "lin", intermediate_dir=root / "kept")
    assert (root / "kept" / "small" / "adapter_config.json").exists()  # kept, as asked
    assert main(["resize", str(inputs["a"]), "--rank", "2", "-q", "-o", str(root / "small-by-hand")]) == 0
    same_tensors(root / "kept" / "small", root / "small-by-hand")


def test_extract_stage(inputs: dict[str, Path]):
    root = inputs["root"]
    assert main(["apply", str(inputs["base"]), str(inputs["a"]), "-q", "-o", str(root / "tuned")]) == 0
    recipe = write(root / "x.yml", """\
        merge_method: extract
        base_model: base
        models: [{model: tuned}]
        parameters: {rank: 4, seed: 3}
        """)
    lorafuse.run(recipe, root / "extracted")
    assert main(["extract", str(inputs["base"]), str(root / "tuned"), "--rank", "4", "--seed", "3", "-q",
                 "-o", str(root / "extracted-by-hand")]) == 0
    same_tensors(root / "extracted", root / "extracted-by-hand")
    got = delta(root / "extracted")
    for m in MODULES:  # rank 4 recovers the rank-4 delta
        want = delta(inputs["a"])[m]
        np.testing.assert_allclose(got[m], want, rtol=0, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize(("text", "line", "says"), [
    ("merge_method: svd\nmodels:\n  - model: lora-a\n    parameters: {wieght: 0.5}\n", 4,
     r"models\[0\]\.parameters\.wieght: unknown field \(did you mean 'weight'\?\)"),
    ("merge_method: svd\nmodels:\n  - model: lora-a\nparameters:\n  rank: -3\n", 5,
     r"parameters\.rank: Input should be greater than or equal to 1"),
    ("merge_method: svd\nmodels:\n  - model: lora-a\nparameters:\n  rank: '8'\n", 5, r"parameters\.rank: "),
    ("merge_method: tie\nmodels:\n  - model: lora-a\n", 1, r"merge_method: unknown merge_method 'tie' \(did you "
     r"mean 'ties'\?\)"),
    ("merge_method: svd\nmodels:\n  - model: lora-a\nparameters: {density: 0.5}\n", 4,
     r"parameters\.density: merge_method 'svd' takes no density"),
    ("merge_method: ties\nmodels:\n  - model: lora-a\n    parameters: {density: 0.5}\n  - model: lora-b\n"
     "    parameters: {density: 0.7}\n", 4, r"densities differ \(0\.5, 0\.7\)"),
    ("merge_method: svd\nmodels:\n  - model: lora-a\nmodels:\n  - model: lora-b\n", 4, r"models is given twice "
     r"\(first on line 2\)"),
    ("merge_method: svd\nmodels: [model: lora-a\n", 3, r"not valid YAML"),
    ("merge_method: svd\nmodel:\n  - model: lora-a\n", 2, r"model: unknown field \(did you mean 'models'\?\)"),
    ("name: one\nmerge_method: svd\nmodels: [{model: two}]\n---\nname: two\nmerge_method: svd\n"
     "models: [{model: lora-a}]\n", 3, r"'two' is a later stage \(line 5\)"),
    ("merge_method: svd\nmodels: [{model: lora-a}]\n---\nmerge_method: svd\nmodels: [{model: lora-a}]\n", 1,
     r"names each one"),
    ("merge_method: apply\nmodels: [{model: lora-a}]\n", 1, r"needs base_model"),
    ("merge_method: resize\nmodels: [{model: lora-a}]\n", 1, r"needs exactly one of rank"),
])
def test_schema_errors_name_the_line(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str], text: str,
                                     line: int, says: str):
    root = inputs["root"]
    recipe = root / "bad.yml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match=rf"bad\.yml line {line}\b.*{says}"):
        lorafuse.run(recipe, root / "out")
    assert main(["run", str(recipe), "-o", str(root / "out")]) == 2
    assert f"bad.yml line {line}" in capsys.readouterr().err
    assert not (root / "out").exists()


def test_outputs_are_safe(inputs: dict[str, Path]):
    root = inputs["root"]
    (root / "taken").mkdir()
    (root / "taken" / "mine.txt").write_text("keep")
    recipe = {"merge_method": "cat", "models": [{"model": str(inputs["a"])}]}
    with pytest.raises(OutputError, match="did not write .* holding mine.txt"):
        lorafuse.run(recipe, root / "taken")
    assert (root / "taken" / "mine.txt").read_text() == "keep"
    # a failing second stage: the output is never created, the first stage's output is removed
    bad = [{"name": "one", "merge_method": "cat", "models": [{"model": str(inputs["a"])}]},
           {"name": "two", "merge_method": "apply", "base_model": str(inputs["base"]),
            "models": [{"model": "one"}, {"model": str(root / "missing-lora")}]}]
    with pytest.raises(lorafuse.LorafuseError, match=r"stage 'two' \(apply\).*missing-lora"):
        lorafuse.run(bad, root / "never")
    assert not (root / "never").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".lorafuse")]


def test_print_schema(capsys: pytest.CaptureFixture[str]):
    assert main(["run", "--print-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert {"merge_method", "base_model", "models", "parameters", "dtype"} <= set(schema["properties"])
    methods = schema["properties"]["merge_method"]["anyOf"][0]["enum"]  # (or any case: anyOf[1]'s pattern)
    assert "ties_svd" in methods
    assert "apply" in methods


def files_of(out: Path) -> dict[str, bytes]:
    if out.is_file():
        return {out.name: out.read_bytes()}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_rerun_of_the_recorded_recipe_is_bit_for_bit(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    """Two runs of one two-stage recipe into two folders write the same bytes, model card included; the output
    records the recipe verbatim and the intermediate stage by its name; the recipe read back from the output
    (lorafuse info --json) runs again to the same bytes."""
    import hashlib

    import yaml

    root = inputs["root"]
    text = textwrap.dedent(f"""\
        name: pooled
        merge_method: svd
        models:
          - model: {inputs['a']}
          - model: {inputs['b']}
            parameters: {{weight: -0.5}}
        parameters: {{rank: 4}}
        ---
        name: merged
        merge_method: apply
        base_model: {inputs['base']}
        models: [{{model: pooled}}]
        """)
    recipe = write(root / "rec.yml", text)
    lorafuse.run(recipe, root / "first")
    lorafuse.run(recipe, root / "second")
    first, second = files_of(root / "first"), files_of(root / "second")
    assert "README.md" in first and "model.safetensors" in first
    assert first == second
    from safetensors import safe_open

    with safe_open(str(root / "first" / "model.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["lorafuse.recipe"] == text
    assert meta["lorafuse.operation"] == "apply"
    records = json.loads(meta["lorafuse.inputs"])
    names = [r["name"] for r in records]
    assert "pooled" in names and str(inputs["base"]) in names
    base_record = next(r for r in records if r["name"] == str(inputs["base"]))
    want = hashlib.sha256((inputs["base"] / "model.safetensors").read_bytes()).hexdigest()
    assert want in json.dumps(base_record)
    card = (root / "first" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "lorafuse" in front["tags"]
    assert text.strip() in card
    # the recipe read back from the output runs again, to the same bytes
    assert main(["info", str(root / "first"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    again = write(root / "again.yml", shown["provenance"]["recipe"])
    lorafuse.run(again, root / "third")
    assert files_of(root / "third") == first


def test_dry_run_writes_nothing(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    root = inputs["root"]
    recipe = write(root / "dry.yml", f"""\
        name: pooled
        merge_method: svd
        models: [{{model: {inputs['a']}}}, {{model: {inputs['c']}}}]
        parameters: {{rank: 3}}
        ---
        name: merged
        merge_method: apply
        base_model: {inputs['base']}
        models: [{{model: pooled}}]
        """)
    before = sorted(p.name for p in root.iterdir())
    assert main(["run", str(recipe), "-o", str(root / "never"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 'pooled': lorafuse combine" in out and "--dry-run" in out
    assert "model.layers.0.self_attn.q_proj" in out  # the combine stage's plan lists its modules
    assert "stage 'merged' (apply): planned once 'pooled' has run" in out
    assert sorted(p.name for p in root.iterdir()) == before
    one = write(root / "one.yml", f"merge_method: apply\nbase_model: {inputs['base']}\n"
                                   f"models: [{{model: {inputs['a']}}}]\n")
    report = lorafuse.run(one, root / "never", dry_run=True)
    assert report.dry_run and report.out is None
    assert sorted(p.name for p in root.iterdir()) == sorted([*before, "one.yml"])


def test_hub_ids_in_a_recipe(inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A recipe's model given as org/name and org/name@revision resolves from a Hugging Face cache built here
    (offline), and gives what the local folder gives; the output records the repository and its commit."""
    home = tmp_path / "hf_home"
    commit = "c0ffee" + "0" * 34
    cache_repo(home, "org/lora-b", folder_files(inputs["b"]), commit)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = inputs["root"]
    for spec in ("org/lora-b", f"org/lora-b@{commit}", "org/lora-b@main"):
        out = root / f"hub-{len(spec)}"
        lorafuse.run({"merge_method": "cat", "models": [{"model": str(inputs["a"])}, {"model": spec}]}, out)
        lorafuse.run({"merge_method": "cat", "models": [{"model": str(inputs["a"])}, {"model": str(inputs["b"])}]},
                     root / f"local-{len(spec)}")
        same_tensors(out, root / f"local-{len(spec)}")
        meta = lorafuse.load(out).provenance
        assert meta is not None
        hub = next(i for i in meta.inputs if i.repo_id is not None)
        assert (hub.repo_id, hub.commit) == ("org/lora-b", commit)


def test_recipe_text_is_never_taken_for_an_option(inputs: dict[str, Path]):
    """A model named like an option, or an option value starting with '-', stays what the recipe says it is."""
    root = inputs["root"]
    (root / "taken").mkdir()
    (root / "taken" / "mine.txt").write_text("keep")
    recipe = {"merge_method": "cat", "models": [{"model": str(inputs["a"])}, {"model": "--overwrite"}]}
    with pytest.raises(lorafuse.FormatError, match="--overwrite"):
        lorafuse.run(recipe, root / "taken" / "x")
    assert sorted(p.name for p in (root / "taken").iterdir()) == ["mine.txt"]
    assert main(["apply", str(inputs["base"]), str(inputs["a"]), "-q", "-o", str(root / "tuned")]) == 0
    x = {"merge_method": "extract", "base_model": str(inputs["base"]), "models": [{"model": str(root / "tuned")}],
         "parameters": {"rank": 4, "include": "-q_proj|q_proj"}}
    lorafuse.run(x, root / "only-q")
    assert sorted(lorafuse.load(root / "only-q").updates) == ["model.layers.0.self_attn.q_proj"]


def test_engine_ray_in_a_recipe(inputs: dict[str, Path]):
    """parameters.engine: ray (with passes) runs the stage on a local Ray: the same factors as the local streamed
    engine to float32 rounding, and the output records the engine."""
    root = inputs["root"]
    stage = {"merge_method": "svd", "models": [{"model": str(inputs["a"])}, {"model": str(inputs["b"])}],
             "parameters": {"rank": 4, "passes": 3, "engine": "ray"}, "dtype": "float32"}
    lorafuse.run(stage, root / "on-ray")
    local = dict(stage, parameters={"rank": 4, "passes": 3, "engine": "stream"})
    lorafuse.run(local, root / "local")
    ray_d, local_d = delta(root / "on-ray"), delta(root / "local")
    for m in MODULES:
        assert np.linalg.norm(ray_d[m] - local_d[m]) <= 1e-5 * np.linalg.norm(local_d[m])
    made = lorafuse.load(root / "on-ray").provenance
    assert made is not None and made.parameters["engine"] == "ray"

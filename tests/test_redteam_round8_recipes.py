"""Red-team round 8, recipe files (REPORT of helper "recipes"), each test failing before its fix:

1. a recipe file saved as UTF-16 or UTF-32 (Windows editors, PowerShell's `>`), which YAML allows (it tells the
   encoding from a byte order mark, or from the NUL bytes of the first character), was refused with Python's
   codec words ("'utf-8' codec can't decode byte 0xff in position 0"); a Latin-1 file likewise, naming no line. Now
   UTF-16 / UTF-32 are read, and bytes that are no character are refused at their line and column, saying how to
   save the file; a binary file given as the recipe (an adapter's .safetensors) is said to be one; a byte order
   mark starting a later document (stage files joined) was read as part of its first key.
2. `parameters:` left empty (YAML null), at a stage or at a model, was refused ("expected a mapping ..., got
   null"); mergekit reads it as no parameters (its fields are Optional), and so does lorafuse now (and its printed
   JSON schema says so).
3. a mapping that merges itself (`&p {<<: *p}`) was reported as "its YAML is nested too deeply", naming no line.
4. messages: `models:` left empty said "Input should be a valid list", `rank: 2.0` "Input should be a valid
   integer" without saying what was read; mergekit's `lambda` and `modules` were bare unknown fields.
5. `base_model: base+lora` (mergekit's base with a LoRA merged in) ran the stage, whose verb said that a folder
   named 'base+lora' does not exist; refused at its line, saying what to write.
6. wrong model for a mergekit user: `merge_method: linear` with weights summing to 1 said nothing, and the note
   given otherwise ("give weights that sum to 1 for [mergekit's] average") was untrue: PEFT's linear sums the A and
   the B factors separately, so its delta is far from mergekit's weighted average; the note now says so and names
   cat / svd, which give that average.
7. provenance: recipe text given in Python with \\r\\n line ends was recorded with them (README: "verbatim but with
   \\n line ends"), and a UTF-8 file's byte order mark was recorded as the recipe's first character.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import peft_deltas, recipe_tree
from redteam_fixtures import run_cli as _cli
from redteam_fixtures import write_recipe as _write

import lorafuse
from lorafuse.errors import RecipeError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return recipe_tree(tmp_path)


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _cat(tree: Path, wa: float, wb: float) -> dict[str, np.ndarray]:
    """The weighted sum of adapters a and b's deltas, in float64 (what `cat` writes)."""
    da, db = peft_deltas(tree / "a"), peft_deltas(tree / "b")
    return {m: wa * da[m] + wb * db[m] for m in da}


def _recipe_recorded(file: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(file), "np") as f:
        return str((f.metadata() or {})["lorafuse.recipe"])


def _close(out: Path, want: dict[str, np.ndarray]) -> None:
    got = peft_deltas(out)
    assert got.keys() == want.keys()
    for m in want:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-5 * float(np.abs(want[m]).max()))


# ----------------------------------------------------------------------------- 1. the recipe file's encoding

_TEXT = "# poids: é ü ✓\nmerge_method: cat\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n  - model: b\n" \
        "    parameters: {weight: 2}\n"


@pytest.mark.parametrize("encoding, bom, end", [
    ("utf-16-le", codecs.BOM_UTF16_LE, "\n"), ("utf-16-be", codecs.BOM_UTF16_BE, "\n"),
    ("utf-32-le", codecs.BOM_UTF32_LE, "\n"), ("utf-32-be", codecs.BOM_UTF32_BE, "\n"), ("utf-16-le", b"", "\n"),
    ("utf-16-be", b"", "\n"), ("utf-32-le", b"", "\n"), ("utf-8", codecs.BOM_UTF8, "\n"),
    ("utf-16-le", codecs.BOM_UTF16_LE, "\r\n"),  # Windows PowerShell 5's `Out-File`
])
def test_a_recipe_saved_as_utf16_or_utf32_is_read_as_yaml_reads_it(tree: Path, encoding: str, bom: bytes,
                                                                   end: str) -> None:
    recipe = tree / "r.yml"
    recipe.write_bytes(bom + _TEXT.replace("\n", end).encode(encoding))
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out"), "-q"])
    assert code == 0, (out, err)
    _close(tree / "out", _cat(tree, 0.5, 2.0))
    # the provenance records the recipe's text, not its bytes
    assert _recipe_recorded(tree / "out" / "adapter_model.safetensors") == _TEXT


@pytest.mark.parametrize("raw, line, column", [
    ("merge_method: cat\n# caf\xe9 (Latin-1)\nmodels: [{model: a}]\n".encode("latin-1"), 2, 6),
    ("merge_method: cat\nmodels: [{model: a}]  # \u201cquoted\u201d\n".encode("cp1252"), 2, 25),
    (b"merge_method: cat\nmodels: [{model: a\xff}]\n", 2, 19),
])
def test_a_recipe_that_is_not_utf8_is_refused_at_its_line_naming_the_encoding(tree: Path, raw: bytes, line: int,
                                                                               column: int) -> None:
    recipe = tree / "r.yml"
    recipe.write_bytes(raw)
    before = _listing(tree)
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out")])
    assert code == 1, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err and "codec" not in err and "position" not in err, err
    assert f"r.yml line {line}, column {column}: not UTF-8 text" in err and "save it as UTF-8" in err, err
    assert _listing(tree) == before
    with pytest.raises(RecipeError, match=f"line {line}, column {column}: not UTF-8 text"):
        lorafuse.run(recipe, tree / "out")


def test_a_utf16_recipe_cut_in_the_middle_of_a_character_names_its_line(tree: Path) -> None:
    recipe = tree / "r.yml"
    recipe.write_bytes((codecs.BOM_UTF16_LE + "merge_method: cat\nmodels: [{model: a}]\n".encode("utf-16-le"))[:-1])
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out")])
    assert code == 1 and "r.yml line 2, column 21: not UTF-16 text" in err and "codec" not in err, err


def test_an_adapter_file_given_as_the_recipe_is_said_to_be_binary(tree: Path) -> None:
    code, out, err = _cli(["run", str(tree / "a" / "adapter_model.safetensors"), "-o", str(tree / "out")])
    assert code == 1 and "adapter_model.safetensors: a binary file" in err and "not a recipe" in err, err
    assert "codec" not in err and err.count("\n") == 1 and not (tree / "out").exists()


# ----------------------------------------------------------------------------- 2. `parameters:` left empty


@pytest.mark.parametrize("text, wa, wb", [
    ("merge_method: cat\nmodels:\n  - model: a\n  - model: b\nparameters:\n", 1.0, 1.0),
    ("merge_method: cat\nmodels:\n  - model: a\n    parameters:\n  - model: b\n    parameters: {weight: -1}\n",
     1.0, -1.0),
    ("merge_method: cat\nmodels:\n  - model: a\n    parameters: ~\n  - model: b\nparameters: {weight: 0.25}\n",
     0.25, 0.25),
    ('{"merge_method": "cat", "models": [{"model": "a", "parameters": null}, {"model": "b"}], "parameters": null}',
     1.0, 1.0),
], ids=["stage", "model", "model-tilde", "json"])
def test_empty_parameters_are_no_parameters_as_mergekit_reads_them(tree: Path, text: str, wa: float,
                                                                    wb: float) -> None:
    recipe = _write(tree, text)
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out"), "-q"])
    assert code == 0, (out, err)
    _close(tree / "out", _cat(tree, wa, wb))


def test_empty_parameters_of_a_resize_stage_still_need_a_rank(tree: Path) -> None:
    recipe = _write(tree, "merge_method: resize\nmodels: [{model: a}]\nparameters:\n")
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out")])
    assert code == 2 and "r.yml line 3, parameters: merge_method 'resize' needs exactly one of rank" in err, err


# ----------------------------------------------------------------------------- 3. a mapping that merges itself


@pytest.mark.parametrize("text, line", [
    ("merge_method: cat\nmodels: [{model: a}]\nparameters: &p {weight: 1, <<: *p}\n", 3),
    ("merge_method: cat\nmodels: [{model: a}]\nparameters: &p\n  weight: 1\n  x: &q\n    <<: *p\n  <<: *q\n", 6),
])
def test_a_mapping_that_merges_itself_is_refused_at_the_merge(tree: Path, text: str, line: int) -> None:
    """It was reported as 'its YAML is nested too deeply' (a RecursionError), naming no line."""
    recipe = _write(tree, text)
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out")])
    assert code == 2 and f"r.yml line {line}, column " in err and "cannot merge itself" in err, err
    assert "nested too deeply" not in err and not (tree / "out").exists()


def test_a_mapping_merged_inside_a_field_it_holds_is_still_read(tree: Path) -> None:
    """Not a merge of itself: the inner mapping merges the outer one, whose fields are then only data."""
    recipe = _write(tree, "d: &d {weight: 0.5}\nmerge_method: cat\nmodels:\n  - model: a\n    parameters: {<<: *d}\n"
                          "  - model: b\n    parameters: {<<: [*d], weight: 2}\n")
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out")])
    assert code == 2 and "r.yml line 1, d: unknown field" in err, err  # read: the only error is the extra field
    recipe = _write(tree, "merge_method: cat\nmodels:\n  - model: a\n    parameters: &d {weight: 0.5}\n"
                          "  - model: b\n    parameters: {<<: [*d], weight: 2}\n")
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out"), "-q"])
    assert code == 0, err
    _close(tree / "out", _cat(tree, 0.5, 2.0))


# ----------------------------------------------------------------------------- 4. messages


@pytest.mark.parametrize("text, said", [
    ("merge_method: svd\nmodels:\nparameters: {rank: 2}\n",
     "r.yml line 2, models: expected a list of models (`- model: PATH`, or `[{model: PATH}]`), got null (empty)"),
    ("merge_method: svd\nmodels: {model: a}\nparameters: {rank: 2}\n",
     "r.yml line 2, models: expected a list of models (`- model: PATH`, or `[{model: PATH}]`), got a mapping"),
    ("merge_method: svd\nmodels: [{model: a}, {model: b}]\nparameters: {rank: 2.0}\n",
     "r.yml line 3, parameters.rank: Input should be a valid integer: YAML reads this value as the number 2.0, not "
     "an integer (an integer is written without a point or exponent: 2)"),
    ("merge_method: svd\nmodels: [{model: a}, {model: b}]\nparameters: {rank: 1e3}\n",
     "the number 1000.0, not an integer (an integer is written without a point or exponent: 1000)"),
    ("merge_method: svd\nmodels: [{model: a}, {model: b}]\nparameters: {rank: 1.5}\n",
     "r.yml line 3, parameters.rank: Input should be a valid integer: got the number 1.5"),
    ("merge_method: cat\nmodels: [{model: a}, {model: b}]\nparameters: {lambda: 0.5}\n",
     "r.yml line 3, parameters.lambda: mergekit's field lambda is not supported: it scales the merged delta: "
     "multiply every model's weight by it instead"),
    ("merge_method: cat\nmodels: [{model: a}, {model: b}]\nmodules: {}\n",
     "r.yml line 3, modules: mergekit's field modules is not supported"),
])
def test_a_value_of_the_wrong_kind_says_what_the_recipe_holds(tree: Path, text: str, said: str) -> None:
    recipe = _write(tree, text)
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out")])
    assert code == 2 and said in err and err.count("\n") == 1, err
    assert not (tree / "out").exists()


# ----------------------------------------------------------------------------- 5. base_model as mergekit's BASE+LORA


@pytest.mark.parametrize("text, how", [
    ("merge_method: apply\nbase_model: base+a\nmodels: [{model: b}]\n",
     "give base_model: base and list 'a' among the models"),
    ("merge_method: extract\nbase_model: base+a\nmodels: [{model: b}]\nparameters: {rank: 1}\n",
     "merge 'a' into 'base' in an earlier apply stage"),
])
def test_base_model_written_as_mergekits_base_plus_lora_is_refused_at_its_line(tree: Path, text: str,
                                                                               how: str) -> None:
    """mergekit's `base_model: BASE+LORA` is the base with a LoRA merged in; lorafuse ran the stage and the verb
    said that a folder named 'base+a' does not exist."""
    recipe = _write(tree, text)
    before = _listing(tree)
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out")])
    assert code == 2, (out, err)
    assert "r.yml line 2, base_model: 'base+a' is mergekit's BASE+LORA form" in err and how in err, err
    assert "stage 'stage'" not in err and _listing(tree) == before


def test_an_apply_of_both_adapters_is_what_the_message_advises(tree: Path) -> None:
    """base + delta_a + delta_b, in float64 from the files."""
    from safetensors.numpy import load_file

    recipe = _write(tree, "merge_method: apply\nbase_model: base\nmodels: [{model: a}, {model: b}]\n")
    assert _cli(["run", str(recipe), "-o", str(tree / "out"), "-q"])[0] == 0
    base = load_file(str(tree / "base" / "model.safetensors"))
    got = load_file(str(tree / "out" / "model.safetensors"))
    da, db = peft_deltas(tree / "a"), peft_deltas(tree / "b")
    for m in da:
        want = base[f"{m}.weight"].astype(np.float64) + da[m] + db[m]
        np.testing.assert_allclose(got[f"{m}.weight"], want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- 6. linear is not mergekit's linear


def test_a_linear_stage_whose_weights_sum_to_1_says_it_is_not_mergekits_average(tree: Path) -> None:
    """The note said only 'give weights that sum to 1 for [mergekit's] average', and nothing once they did: but
    PEFT's linear sums the A and the B factors separately, so its delta holds B_a A_b too and is far from the
    average mergekit writes; cat (or svd) gives that average."""
    text = ("merge_method: {m}\nmodels:\n  - model: a\n    parameters: {{weight: 0.5}}\n  - model: b\n"
            "    parameters: {{weight: 0.5}}\n")
    report = lorafuse.run(_write(tree, text.format(m="linear")), tree / "lin")
    said = [n for n in report.notes if "merge_method linear is PEFT's" in n]
    assert len(said) == 1 and "not the weighted sum of the deltas" in said[0] and "cat (exact)" in said[0], said
    want = _cat(tree, 0.5, 0.5)  # mergekit's linear of the two models, less the base
    got = peft_deltas(tree / "lin")
    assert all(np.linalg.norm(got[m] - want[m]) > 0.1 * np.linalg.norm(want[m]) for m in want)  # why it says so
    report = lorafuse.run(_write(tree, text.format(m="cat")), tree / "cat")  # what it advises
    assert not any("linear" in n for n in report.notes)
    _close(tree / "cat", want)
    code, out, err = _cli(["run", str(tree / "r.yml"), "-o", str(tree / "cat2")])
    assert code == 0 and "note:" not in out + err


def test_the_printed_schema_takes_the_empty_parameters_a_run_takes(tree: Path) -> None:
    import json

    import jsonschema
    import yaml

    code, out, err = _cli(["run", "--print-schema"])
    assert code == 0, err
    schema = json.loads(out)
    stage = yaml.safe_load("merge_method: cat\nmodels:\n  - model: a\n    parameters:\n  - model: b\nparameters:\n")
    jsonschema.validate(stage, schema)
    with pytest.raises(jsonschema.ValidationError):  # still a mapping or null
        jsonschema.validate({**stage, "parameters": 3}, schema)


def test_stage_files_saved_with_a_bom_and_joined_run_as_one_recipe(tree: Path) -> None:
    """YAML lets every document of a stream start with a byte order mark; PyYAML read a later one as part of the
    first key ('\\ufeffname': 'not a recipe: ... this mapping has \\ufeffname')."""
    first = codecs.BOM_UTF8 + b"name: s1\nmerge_method: cat\nmodels: [{model: a}]\n"
    second = codecs.BOM_UTF8 + b"name: s2\nmerge_method: resize\nmodels: [{model: s1}]\nparameters: {rank: 1}\n"
    recipe = tree / "r.yml"
    recipe.write_bytes(first + b"---\r\n" + second)
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out"), "-q"])
    assert code == 0, (out, err)
    for m, d in peft_deltas(tree / "a").items():  # the best rank-1 approximation of a's delta
        u, s, vt = np.linalg.svd(d)
        np.testing.assert_allclose(peft_deltas(tree / "out")[m], s[0] * np.outer(u[:, 0], vt[0]), rtol=1e-4,
                                   atol=1e-4 * s[0])
    assert "\ufeff" not in _recipe_recorded(tree / "out" / "adapter_model.safetensors")


def test_recipe_text_given_in_python_is_recorded_with_newline_line_ends(tree: Path, monkeypatch) -> None:
    """README: `lorafuse.recipe` is the recipe 'verbatim but with \\n line ends'; Python text kept \\r\\n."""
    monkeypatch.chdir(tree)
    lorafuse.run("merge_method: cat\r\nmodels:\r\n  - model: a\r\n    parameters: {weight: 0.5}\r\n", tree / "out")
    assert _recipe_recorded(tree / "out" / "adapter_model.safetensors") == \
        "merge_method: cat\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n"
    _close(tree / "out", {m: 0.5 * d for m, d in peft_deltas(tree / "a").items()})

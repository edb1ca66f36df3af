"""Red-team round 9, inputs: what a user or an attacker feeds lorafuse that is not a tensor value (regular
expressions, adapter lists, crafted safetensors headers, odd paths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import PREFIX, llm_base, peft_folder, run_cli, write_recipe
from safetensors.numpy import save_file

HANG_S = 20  # what counts as a hang: every refusal below comes in well under a second

# a module name with a long run of word characters: `(\w|\w)*X` searched in it takes 2^35 steps with `re`
LONG = "model.layers.0.self_attn.q_proj_" + "a" * 30


def _bounded_memory() -> None:
    """In the child: at most 8 GiB of address space, so that reading without bound fails there, not the machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def _lorafuse(argv: list[str], cwd: Path | None = None) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, seconds) of `python -m lorafuse ARGV`, killed after HANG_S."""
    t = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "lorafuse", *argv], capture_output=True, text=True,
                           timeout=HANG_S, cwd=cwd, preexec_fn=_bounded_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"lorafuse {' '.join(argv)[:200]} still ran after {HANG_S} s (a hang)")
    return r.returncode, r.stdout, r.stderr, time.monotonic() - t


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _pair(tmp_path: Path, names: list[str]) -> tuple[Path, Path]:
    """A base checkpoint and a fine-tuned one (other values) of 8x8 float32 weights named `names`."""
    base = llm_base(tmp_path / "base", {n: (8, 8) for n in names})
    ft = tmp_path / "ft"
    ft.mkdir()
    rng = np.random.default_rng(5)
    save_file({f"{n}.weight": rng.standard_normal((8, 8)).astype(np.float32) for n in names},
              str(ft / "model.safetensors"))
    (ft / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return base, ft


# ---- user regular expressions -------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_a_catastrophic_include_or_exclude_is_refused_at_once_naming_it(tmp_path, flag):
    base, ft = _pair(tmp_path, [LONG])
    code, _, err, _ = _lorafuse(["extract", str(base), str(ft), "--rank", "1", flag, r"(\w|\w)*X",
                                 "-o", str(tmp_path / "out")])
    line = _one_line_error(err)
    assert code == 2 and flag in line and r"'(\\w|\\w)*X'" in line and "quantified alternation" in line, line
    assert not (tmp_path / "out").exists()


def test_an_include_of_chained_optionals_is_refused_through_the_api(tmp_path):
    """No quantifier inside a quantifier, yet `a?a?...aaa...` backtracks 2^n ways with `re`."""
    base, ft = _pair(tmp_path, ["model." + "a" * 34 + ".q_proj"])
    code = ("import lorafuse, sys\n"
            "try:\n"
            f"    lorafuse.extract({str(base)!r}, {str(ft)!r}, rank=1, include='a?' * 34 + 'a' * 34 + 'X')\n"
            "except lorafuse.LorafuseValueError as e:\n"
            "    print(e)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    except subprocess.TimeoutExpired:
        pytest.fail("extract(include='a?a?...aaa...X') hung")
    assert "include" in r.stdout and "ways to try a match" in r.stdout, (r.stdout, r.stderr)


def test_a_recipe_include_that_would_hang_is_refused_before_any_stage(tmp_path):
    _pair(tmp_path, [LONG])
    recipe = write_recipe(tmp_path, "merge_method: extract\nbase_model: base\nmodels: [{model: ft}]\n"
                                    "parameters: {rank: 1, exclude: '(\\w|\\w)*X'}\n")
    for dry in ([], ["--dry-run"]):
        code, _, err, _ = _lorafuse(["run", str(recipe), "-o", str(tmp_path / "out"), *dry])
        line = _one_line_error(err)
        assert code == 2 and "r.yml line 4, parameters.exclude" in line and "quantified alternation" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [
    ("target_modules", "model\\." + "a?" * 34 + "a" * 34 + "\\.k_proj"),  # re.fullmatch: 2^34 ways to fail
    ("rank_pattern", {"(a|a)" * 34 + ".*X": 4}),  # (.*\.)?(KEY)$ with re.match
    ("alpha_pattern", {"(?:a|)" * 34 + "q_proj.*Z": 4}),
], ids=["target_modules", "rank_pattern", "alpha_pattern"])
def test_a_peft_pattern_with_exponentially_many_ways_is_refused(tmp_path, field, value):
    extra: dict[str, object] = {field: value}
    if field != "target_modules":
        extra["target_modules"] = ["q_proj"]
    folder = peft_folder(tmp_path / "a", {"model." + "a" * 34 + ".q_proj": (8, 8)}, 1, extra=extra)
    code, _, err, _ = _lorafuse(["info", str(folder)])
    line = _one_line_error(err)
    assert code != 0 and field in line and "ways to try a match" in line, line


def test_ordinary_alternations_stay_allowed_and_match_as_peft_does(tmp_path):
    """Real patterns (a few alternations, an optional prefix) load, and give PEFT's rank / alpha per module."""
    import re

    import lorafuse

    mods = {f"model.layers.{i}.self_attn.{p}": (8, 8) for i in (0, 11) for p in ("q_proj", "v_proj")}
    ranks = {r"(model\.)?layers\.(0|1|2|3|4|5|6|7|8|9|10|11)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)": 2}
    alphas = {r"layers\.(11|12)\.self_attn\.(q_proj|v_proj)": 8.0}
    folder = peft_folder(tmp_path / "a", mods, 1, rank=2, alpha=4,
                         extra={"rank_pattern": ranks, "alpha_pattern": alphas, "target_modules": ["q_proj", "v_proj"]})
    adapter = lorafuse.load(folder)
    for m in mods:
        alpha = next((v for k, v in alphas.items() if re.match(rf"(.*\.)?({k})$", m)), 4)  # PEFT's rule
        assert adapter.updates[m].scale == pytest.approx(alpha / 2), m
    assert {adapter.updates[m].scale for m in mods} == {2.0, 4.0}


def test_extract_include_still_selects_the_modules_re_search_selects(tmp_path):
    import re

    import lorafuse

    names = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj")]
    base, ft = _pair(tmp_path, names)
    pattern = r"layers\.(0|2)\.self_attn\.(q|v)_proj"
    res = lorafuse.extract(base, ft, rank=1, include=pattern, exclude="layers.2.self_attn.v")
    want = sorted(n for n in names if re.search(pattern, n) and not re.search("layers.2.self_attn.v", n))
    assert sorted(res.adapter.updates) == want


# ---- crafted JSON: numbers of thousands of digits ---------------------------------------------------------------


def test_a_header_number_of_thousands_of_digits_is_said_in_a_users_words(tmp_path):
    path = tmp_path / "big.safetensors"
    header = b'{"lora_unet_x.lora_down.weight":{"dtype":"F32","shape":[1' + b"0" * 5000 + b'],"data_offsets":[0,4]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    code, _, err = run_cli(["info", str(path)])
    line = _one_line_error(err)
    assert code == 1 and str(path) in line and "5001 digits" in line, line
    assert "set_int_max_str_digits" not in line, line  # Python's remedy, meaningless to a user of the CLI


def test_a_config_number_of_thousands_of_digits_is_said_in_a_users_words(tmp_path):
    folder = peft_folder(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (8, 8)}, 1)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2' + "0" * 5000 + ', "lora_alpha": 2}')
    code, _, err = run_cli(["info", str(folder)])
    line = _one_line_error(err)
    assert code == 1 and "adapter_config.json" in line and "5001 digits" in line, line
    assert "set_int_max_str_digits" not in line, line


# ---- odd side files and paths ----------------------------------------------------------------------------------


SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8)}


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "nested"])
def test_a_shard_index_that_is_a_fifo_a_device_or_nested_json_is_not_read_through(tmp_path, kind):
    """one_shard looks for an index beside a file named like a shard: a FIFO there hung apply, /dev/zero grew
    memory without bound, JSON nested 100,000 deep was a RecursionError traceback. Such an index names no shard:
    the file is merged as the whole checkpoint it is."""
    from safetensors.numpy import load_file

    adapter = peft_folder(tmp_path / "a", SHAPES, 1)
    base = llm_base(tmp_path / "b", SHAPES)
    shard = base / "model-00001-of-00002.safetensors"
    os.rename(base / "model.safetensors", shard)
    index = base / "model.safetensors.index.json"
    if kind == "fifo":
        os.mkfifo(index)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", index)
    else:
        index.write_text("[" * 100_000 + "]" * 100_000)
    out = tmp_path / "out.safetensors"
    code, _, err, _ = _lorafuse(["apply", str(shard), str(adapter), "-o", str(out)])
    assert code == 0 and "Traceback" not in err, err
    w = load_file(str(shard))["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    t = load_file(str(adapter / "adapter_model.safetensors"))
    a, b = (t[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_{x}.weight"].astype(np.float64) for x in "AB")
    np.testing.assert_allclose(load_file(str(out))["model.layers.0.self_attn.q_proj.weight"], w + b @ a,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("argv", [["info", "{d}/no\nsuch"], ["apply", "{d}/base", "{d}/a\nb", "-o", "{d}/out"],
                                  ["combine", "{d}/x\ny", "{d}/x\ny", "-o", "{d}/out"]])
def test_an_error_naming_a_path_with_a_line_break_stays_one_line(tmp_path, argv):
    llm_base(tmp_path / "base", SHAPES)
    code, _, err = run_cli([a.format(d=tmp_path) for a in argv])
    line = _one_line_error(err)
    assert code == 1 and "\\x0a" in line and "no such file" in line, line


def test_an_include_over_a_hostile_checkpoints_huge_names_is_bounded(tmp_path):
    """`.*a.*Z` is an ordinary pattern, but searched in a 50,000-character tensor name it takes ~n^3 steps: the
    work is estimated and refused, naming the pattern and the name, rather than run for hours."""
    base, ft = _pair(tmp_path, ["model." + "a" * 50_000 + ".q_proj"])
    code, _, err, _ = _lorafuse(["extract", str(base), str(ft), "--rank", "1", "--include", ".*a.*Z",
                                 "-o", str(tmp_path / "out")])
    line = _one_line_error(err)
    assert code == 2 and "--include" in line and "'.*a.*Z'" in line and "backtracking steps" in line, line
    assert len(line) < 1000


def test_a_target_modules_regex_over_eighty_layers_still_loads(tmp_path):
    """Alternations over every layer and projection (80 x 2 x 7 ways) are what real configs hold."""
    import re

    import lorafuse

    layers = "|".join(map(str, range(80)))
    regex = rf".*\.layers\.({layers})\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    mods = {"model.layers.79.self_attn.q_proj": (8, 8), "model.layers.3.mlp.up_proj": (8, 8)}
    folder = peft_folder(tmp_path / "a", mods, 1, extra={"target_modules": regex})
    adapter = lorafuse.load(folder)
    assert sorted(adapter.updates) == sorted(m for m in mods if re.fullmatch(regex, m))


def test_an_include_of_several_wildcards_is_still_taken(tmp_path):
    """`.*self_attn.*q.*` (three repeating quantifiers, no nesting) was taken before the checks, and still is."""
    import re

    import lorafuse

    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj")] + \
        ["model.layers.0.mlp.up_proj"]
    base, ft = _pair(tmp_path, names)
    pattern = r".*self_attn.*q.*"
    res = lorafuse.extract(base, ft, rank=1, include=pattern)
    assert sorted(res.adapter.updates) == sorted(n for n in names if re.search(pattern, n))


def test_a_base_config_that_is_a_fifo_is_said_to_be_one(tmp_path):
    """`--base-config FOLDER` whose config.json is a FIFO was "no config.json there": it is there, and not a file."""
    adapter = peft_folder(tmp_path / "a", SHAPES, 1)
    base = llm_base(tmp_path / "b", SHAPES)
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")
    code, _, err, _ = _lorafuse(["convert", str(adapter), "--to", "gguf", "--base-config", str(base),
                                 "-o", str(tmp_path / "x.gguf")])
    line = _one_line_error(err)
    assert code == 1 and "config.json" in line and "FIFO" in line and "no config.json there" not in line, line
    assert not (tmp_path / "x.gguf").exists()


def test_an_include_listing_many_names_is_still_taken(tmp_path):
    """extract's own hint for several names is to join them with '|': forty full names make a pattern of over
    1000 characters (PEFT's limit for its patterns), which an include is not held to."""
    import re

    import lorafuse

    names = [f"model.layers.{i}.self_attn.{p}" for i in range(20) for p in ("q_proj", "v_proj")]
    base, ft = _pair(tmp_path, names + ["model.layers.0.mlp.up_proj"])
    pattern = "|".join(re.escape(n) for n in names)
    assert len(pattern) > 1000
    res = lorafuse.extract(base, ft, rank=1, include=pattern)
    assert sorted(res.adapter.updates) == sorted(names)


@pytest.mark.parametrize("argv", [["resize", "{k}", "--rank", "{big}"], ["combine", "{k}", "{k}", "--seed", "{big}"],
                                  ["resize", "{k}", "--sv-ratio", "{big}"], ["combine", "{k}", "{k}", "--weights",
                                                                             "{big},1"]])
def test_an_option_value_of_thousands_of_digits_is_not_echoed_whole(tmp_path, argv):
    k = tmp_path / "k.safetensors"
    big = "9" * 5000
    code, _, err = run_cli([a.format(k=k, big=big) for a in argv] + ["-o", str(tmp_path / "out")])
    last = err.strip().splitlines()[-1]
    assert code == 2 and ",00" in last and " characters)" in last and len(last) < 400, last[:400]

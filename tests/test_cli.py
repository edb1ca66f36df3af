"""The `lorafuse` command line: apply and info, checked against numpy float64, torch, the
safetensors package, transformers and PEFT; plus exit codes, messages and --help.

Most calls go through `lorafuse.cli.main([...])` in-process; one apply (and one error)
runs `python -m lorafuse` in a subprocess to prove the entry point.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_tools import tree_hashes
from peft_fixtures import Case, another_adapter, llama_case
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch
from transformers import LlamaForCausalLM

import lorafuse
from lorafuse.cli import main

PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json")
EPS32 = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- helpers


def adapter_factors(adapter_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, int]:
    """{module: (A, B)} in float64 from the raw adapter file, plus scale = lora_alpha / r and r."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / ADAPTER_FILE))
    modules: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            m = key[len(PREFIX): -len(".lora_A.weight")]
            modules[m] = (tensors[key].astype(np.float64),
                          tensors[f"{PREFIX}{m}.lora_B.weight"].astype(np.float64))
    assert len(modules) * 2 == len(tensors)
    return modules, cfg["lora_alpha"] / cfg["r"], cfg["r"]


def run_main(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_exit(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """For argparse's own exits (errors, --help, --version)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def summary_pattern(out: Path, merged: int, tensors: int) -> str:
    return rf"^merged {merged} weights; wrote {tensors} tensors \([\d.]+ (B|KiB|MiB)\) to {re.escape(str(out))} " \
           rf"in [\d.]+ s$"


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place, sign-aware (bits mapped onto a monotonic integer line)."""
    def line(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (line(a) - line(b)).abs()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    c = llama_case(tmp_path_factory.mktemp("llama"), seed=11)
    # A fake tokenizer file: non-weight files must be copied to the output.
    (c.base_dir / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    return c


@pytest.fixture(scope="module")
def second_adapter(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another adapter for the same base: same modules, new random factors of rank 2, lora_alpha 6 (scale 3)."""
    return another_adapter(case, tmp_path_factory.mktemp("second") / "adapter2", rank=2, alpha=6, seed=12)


@pytest.fixture(scope="module")
def api_out(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the Python API writes for the first adapter alone."""
    out = tmp_path_factory.mktemp("api") / "merged"
    lorafuse.apply(case.base_dir, [case.adapter_dir], out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def sharded_out(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "merged"
    assert main(["apply", str(case.base_dir), str(case.adapter_dir), "-o", str(out), "--max-shard-size", "100KB",
                 "--no-progress", "-q"]) == 0
    return out


# ----------------------------------------------------------------------------- apply


def test_apply_equals_the_api_and_prints_a_summary(case, api_out, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, stderr = run_main(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out, "--no-progress")
    assert code == 0, stderr
    assert stderr == ""
    n_modules = len(adapter_factors(case.adapter_dir)[0])
    base_tensors = load_file(str(case.base_dir / "model.safetensors"))
    assert re.match(summary_pattern(out, n_modules, len(base_tensors)), stdout.strip()), stdout

    # Byte for byte what the API wrote.
    assert tree_hashes(out / "model.safetensors") == tree_hashes(api_out / "model.safetensors")  # but the record
    # Non-weight files are copied unchanged; nothing else appears but lorafuse's manifest, which lists them, and
    # its model card README.md (issue #16).
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.safetensors", *SIDE_FILES,
                                                            "lorafuse_manifest.json", "README.md"])
    manifest = json.loads((out / "lorafuse_manifest.json").read_text())
    assert manifest["written_by"] == "lorafuse" and sorted(manifest["files"]) == sorted(["model.safetensors",
                                                                                         *SIDE_FILES, "README.md"])
    for name in SIDE_FILES:
        assert (out / name).read_bytes() == (case.base_dir / name).read_bytes(), name
    # And the values are PEFT's merge_and_unload.
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == case.merged_state.keys()
    for key, ref in case.merged_state.items():
        np.testing.assert_allclose(got[key], ref, rtol=0, atol=1e-5, err_msg=key)


def test_apply_quiet_prints_nothing(case, api_out, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, stderr = run_main(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out, "-q",
                                    "--threads", "1")
    assert (code, stdout, stderr) == (0, "", "")
    assert tree_hashes(out / "model.safetensors") == tree_hashes(api_out / "model.safetensors")  # but the record


def test_apply_through_a_subprocess(case, api_out, tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "lorafuse", "apply", str(case.base_dir), str(case.adapter_dir),
                           "-o", str(out), "--no-progress"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    n_modules = len(adapter_factors(case.adapter_dir)[0])
    assert re.match(summary_pattern(out, n_modules, 21), proc.stdout.strip()), proc.stdout
    assert tree_hashes(out / "model.safetensors") == tree_hashes(api_out / "model.safetensors")  # but the record
    for name in SIDE_FILES:
        assert (out / name).read_bytes() == (case.base_dir / name).read_bytes(), name

    # An error through the real entry point: exit status 1, one line on stderr, no output.
    bad = tmp_path / "bad"
    proc = subprocess.run([sys.executable, "-m", "lorafuse", "apply", str(case.base_dir), str(tmp_path / "nowhere"),
                           "-o", str(bad)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lorafuse apply: error: FormatError: ")
    assert str(tmp_path / "nowhere") in lines[0]
    assert not bad.exists()


def test_weights_of_two_adapters(case, second_adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, stderr = run_main(capsys, "apply", case.base_dir, case.adapter_dir, second_adapter,
                                    "--weights", "1,-0.5", "-o", out, "--no-progress")
    assert code == 0, stderr
    f1, s1, r1 = adapter_factors(case.adapter_dir)
    f2, s2, r2 = adapter_factors(second_adapter)
    assert (s1, r1, s2, r2) == (2.0, 4, 3.0, 2)
    assert f1.keys() == f2.keys()

    base = load_file(str(case.base_dir / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == base.keys()
    for key, w in base.items():
        module = key.removesuffix(".weight")
        if module not in f1:
            np.testing.assert_array_equal(got[key], w, err_msg=key)  # copied through untouched
            continue
        (a1, b1), (a2, b2) = f1[module], f2[module]
        w64 = w.astype(np.float64)
        d1, d2 = s1 * b1 @ a1, s2 * b2 @ a2
        ref = w64 + 1.0 * d1 - 0.5 * d2
        # float32 arithmetic (a rank-6 product, one add, one rounding): a few eps of the magnitudes involved.
        mag = np.abs(w64) + s1 * np.abs(b1) @ np.abs(a1) + 0.5 * s2 * np.abs(b2) @ np.abs(a2)
        tol = 10 * EPS32 * mag
        err = np.abs(got[key].astype(np.float64) - ref)
        assert (err <= tol).all(), f"{key}: max error {err.max():g}, max tolerance {tol.max():g}"
        # Both adapters, with their own weights and scales, matter far beyond that tolerance.
        assert np.abs(got[key] - (w64 + d1)).max() > 100 * tol.max(), key
        assert np.abs(got[key] - (w64 + d1 + 0.5 * d2)).max() > 100 * tol.max(), key


def test_dtype_bf16(case, tmp_path, capsys):
    out = tmp_path / "merged"
    code, _, stderr = run_main(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out, "--dtype", "bf16",
                               "--no-progress")
    assert code == 0, stderr
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    got = load_torch(str(out / "model.safetensors"))
    base = load_file(str(case.base_dir / "model.safetensors"))
    assert got.keys() == base.keys()
    factors, scale, _ = adapter_factors(case.adapter_dir)
    merged_elems = exact_elems = 0
    for key, w in base.items():
        assert got[key].dtype == torch.bfloat16
        module = key.removesuffix(".weight")
        if module not in factors:
            # A plain conversion: float32 -> bf16, round to nearest even, exactly as torch does it.
            assert torch.equal(got[key], torch.from_numpy(w).to(torch.bfloat16)), key
            continue
        a, b = factors[module]
        ref = torch.tensor(w.astype(np.float64) + scale * b @ a).to(torch.bfloat16)
        ulps = bf16_ulps(got[key], ref)
        assert int(ulps.max()) <= 1, f"{key}: {int(ulps.max())} bf16 ulps off"
        merged_elems += ulps.numel()
        exact_elems += int((ulps == 0).sum())
    assert merged_elems > 0
    assert exact_elems / merged_elems > 0.99, f"only {exact_elems} of {merged_elems} merged values are exact"

    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((case.base_dir / "config.json").read_text())
    assert base_cfg["dtype"] == "float32"
    assert cfg["dtype"] == "bfloat16"
    assert {k: v for k, v in cfg.items() if k != "dtype"} == {k: v for k, v in base_cfg.items() if k != "dtype"}
    for name in ("generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (case.base_dir / name).read_bytes(), name


def test_max_shard_size(case, api_out, sharded_out):
    names = sorted(p.name for p in sharded_out.glob("*.safetensors"))
    n = len(names)
    assert n >= 3
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (sharded_out / "model.safetensors").exists()
    for name in SIDE_FILES:
        assert (sharded_out / name).read_bytes() == (case.base_dir / name).read_bytes(), name

    index = json.loads((sharded_out / "model.safetensors.index.json").read_text())
    actual_map: dict[str, str] = {}
    total = 0
    reference = load_file(str(api_out / "model.safetensors"))
    for name in names:
        shard_bytes = 0
        with safe_open(str(sharded_out / name), "np") as f:
            for k in f.keys():
                assert k not in actual_map
                actual_map[k] = name
                t = f.get_tensor(k)
                np.testing.assert_array_equal(t, reference[k], err_msg=k)  # same values as the single file
                shard_bytes += t.nbytes
        # Each shard respects the limit (a shard of one tensor may not).
        assert shard_bytes <= 100_000 or len(actual_map) == 1, name
        total += shard_bytes
    assert index["weight_map"] == actual_map
    assert set(actual_map) == set(reference)
    assert index["metadata"]["total_size"] == total == sum(t.nbytes for t in reference.values())

    # transformers loads the sharded output; its logits equal the single-file output's, and PEFT's.
    sharded = LlamaForCausalLM.from_pretrained(str(sharded_out), dtype=torch.float32).eval()
    single = LlamaForCausalLM.from_pretrained(str(api_out), dtype=torch.float32).eval()
    for k, v in single.state_dict().items():
        assert torch.equal(sharded.state_dict()[k], v), k
    with torch.no_grad():
        logits = sharded(case.input_ids).logits
        torch.testing.assert_close(logits, single(case.input_ids).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, case.peft_model(case.input_ids).logits, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- info


@pytest.mark.parametrize("which", ["first", "second"])
def test_info_json_on_an_adapter(case, second_adapter, capsys, which):
    adapter = case.adapter_dir if which == "first" else second_adapter
    code, stdout, stderr = run_main(capsys, "info", adapter, "--json")
    assert code == 0, stderr
    d = json.loads(stdout)
    factors, scale, r = adapter_factors(adapter)
    raw = load_file(str(adapter / ADAPTER_FILE))
    cfg = json.loads((adapter / "adapter_config.json").read_text())

    assert d["type"] == "adapter"
    assert d["modules"] == len(factors) == 14
    assert d["ranks"] == {str(r): len(factors)}
    assert d["scales"] == pytest.approx([cfg["lora_alpha"] / cfg["r"]])
    assert d["lora_alpha"] == cfg["lora_alpha"]
    assert d["parameters"] == sum(t.size for t in raw.values())
    assert d["dtypes"] == {"F32": 2 * len(factors)}
    details = {m["name"]: m for m in d["module_details"]}
    assert details.keys() == factors.keys()
    for name, (a, b) in factors.items():
        m = details[name]
        assert m["rank"] == r and m["kind"] == "linear"
        assert m["scale"] == pytest.approx(scale)
        assert m["shape"] == [b.shape[0], a.shape[1]]
        expected = np.linalg.norm(scale * b @ a)
        np.testing.assert_allclose(m["delta_norm"], expected, rtol=1e-5, err_msg=name)


def test_info_text_on_an_adapter(case, capsys):
    factors, scale, r = adapter_factors(case.adapter_dir)
    params = sum(t.size for t in load_file(str(case.adapter_dir / ADAPTER_FILE)).values())
    code, stdout, stderr = run_main(capsys, "info", case.adapter_dir)
    assert code == 0, stderr
    assert re.search(rf"^\s*modules\s+{len(factors)}$", stdout, re.M), stdout
    assert re.search(rf"^\s*ranks\s+r={r}: {len(factors)}$", stdout, re.M), stdout
    assert re.search(rf"^\s*scales\s+{scale:g}$", stdout, re.M), stdout
    assert re.search(rf"^\s*parameters\s+{params:,}$", stdout, re.M), stdout
    # The summary shows the 10 largest modules; --modules shows all of them.
    shown = [name for name in factors if re.search(rf"^\s+{re.escape(name)}\s", stdout, re.M)]
    assert len(shown) == 10
    norms = {name: np.linalg.norm(scale * b @ a) for name, (a, b) in factors.items()}
    assert set(shown) == set(sorted(norms, key=lambda n: -norms[n])[:10])

    code, stdout, _ = run_main(capsys, "info", case.adapter_dir, "--modules")
    assert code == 0
    for name, norm in norms.items():
        line = re.search(rf"^\s+{re.escape(name)}\s.*$", stdout, re.M)
        assert line, name
        assert f"r={r}" in line.group(0)
        assert float(line.group(0).split("||delta||_F=")[1]) == pytest.approx(norm, rel=1e-5)


@pytest.mark.parametrize("which", ["folder", "file", "sharded", "bf16"])
def test_info_json_on_a_checkpoint(case, sharded_out, tmp_path, capsys, which):
    if which == "bf16":
        path = tmp_path / "bf16"
        lorafuse.apply(case.base_dir, [case.adapter_dir], out=path, dtype="bf16", progress=False)
    else:
        path = {"folder": case.base_dir, "file": case.base_dir / "model.safetensors", "sharded": sharded_out}[which]
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    dtypes: dict[str, int] = {}
    params = nbytes = count = 0
    for file in files:
        with safe_open(str(file), "np") as f:
            for k in f.keys():
                s = f.get_slice(k)
                dtypes[s.get_dtype()] = dtypes.get(s.get_dtype(), 0) + 1
                numel = int(np.prod(s.get_shape()))
                params += numel
                nbytes += numel * {"F32": 4, "BF16": 2, "F16": 2}[s.get_dtype()]
                count += 1

    code, stdout, stderr = run_main(capsys, "info", path, "--json")
    assert code == 0, stderr
    d = json.loads(stdout)
    assert d["type"] == "checkpoint"
    assert d["tensors"] == count == 21
    assert d["parameters"] == params
    assert d["bytes"] == nbytes
    assert d["dtypes"] == dtypes
    assert d["sharded"] == (which == "sharded")
    assert sorted(d["shards"]) == [f.name for f in files]

    code, stdout, _ = run_main(capsys, "info", path)
    assert code == 0
    assert re.search(rf"^\s*tensors\s+{count}$", stdout, re.M), stdout
    assert re.search(rf"^\s*parameters\s+{params:,}$", stdout, re.M), stdout


# ----------------------------------------------------------------------------- errors and help


def _one_error_line(stderr: str, prefix: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), stderr
    return lines[0]


def test_lorafuse_errors_exit_1(case, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_main(capsys, "apply", case.base_dir, tmp_path / "nowhere", "-o", out)
    assert (code, stdout) == (1, "")
    line = _one_error_line(stderr, "lorafuse apply: error: FormatError: ")
    assert str(tmp_path / "nowhere") in line
    assert not out.exists()

    # An output that is an input: refused, the input untouched.
    before = (case.base_dir / "model.safetensors").read_bytes()
    code, stdout, stderr = run_main(capsys, "apply", case.base_dir, case.adapter_dir, "-o", case.base_dir)
    assert (code, stdout) == (1, "")
    _one_error_line(stderr, "lorafuse apply: error: OutputError: ")
    assert (case.base_dir / "model.safetensors").read_bytes() == before

    code, stdout, stderr = run_main(capsys, "info", tmp_path / "nowhere")
    assert (code, stdout) == (1, "")
    _one_error_line(stderr, "lorafuse info: error: FormatError: ")


def test_nonfinite_through_the_cli(case, tmp_path, capsys):
    adapter = tmp_path / "nan_adapter"
    shutil.copytree(case.adapter_dir, adapter)
    tensors = load_file(str(adapter / ADAPTER_FILE))
    module = "model.layers.0.self_attn.o_proj"
    tensors[f"{PREFIX}{module}.lora_B.weight"][0, 0] = np.nan
    save_file(tensors, str(adapter / ADAPTER_FILE), metadata={"format": "pt"})

    out = tmp_path / "out"
    code, stdout, stderr = run_main(capsys, "apply", case.base_dir, adapter, "-o", out, "--no-progress")
    assert (code, stdout) == (1, "")
    line = _one_error_line(stderr, "lorafuse apply: error: NonFiniteError: ")
    assert module in line and "--allow-nonfinite" in line
    assert not out.exists()

    code, _, stderr = run_main(capsys, "apply", case.base_dir, adapter, "-o", out, "--no-progress",
                               "--allow-nonfinite")
    assert code == 0, stderr
    w = load_file(str(out / "model.safetensors"))[f"{module}.weight"]
    assert np.isnan(w[0]).all() and np.isfinite(w[1:]).all()


@pytest.mark.parametrize(
    "extra, adapters, expected",
    [
        (["--weights", "1,2"], 1, "2 weights given for 1 adapter"),
        (["--weights", "1"], 2, "1 weight given for 2 adapters"),
        (["--max-shard-size", "lots"], 1, "'lots'"),
    ],
    ids=["too-many-weights", "too-few-weights", "shard-size"],
)
def test_bad_values_exit_2(case, tmp_path, capsys, extra, adapters, expected):
    out = tmp_path / "out"
    code, stdout, stderr = run_main(capsys, "apply", case.base_dir, *[case.adapter_dir] * adapters, "-o", out, *extra)
    assert (code, stdout) == (2, "")
    line = _one_error_line(stderr, "lorafuse apply: error: ")
    assert expected in line
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, expected, prog",
    [
        (["--weights", "1,x"], "argument --weights", "lorafuse apply"),
        (["--threads", "-1"], "argument --threads", "lorafuse apply"),
        (["--threads", "two"], "argument --threads", "lorafuse apply"),
        ([], "the following arguments are required: -o/--out", "lorafuse apply"),
        # an option the verb does not know: reported with the verb's usage, and the nearest option named
        (["--bogus"], "unrecognized arguments: --bogus", "lorafuse apply"),
        (["--wieghts", "1"], "unrecognized argument --wieghts; did you mean '--weights'?", "lorafuse apply"),
        (["--dtype", "int8"], "argument --dtype: unknown dtype 'int8' (choose from fp32, fp16, bf16)",
         "lorafuse apply"),
    ],
    ids=["weights", "threads-negative", "threads-word", "no-output", "unknown-option", "misspelt-option", "dtype"],
)
def test_argparse_errors_exit_2(case, tmp_path, capsys, argv, expected, prog):
    out_args = [] if not argv else ["-o", str(tmp_path / "out")]
    code, stdout, stderr = run_exit(capsys, "apply", case.base_dir, case.adapter_dir, *out_args, *argv)
    assert (code, stdout) == (2, "")
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), stderr
    assert expected in last
    assert stderr.startswith(f"usage: {prog} ")
    assert not (tmp_path / "out").exists()


def test_no_command_exits_2(capsys):
    code, stdout, stderr = run_exit(capsys)
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines()[-1].startswith("lorafuse: error: ")


@pytest.mark.parametrize(
    "argv, options",
    [
        (["--help"], ["apply", "info", "--version"]),
        (["apply", "--help"], ["-o OUT, --out OUT", "--weights", "--dtype", "--threads", "--max-shard-size",
                               "--allow-nonfinite", "--no-progress", "--quiet", "base", "adapters", "examples:"]),
        (["info", "--help"], ["path", "--json", "--modules", "--threads"]),
    ],
    ids=["top", "apply", "info"],
)
def test_help(capsys, argv, options):
    code, stdout, stderr = run_exit(capsys, *argv)
    assert code == 0 and stderr == ""
    assert stdout.startswith("usage: lorafuse")
    for option in options:
        assert option in stdout, option


def test_version(capsys):
    code, stdout, _ = run_exit(capsys, "--version")
    assert code == 0
    assert stdout.strip().startswith(f"lorafuse {lorafuse.__version__} (CUDA backend: ")


def test_a_command_imports_only_what_it_runs(case: Case, tmp_path: Path) -> None:
    """`lorafuse apply` and `lorafuse --version` never import combine, recipes, plots, the GGUF writer or the Hub
    client: the combine methods' help is built from their registry only when combine's help or usage is shown."""
    code = ("import sys\nfrom lorafuse.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('lorafuse.ops.combine', 'lorafuse.recipes', "
            "'lorafuse.plot', 'lorafuse.formats.gguf', 'huggingface_hub', 'matplotlib', 'yaml', 'pydantic'))))")
    real = ["apply", str(case.base_dir), str(case.adapter_dir), "-o", str(tmp_path / "merged"), "-q"]
    for argv in (["--version"], ["apply", "--help"], ["apply", "/nonexistent/base", "/nonexistent/lora", "-o", "x"],
                 real):
        res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert res.stdout.strip().splitlines()[-1] == "[]", (argv, res.stdout, res.stderr)
    assert (tmp_path / "merged" / "model.safetensors").is_file()  # the real apply ran
    res = subprocess.run([sys.executable, "-c", code, "combine", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert "magnitude_prune_svd" in res.stdout and "lorafuse.ops.combine.registry" in res.stdout


def test_numpy_loads_after_the_command_line_is_read(case: Case, tmp_path: Path) -> None:
    """`import lorafuse` and reading the command line load neither numpy nor the core, so `lorafuse apply` can tell
    OpenBLAS's idle workers to sleep at once (OPENBLAS_THREAD_TIMEOUT) before they start; combine, whose QR and
    SVD calls keep them busy, leaves them alone, and a user's own setting is kept. Every run still merges."""
    code = ("import os, sys\nimport lorafuse, lorafuse.cli\n"
            "print('numpy' in sys.modules, 'lorafuse._core' in sys.modules)\n"
            "rc = lorafuse.cli.main(sys.argv[1:])\n"
            "print(rc, os.environ.get('OPENBLAS_THREAD_TIMEOUT'))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    runs = {"apply": (["apply", str(case.base_dir), str(case.adapter_dir)], {}, "4"),
            "apply, user's value": (["apply", str(case.base_dir), str(case.adapter_dir)],
                                    {"OPENBLAS_THREAD_TIMEOUT": "12"}, "12"),
            "combine": (["combine", str(case.adapter_dir), str(case.adapter_dir)], {}, "None")}
    for i, (name, (argv, extra, want)) in enumerate(runs.items()):
        out = tmp_path / f"out{i}"
        res = subprocess.run([sys.executable, "-c", code, *argv, "-o", str(out), "-q"], env={**env, **extra},
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, (name, res.stderr)
        lines = res.stdout.strip().splitlines()
        assert lines[0] == "False False", (name, res.stdout)
        assert lines[-1] == f"0 {want}", (name, res.stdout)
        assert any(out.rglob("*.safetensors")), name

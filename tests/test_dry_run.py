"""--dry-run on apply, combine, resize, extract and convert, and combine --json.

A dry run checks what a real run checks and prints the plan; it writes nothing. Each plan is compared
with what the real run then writes, read back with the safetensors package (tensor names, dtypes, shapes,
file sizes) and with the inputs' own tensor data (bytes to read); refusals are compared with those of
the real run (exit status and message); the output path, its folder and an existing output are checked
untouched (bytes, modification times, no temporary entries).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from peft_fixtures import LLAMA_TARGETS, Case, another_adapter, llama_case
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseValueError
from lorafuse.ops.combine import combine_to

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
ADAPTER_FILE = "adapter_model.safetensors"


# ----------------------------------------------------------------------------- helpers


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tensors_of(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a safetensors file, read by the safetensors package."""
    with safe_open(str(path), "numpy") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def data_bytes(path: Path) -> int:
    """The tensor data of a safetensors file (a folder: of its .safetensors files)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return sum(ITEMSIZE[d] * int(np.prod(s, dtype=np.int64)) for f in files for d, s in tensors_of(f).values())


def dtype_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d, _ in tensors_of(path).values():
        counts[d] = counts.get(d, 0) + 1
    return counts


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under `folder` (hidden ones too): its bytes (None for a folder) and modification time."""
    out: dict[str, tuple[bytes | None, int]] = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (p.read_bytes() if p.is_file() else None, st.st_mtime_ns)
    return out


def plan_of(capsys: pytest.CaptureFixture[str], *argv: object) -> dict:
    code, out, err = run(capsys, *argv, "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["dry_run"] is True
    return plan


def planned_bytes(path: Path) -> int:
    """The size of a safetensors file without the provenance record in its metadata (the `lorafuse.*` keys,
    which only a run makes): its header read as the format defines it (8-byte length, JSON, padded with
    spaces to 8 bytes), those keys dropped, written again compactly, plus the data."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = {k: v for k, v in header.pop("__metadata__", {}).items() if not k.startswith("lorafuse.")}
    text = json.dumps({"__metadata__": meta, **header} if meta else header, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return 8 + len(text) + len(raw) - 8 - n


def check_file(plan: dict, written: Path, name: str | None = None) -> None:
    """The plan's one tensor file against the file the real run wrote."""
    (entry,) = plan["files"]
    assert entry["name"] == (name or written.name)
    assert entry["bytes"] == planned_bytes(written) <= os.path.getsize(written)
    assert entry["tensors"] == plan["tensors"] == len(tensors_of(written))
    assert plan["bytes_written"] == entry["bytes"]
    assert plan["size"] == data_bytes(written)
    assert plan["dtypes"] == dtype_counts(written)


def same_refusal(capsys: pytest.CaptureFixture[str], argv: list[object], code: int, *words: str) -> None:
    """The real run and the dry run fail alike: exit status, stdout (empty) and the message."""
    real = run(capsys, *argv)
    dry = run(capsys, *argv, "--dry-run")
    assert real[0] == dry[0] == code, (real, dry)
    assert real[1] == dry[1] == ""
    assert real[2] == dry[2], (real[2], dry[2])
    for w in words:
        assert w in dry[2], dry[2]


SD1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8),
       "lora_unet_down_blocks_0_resnets_0_conv1": (8, 8, 3, 3),
       "lora_te_text_model_encoder_layers_0_mlp_fc1": (16, 8)}


def kohya_file(path: Path, seed: int = 3) -> None:
    """A kohya LoRA file of SD 1.x modules (a UNet linear, a 3x3 LoCon, a text-encoder MLP), F32 down, F16 up."""
    rng = np.random.default_rng(seed)
    sd = {}
    for i, (name, shape) in enumerate(SD1.items()):
        r = 2 + i
        sd[f"{name}.lora_down.weight"] = rng.standard_normal((r, *shape[1:])).astype(np.float32)
        sd[f"{name}.lora_up.weight"] = rng.standard_normal((shape[0], r, *([1] * (len(shape) - 2)))).astype(np.float16)
        sd[f"{name}.alpha"] = np.array(1.5, dtype=np.float32)
    save_file(sd, str(path), metadata={"ss_network_dim": "4"})


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    c = llama_case(tmp_path_factory.mktemp("llama"), seed=21)
    (c.base_dir / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    return c


@pytest.fixture(scope="module")
def second_adapter(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another adapter of the base: the same modules, rank 2."""
    return another_adapter(case, tmp_path_factory.mktemp("second") / "adapter2", rank=2, alpha=4, seed=5)


@pytest.fixture(scope="module")
def finetuned(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base merged with the case's adapter by PEFT (merge_and_unload), in two shards."""
    ft = tmp_path_factory.mktemp("ft") / "finetuned"
    copy.deepcopy(case.peft_model).merge_and_unload().save_pretrained(str(ft), max_shard_size="200KB")
    return ft


# ----------------------------------------------------------------------------- apply


def test_apply_plan_matches_the_merge(case, tmp_path, capsys):
    out = tmp_path / "new" / "merged"
    plan = plan_of(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out)
    assert not (tmp_path / "new").exists()  # not the output, not its folder
    assert list(tmp_path.iterdir()) == []

    base_file = case.base_dir / "model.safetensors"
    base = tensors_of(base_file)
    adapter = tensors_of(case.adapter_dir / ADAPTER_FILE)
    targets = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
               for k in adapter if k.endswith(".lora_A.weight")}
    assert plan["verb"] == "apply" and plan["out"] == str(out) and plan["format"] == "checkpoint folder"
    assert {m["name"] for m in plan["modules"]} == targets == set(plan["merged"])
    for m in plan["modules"]:
        assert (m["ranks_in"], m["rank"], tuple(m["shape"])) == ([4], None, base[m["name"]][1])
    assert plan["copied"] == len(base) - len(targets) and plan["shards"] == 1
    assert plan["bytes_read"] == data_bytes(base_file) + data_bytes(case.adapter_dir / ADAPTER_FILE)
    assert plan["exact"] is True and plan["replaces"] is None

    code, stdout, err = run(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out, "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(stdout)
    check_file(plan, out / "model.safetensors")
    assert plan["size"] == report["bytes"] and plan["tensors"] == report["tensors"]
    assert sorted(plan["merged"]) == sorted(report["merged"])
    assert tensors_of(out / "model.safetensors") == base  # names, dtypes and shapes as planned (the base's)


def test_apply_plan_of_a_one_file_output_and_shards(case, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    plan = plan_of(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out, "--dtype", "bf16")
    assert plan["format"] == "safetensors file" and not out.exists()
    assert any("tokenizer.json" in n for n in plan["notes"])  # what a one-file output leaves out, as when run
    assert run(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out, "--dtype", "bf16", "-q")[0] == 0
    check_file(plan, out)

    out = tmp_path / "sharded"
    plan = plan_of(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out, "--max-shard-size", "100KB")
    assert run(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out, "--max-shard-size", "100KB", "-q")[0] == 0
    written = sorted(out.glob("*.safetensors"))
    assert len(written) > 1 and plan["shards"] == len(written)
    assert [(f["name"], f["bytes"], f["tensors"]) for f in plan["files"]] == \
        [(p.name, planned_bytes(p), len(tensors_of(p))) for p in written]
    assert plan["bytes_written"] == sum(planned_bytes(p) for p in written)


def test_apply_text_plan(case, tmp_path, capsys):
    code, stdout, err = run(capsys, "apply", case.base_dir, case.adapter_dir, "-o", tmp_path / "m", "--dry-run")
    assert code == 0 and err == ""
    assert stdout.startswith(f"dry run: apply would write {tmp_path / 'm'} (checkpoint folder); nothing was written")
    assert re.search(r"^    model\.layers\.0\.self_attn\.q_proj\.weight\s+rank 4 -> merged  \(64, 64\)$", stdout, re.M)
    assert re.search(r"^  merged\s+14$", stdout, re.M)
    assert run(capsys, "apply", case.base_dir, case.adapter_dir, "-o", tmp_path / "m", "--dry-run", "-q") == (0, "", "")
    assert list(tmp_path.iterdir()) == []


def test_apply_refusals_are_those_of_a_real_run(case, tmp_path, capsys):
    # a module the base does not have
    bad = tmp_path / "bad_adapter"
    shutil.copytree(case.adapter_dir, bad)
    tensors = load_file(str(bad / ADAPTER_FILE))
    tensors.update({k.replace(".layers.1.", ".layers.7."): v for k, v in tensors.items() if ".layers.1." in k})
    save_file(tensors, str(bad / ADAPTER_FILE), metadata={"format": "pt"})
    out = tmp_path / "out"
    same_refusal(capsys, ["apply", case.base_dir, bad, "-o", out, "--no-progress"], 1, "MissingModuleError",
                 "model.layers.7")
    # the output is an input
    same_refusal(capsys, ["apply", case.base_dir, case.adapter_dir, "-o", case.base_dir], 1, "OutputError")
    # bad options
    for dry in ([], ["--dry-run"]):  # an unknown dtype: argparse's refusal, before anything else
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in ["apply", case.base_dir, case.adapter_dir, "-o", out, "--dtype", "int8", *dry]])
        assert e.value.code == 2 and "unknown dtype 'int8'" in capsys.readouterr().err
    same_refusal(capsys, ["apply", case.base_dir, case.adapter_dir, "-o", out, "--weights", "1,2"], 2,
                 "2 weights given for 1 adapter")
    same_refusal(capsys, ["apply", case.base_dir, case.adapter_dir, "-o", out, "--max-shard-size", "1KB"], 2,
                 "below the 64 KiB minimum")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_adapter"]


def test_dry_run_leaves_an_existing_output_untouched(case, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    os.utime(out / "notes.txt", ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(tmp_path)
    # without --overwrite: refused, as a real run refuses it
    same_refusal(capsys, ["apply", case.base_dir, case.adapter_dir, "-o", out, "--no-progress"], 1, "OutputError",
                 "notes.txt")
    # with --overwrite: planned, and the plan says what would be replaced; nothing changes
    plan = plan_of(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out, "--overwrite")
    assert "notes.txt" in plan["replaces"]
    code, stdout, err = run(capsys, "apply", case.base_dir, case.adapter_dir, "-o", out, "--overwrite", "--dry-run")
    assert code == 0 and "would replace" in stdout and "notes.txt" in stdout and err == ""
    assert snapshot(tmp_path) == before

    # an earlier lorafuse output: planned without --overwrite, left as it is
    ours = tmp_path / "ours"
    assert run(capsys, "apply", case.base_dir, case.adapter_dir, "-o", ours, "-q")[0] == 0
    before = snapshot(tmp_path)
    plan = plan_of(capsys, "apply", case.base_dir, case.adapter_dir, "-o", ours, "--dtype", "fp16")
    assert plan["replaces"] is None and plan["dtypes"] == {"F16": plan["tensors"]}
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- combine


def test_combine_plan_matches_the_output_and_json_report(case, second_adapter, tmp_path, capsys):
    out = tmp_path / "sub" / "mix"
    argv = ["combine", case.adapter_dir, second_adapter, "--weights", "1,0.5", "--rank", "3", "-o", out]
    plan = plan_of(capsys, *argv)
    assert not (tmp_path / "sub").exists()
    base = tensors_of(case.base_dir / "model.safetensors")
    assert plan["format"] == "peft folder" and plan["engine"] == "memory" and plan["adapters"] == 2
    for m in plan["modules"]:
        assert (m["ranks_in"], m["rank"], m["at_most"]) == ([2, 4], 3, False)
        assert tuple(m["shape"]) == base[m["name"] + ".weight"][1]
    assert plan["bytes_read"] == data_bytes(case.adapter_dir) + data_bytes(second_adapter)

    code, stdout, err = run(capsys, *argv, "--json")
    assert code == 0, err
    report = json.loads(stdout)  # nothing else on stdout
    check_file(plan, out / ADAPTER_FILE)
    written = tensors_of(out / ADAPTER_FILE)
    assert report["out"] == str(out) and report["method"] == "svd" and report["adapters"] == 2
    assert report["engine"] == "memory" and report["summary"] is None and report["seconds"] >= 0
    assert [m["name"] for m in report["modules"]] == [m["name"] for m in plan["modules"]]
    for m in report["modules"]:
        a_dtype, a_shape = written[f"base_model.model.{m['name']}.lora_A.weight"]
        assert m["rank"] == a_shape[0] == 3 and a_dtype == report["dtype"] == "F32"
    assert report["randomized"] == []


def test_combine_streamed_json_and_plan(case, second_adapter, tmp_path, capsys):
    out = tmp_path / "pooled"
    argv = ["combine", case.adapter_dir, second_adapter, "--engine", "stream", "--passes", "2", "--rank", "2",
            "-o", out]
    plan = plan_of(capsys, *argv)
    assert (plan["engine"], plan["passes"]) == ("stream", 2)
    factor_bytes = data_bytes(case.adapter_dir) + data_bytes(second_adapter)
    assert plan["bytes_read"] == 2 * factor_bytes  # every adapter read once per pass
    code, stdout, err = run(capsys, *argv, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    summary = report["summary"]
    assert report["engine"] == summary["engine"] == "stream"
    assert (summary["adapters"], summary["passes"], summary["bytes_read"]) == (2, 2, plan["bytes_read"])
    assert set(summary["errors"]) == {m["name"] for m in report["modules"]} == set(report["randomized"])
    assert summary["peak_rss"] > 0 and summary["seconds_per_adapter"] > 0
    check_file(plan, out / ADAPTER_FILE)


def test_combine_to_one_file_and_refusals(case, second_adapter, tmp_path, capsys):
    kohya_file(tmp_path / "a.safetensors", seed=1)
    kohya_file(tmp_path / "b.safetensors", seed=2)
    out = tmp_path / "mix.safetensors"
    argv = ["combine", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--rank", "3", "--dtype", "bf16",
            "-o", out]
    plan = plan_of(capsys, *argv)
    assert plan["format"] == "kohya file" and plan["dtypes"]["BF16"] == 2 * len(plan["modules"]) == 6
    assert {(m["name"], tuple(m["ranks_in"]), m["rank"]) for m in plan["modules"]} == \
        {(n, (2 + i,), 3) for i, n in enumerate(SD1)}
    assert plan["bytes_read"] == data_bytes(tmp_path / "a.safetensors") + data_bytes(tmp_path / "b.safetensors")
    assert run(capsys, *argv, "-q")[0] == 0
    check_file(plan, out)

    bad = tmp_path / "bad"
    same_refusal(capsys, ["combine", case.adapter_dir, second_adapter, "--method", "ties", "-o", bad], 2,
                 "needs a density")
    same_refusal(capsys, ["combine", case.adapter_dir, second_adapter, "--method", "linear", "-o", bad], 1,
                 "ShapeMismatchError")
    same_refusal(capsys, ["combine", case.adapter_dir, second_adapter, "-o", second_adapter], 1, "OutputError")
    same_refusal(capsys, ["combine", case.adapter_dir, "--format", "peft", "-o", tmp_path / "x.safetensors"], 2,
                 "names one file")
    same_refusal(capsys, ["combine", case.adapter_dir, "-o", tmp_path / "x.safetensors"], 2,
                 "no one-file format can hold these modules")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "mix.safetensors"]


# ----------------------------------------------------------------------------- resize


def test_resize_plan(case, tmp_path, capsys):
    out = tmp_path / "r2"
    plan = plan_of(capsys, "resize", case.adapter_dir, "--rank", "2", "-o", out)
    assert not out.exists() and plan["exact"] is True
    assert {(m["rank"], m["at_most"], tuple(m["ranks_in"])) for m in plan["modules"]} == {(2, False, (4,))}
    assert plan["bytes_read"] == data_bytes(case.adapter_dir)
    code, stdout, err = run(capsys, "resize", case.adapter_dir, "--rank", "2", "-o", out, "--json")
    assert code == 0, err
    check_file(plan, out / ADAPTER_FILE)
    assert tensors_of(out / ADAPTER_FILE) == {
        k: (d, (2, s[1]) if ".lora_A." in k else (s[0], 2)) for k, (d, s) in tensors_of(
            case.adapter_dir / ADAPTER_FILE).items()}

    # a rule on the singular values: the plan's ranks and bytes are upper bounds of the run's
    out = tmp_path / "fro"
    plan = plan_of(capsys, "resize", case.adapter_dir, "--sv-fro", "0.5", "-o", out)
    assert plan["exact"] is False and all(m["at_most"] and m["rank"] == 4 for m in plan["modules"])
    code, stdout, err = run(capsys, "resize", case.adapter_dir, "--sv-fro", "0.5", "-o", out, "--json")
    assert code == 0, err
    ranks = {m["name"]: m["rank"] for m in json.loads(stdout)["modules"]}
    assert any(r < 4 for r in ranks.values())
    assert all(ranks[m["name"]] <= m["rank"] for m in plan["modules"])
    assert planned_bytes(out / ADAPTER_FILE) <= plan["bytes_written"]
    assert plan["tensors"] == len(tensors_of(out / ADAPTER_FILE))

    same_refusal(capsys, ["resize", case.adapter_dir, "--rank", "2", "-o", case.adapter_dir], 1, "OutputError")
    dora = llama_case(tmp_path / "dora", seed=4, use_dora=True)
    same_refusal(capsys, ["resize", dora.adapter_dir, "--rank", "2", "-o", tmp_path / "nowhere" / "x"], 1,
                 "UnsupportedError", "DoRA")
    assert not (tmp_path / "nowhere").exists()


# ----------------------------------------------------------------------------- extract


def test_extract_plan(case, finetuned, tmp_path, capsys):
    out = tmp_path / "extracted"
    argv = ["extract", case.base_dir, finetuned, "--rank", "3", "-o", out]
    plan = plan_of(capsys, *argv)
    assert not out.exists() and plan["exact"] is False
    base = tensors_of(case.base_dir / "model.safetensors")
    ft_files = sorted(finetuned.glob("*.safetensors"))
    ft = {k: v for f in ft_files for k, v in tensors_of(f).items()}
    changed = {f"model.layers.{i}.{part}.{t}" for i in range(2) for t in LLAMA_TARGETS
               for part in ("self_attn", "mlp") if (t in ("gate_proj", "up_proj", "down_proj")) == (part == "mlp")}
    assert {m["name"] for m in plan["modules"]} == changed
    for m in plan["modules"]:
        assert (m["rank"], tuple(m["shape"])) == (3, base[m["name"] + ".weight"][1])
    assert any("lm_head.weight: output head" in n for n in plan["notes"])
    assert plan["bytes_read"] == sum(2 * ITEMSIZE[base[k + ".weight"][0]] * int(np.prod(base[k + ".weight"][1]))
                                     for k in changed)
    assert {k + ".weight" for k in changed} <= set(ft)

    code, _, err = run(capsys, *argv, "-q")
    assert code == 0, err
    check_file(plan, out / ADAPTER_FILE)  # every planned module changed: the upper bound is reached
    same_refusal(capsys, ["extract", case.base_dir, finetuned, "--rank", "3", "-o", finetuned], 1, "OutputError")
    same_refusal(capsys, ["extract", case.base_dir, finetuned, "--rank", "3", "--include", "(", "-o",
                          tmp_path / "x"], 2, "regular expression")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extracted"]


# ----------------------------------------------------------------------------- convert


def test_convert_plan(tmp_path, capsys):
    src = tmp_path / "style.safetensors"
    kohya_file(src)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "style_diffusers.safetensors"
    plan = plan_of(capsys, "convert", src, "--to", "peft", "-o", out)
    assert list(outdir.iterdir()) == [] and plan["format"] == "diffusers file" and plan["to"] == "peft"
    assert plan["bytes_read"] == data_bytes(src)
    assert {m["rank"] for m in plan["modules"]} == {2, 3, 4}
    assert run(capsys, "convert", src, "--to", "peft", "-o", out, "-q")[0] == 0
    check_file(plan, out)

    # an existing file of the user's, with --overwrite: planned, byte for byte untouched
    (outdir / "keep.safetensors").write_bytes(b"not lorafuse's")
    before = snapshot(tmp_path)
    plan = plan_of(capsys, "convert", src, "--to", "kohya", "-o", outdir / "keep.safetensors", "--overwrite")
    assert "keep.safetensors" in plan["replaces"]
    assert snapshot(tmp_path) == before
    same_refusal(capsys, ["convert", src, "--to", "kohya", "-o", outdir / "keep.safetensors"], 1, "OutputError")
    same_refusal(capsys, ["convert", src, "--to", "peft", "-o", tmp_path / "x.bin"], 2, ".safetensors")
    same_refusal(capsys, ["convert", src, "--to", "peft", "--arch", "llama", "-o", tmp_path / "y.safetensors"], 2,
                 "--arch")
    assert snapshot(tmp_path) == before


def test_help_teaches_the_dry_run(capsys):
    for verb in ("apply", "combine", "resize", "extract", "convert"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--dry-run" in text and "Nothing is written" in text, verb
    with pytest.raises(SystemExit):
        main(["combine", "--help"])
    assert "--json" in capsys.readouterr().out


# ----------------------------------------------------------------------------- Python


def test_plan_functions_take_the_operations_arguments(case, second_adapter, tmp_path, capsys):
    from lorafuse.ops.combine import CombineOptions
    from lorafuse.ops.plan import plan_apply, plan_combine, plan_extract, plan_resize

    out = tmp_path / "merged"
    plan = plan_apply(case.base_dir, [case.adapter_dir], [0.5], out, dtype="bf16", progress=False)
    cli = plan_of(capsys, "apply", case.base_dir, case.adapter_dir, "--weights", "0.5", "--dtype", "bf16", "-o", out)
    assert json.loads(json.dumps(plan.as_json())) == cli
    assert plan.lines()[0].startswith("dry run: apply would write") and plan.tensors == cli["tensors"]

    options = CombineOptions(method="cat")
    plan = plan_combine([case.adapter_dir, second_adapter], [1.0, -1.0], options, tmp_path / "cat")
    assert {m.rank for m in plan.modules} == {6} and plan.details["method"] == "cat"

    plan = plan_resize(case.adapter_dir, 1)  # no `out`: a result kept in memory
    assert plan.out is None and plan.replaces is None and {m.rank for m in plan.modules} == {1}
    assert "keep the result in memory" in plan.lines()[0]
    with pytest.raises(LorafuseValueError, match="rank rule is a keyword argument"):
        plan_extract(case.base_dir, case.base_dir, 3)  # as lorafuse.extract refuses it
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, operation", [
    ("plan_apply", lorafuse.apply), ("plan_combine", combine_to), ("plan_resize", lorafuse.resize),
    ("plan_extract", lorafuse.extract), ("plan_convert", lorafuse.convert),
])
def test_each_plan_takes_what_its_operation_takes(name: str, operation: object):
    """A plan_* function mirrors its operation's signature (what a dry run is asked is what the run would be
    asked): a parameter added to one and not the other fails here."""
    import inspect

    from lorafuse.ops import plan

    def shape(fn: object) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(getattr(plan, name)) == shape(operation)

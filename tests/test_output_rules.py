"""Output rules (issue #13): lorafuse never deletes what the user did not name.

For every verb that writes (apply into a folder, a single file and a diffusers pipeline, combine,
resize, extract, convert, similarity --plot, info --spectrum) and for the Python API (Adapter.save,
apply, convert, the plots, the atomic writers themselves):

* a new path, an empty folder (a folder output) or an empty file (a file output) is written;
* an earlier lorafuse output (a folder holding lorafuse_manifest.json and exactly the files it lists,
  a .safetensors file with lorafuse_version metadata, a PNG with that text chunk) is replaced silently;
* anything else (a folder of the user's, a lorafuse output the user added a file to, a file lorafuse did
  not write) is refused, naming the path and what it holds, and left byte for byte, unless --overwrite
  (overwrite=True), which replaces it and names what it replaced (stderr note / OverwriteWarning);
* the current folder, a folder above it, an input, a folder holding an input and a path inside an input
  folder are refused whatever --overwrite says; so are symbolic links, FIFOs and devices, and a folder
  where a file goes (and the reverse).

Independent references: the markers are read back with the safetensors package and PIL, the manifest
is checked against the files on disk (sizes, sha256 from hashlib), and the outputs load in PEFT and
transformers with the manifest beside them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_tools import Spec, llama_specs, write_checkpoint, write_peft_adapter, write_safetensors
from peft import PeftModel
from peft_fixtures import llama_case
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.numpy import save_file

import lorafuse
from lorafuse import LorafuseValueError, OutputError, OverwriteWarning
from lorafuse.cli import main
from lorafuse.io.atomic import atomic_dir, atomic_file, check_output
from lorafuse.io.manifest import STAMP_XATTR, stamp
from lorafuse.plot import plot_similarity, plot_spectrum

MANIFEST = "lorafuse_manifest.json"
MARK = "lorafuse_version"
H = 16  # hidden size of the toy models
SPECS = llama_specs(layers=1, hidden=H, inter=32, vocab=32)
FLUX_MODULE = "lora_unet_double_blocks_0_img_attn_proj"  # -> transformer_blocks.0.attn.to_out.0 (H x H)

# A folder of the user's: 8 top-level entries (the refusal shows 6 "and 2 more"), one of them a folder.
FOREIGN = {"README.md": b"read me\n", "config.json": b"{}\n", "model.safetensors": b"w\n", "notes.md": b"notes\n",
           "run.py": b"print(1)\n", "scripts/train.sh": b"#!/bin/sh\n", "tokenizer.json": b"{}\n", "z.txt": b"z\n"}


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    root: Path  # holds inputs/ (the inputs) and nothing the tests write into
    base: Path  # llama-shaped checkpoint folder (config.json + model.safetensors)
    ft: Path  # the same architecture, other values
    a1: Path  # PEFT adapters on base
    a2: Path
    pipe: Path  # a diffusers pipeline folder (model_index.json + transformer/)
    flux: Path  # kohya Flux LoRA files for the pipeline
    flux2: Path
    diffusers: Path  # a diffusers LoRA file (flux converted)

    @property
    def folder(self) -> Path:
        return self.root / "inputs"


def _bf16(rng: np.random.Generator) -> Callable[[Spec], bytes]:
    def fill(s: Spec) -> bytes:
        x = (rng.standard_normal(s.shape) * 0.02).astype(np.float32)
        return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return fill


def _flux_lora(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    save_file({f"{FLUX_MODULE}.lora_down.weight": rng.standard_normal((2, H)).astype(np.float32),
               f"{FLUX_MODULE}.lora_up.weight": rng.standard_normal((H, 2)).astype(np.float32),
               f"{FLUX_MODULE}.alpha": np.array(1.0, np.float32)}, str(path))


@pytest.fixture(scope="module")
def inp(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("rules")
    d = root / "inputs"
    base = write_checkpoint(d / "base", SPECS)
    ft = d / "ft"
    ft.mkdir()
    (ft / "config.json").write_text((base / "config.json").read_text())
    write_safetensors(ft / "model.safetensors", SPECS, fill=_bf16(np.random.default_rng(3)))
    write_peft_adapter(d / "a1", SPECS, ["q_proj", "v_proj"], seed=1)
    write_peft_adapter(d / "a2", SPECS, ["q_proj", "v_proj"], seed=2)
    pipe = d / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    save_file({"transformer_blocks.0.attn.to_out.0.weight": np.random.default_rng(4).standard_normal((H, H))
               .astype(np.float32)}, str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    _flux_lora(d / "flux.safetensors", 5)
    _flux_lora(d / "flux2.safetensors", 6)
    lorafuse.convert(d / "flux.safetensors", d / "diffusers.safetensors", to="peft", family="flux")
    return Inputs(root, base, ft, d / "a1", d / "a2", pipe, d / "flux.safetensors", d / "flux2.safetensors",
                  d / "diffusers.safetensors")


@dataclass(frozen=True)
class Verb:
    name: str
    folder: bool  # writes a folder (else one file)
    suffix: str  # of the output's name
    argv: Callable[[Inputs, str], list[object]]
    first_input: Callable[[Inputs], Path]
    input_folder: Callable[[Inputs], Path | None]  # a folder input (an output inside it is refused)

    def __str__(self) -> str:
        return self.name


VERBS = [
    Verb("apply", True, "", lambda i, o: ["apply", i.base, i.a1, "-o", o, "--no-progress", "-q"],
         lambda i: i.base, lambda i: i.base),
    Verb("apply-file", False, ".safetensors",
         lambda i, o: ["apply", i.base / "model.safetensors", i.a1, "-o", o, "--no-progress", "-q"],
         lambda i: i.base / "model.safetensors", lambda i: i.a1),
    Verb("apply-pipeline", True, "", lambda i, o: ["apply", i.pipe, i.flux, "-o", o, "--no-progress", "-q"],
         lambda i: i.pipe, lambda i: i.pipe),
    Verb("combine", True, "", lambda i, o: ["combine", i.a1, i.a2, "--method", "cat", "-o", o, "-q"],
         lambda i: i.a1, lambda i: i.a2),
    Verb("combine-kohya", False, ".safetensors",
         lambda i, o: ["combine", i.flux, i.flux2, "--method", "cat", "-o", o, "-q"], lambda i: i.flux2,
         lambda i: None),
    Verb("resize", True, "", lambda i, o: ["resize", i.a1, "--rank", "2", "-o", o, "-q"], lambda i: i.a1,
         lambda i: i.a1),
    Verb("resize-kohya", False, ".safetensors", lambda i, o: ["resize", i.flux, "--rank", "1", "-o", o, "-q"],
         lambda i: i.flux, lambda i: None),
    Verb("extract", True, "", lambda i, o: ["extract", i.base, i.ft, "--rank", "2", "-o", o, "-q", "--no-progress"],
         lambda i: i.ft, lambda i: i.ft),
    Verb("convert", False, ".safetensors",
         lambda i, o: ["convert", i.flux, "--to", "peft", "--family", "flux", "-o", o, "-q"], lambda i: i.flux,
         lambda i: None),
    Verb("similarity-plot", False, ".png", lambda i, o: ["similarity", i.a1, i.a2, "--plot", o], lambda i: i.a2,
         lambda i: i.a1),
    Verb("info-spectrum", False, ".png", lambda i, o: ["info", i.a1, "--spectrum", o], lambda i: i.a1,
         lambda i: i.a1),
]
FOLDER_VERBS = [v for v in VERBS if v.folder]
FILE_VERBS = [v for v in VERBS if not v.folder]


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root` (or `root` itself): sha256 of files, 'dir' for folders, the link target of
    links; and the inode of `root`. {} when absent."""
    if not os.path.lexists(root):
        return {}
    out: dict[str, object] = {"<inode>": root.lstat().st_ino}
    entries = [root] + (sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
    for p in entries:
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def run(capsys: pytest.CaptureFixture[str], verb: Verb, inp: Inputs, out: Path | str, *extra: str) -> tuple[int, str]:
    code = main([str(a) for a in verb.argv(inp, str(out))] + list(extra))
    return code, capsys.readouterr().err


def make_foreign_folder(path: Path) -> None:
    for rel, data in FOREIGN.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)


def assert_lorafuse_output(out: Path, folder: bool) -> None:
    """`out` carries lorafuse's mark, read with independent tools; a folder's manifest lists exactly its files,
    with their sizes and (small files) sha256."""
    if folder:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        assert manifest["written_by"] == "lorafuse" and manifest["version"] == lorafuse.__version__
        files = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
        files.pop(MANIFEST)
        assert set(manifest["files"]) == set(files)
        assert set(manifest["folders"]) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_dir()}
        for rel, rec in manifest["files"].items():
            data = files[rel].read_bytes()
            assert rec["size"] == len(data)
            assert rec.get("sha256", hashlib.sha256(data).hexdigest()) == hashlib.sha256(data).hexdigest()
            assert ("sha256" in rec) == (len(data) <= 1 << 20)
    elif out.suffix == ".png":
        with Image.open(out) as image:
            assert image.text[MARK] == lorafuse.__version__
    else:
        with safe_open(str(out), "np") as f:
            assert (f.metadata() or {})[MARK] == lorafuse.__version__


def assert_refused(code: int, err: str, *words: str) -> None:
    assert code == 1, err
    assert err.startswith("lorafuse ") and ": error: OutputError: " in err and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


def out_path(tmp_path: Path, verb: Verb, name: str = "out") -> Path:
    return tmp_path / f"{name}{verb.suffix}"


# ----------------------------------------------------------------------------- what may be written


@pytest.mark.parametrize("verb", VERBS, ids=str)
def test_a_new_path_is_written_with_lorafuse_mark(verb, inp, tmp_path, capsys):
    out = out_path(tmp_path / "new" / "deeper", verb)
    code, err = run(capsys, verb, inp, out)
    assert code == 0 and "note:" not in err, err
    assert_lorafuse_output(out, verb.folder)
    assert leftovers(out) == []


@pytest.mark.parametrize("verb", VERBS, ids=str)
def test_an_empty_folder_or_file_is_written(verb, inp, tmp_path, capsys):
    out = out_path(tmp_path, verb)
    if verb.folder:
        out.mkdir()
    else:
        out.write_bytes(b"")
    code, err = run(capsys, verb, inp, out)
    assert code == 0 and "note:" not in err, err
    assert_lorafuse_output(out, verb.folder)


@pytest.mark.parametrize("verb", VERBS, ids=str)
def test_an_earlier_lorafuse_output_is_replaced_silently(verb, inp, tmp_path, capsys):
    out = out_path(tmp_path, verb)
    assert run(capsys, verb, inp, out)[0] == 0
    inode = out.stat().st_ino
    code, err = run(capsys, verb, inp, out)
    assert code == 0 and "note:" not in err, err
    assert out.stat().st_ino != inode  # a new output was renamed into place
    assert_lorafuse_output(out, verb.folder)
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("verb", FOLDER_VERBS, ids=str)
def test_a_lorafuse_folder_the_user_added_to_is_refused(verb, inp, tmp_path, capsys):
    out = out_path(tmp_path, verb)
    assert run(capsys, verb, inp, out)[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "scores.csv").write_text("1,2\n")
    before = snapshot(out)
    code, err = run(capsys, verb, inp, out)
    assert_refused(code, err, f"output {out} is an earlier lorafuse output", "entries lorafuse did not write",
                   "eval/", "notes.txt", "--overwrite")
    assert "scores.csv" not in err  # a folder lorafuse did not write is named once, not walked
    assert snapshot(out) == before and leftovers(out) == []


@pytest.mark.parametrize("verb", FOLDER_VERBS, ids=str)
def test_a_lorafuse_folder_whose_file_was_edited_is_refused(verb, inp, tmp_path, capsys):
    out = out_path(tmp_path, verb)
    assert run(capsys, verb, inp, out)[0] == 0
    manifest = json.loads((out / MANIFEST).read_text())
    edited = sorted(manifest["files"])[0]
    data = bytearray((out / edited).read_bytes())
    data[-1] ^= 1  # same size, other content
    (out / edited).write_bytes(bytes(data))
    before = snapshot(out)
    code, err = run(capsys, verb, inp, out)
    assert_refused(code, err, f"output {out}", "changed since lorafuse wrote them", edited)
    assert snapshot(out) == before


@pytest.mark.parametrize("verb", FILE_VERBS, ids=str)
def test_a_lorafuse_file_the_user_changed_is_refused(verb, inp, tmp_path, capsys):
    out = out_path(tmp_path, verb)
    assert run(capsys, verb, inp, out)[0] == 0
    with open(out, "r+b") as f:  # keeps the mark, breaks the file: no longer lorafuse's whole output
        if verb.suffix == ".png":
            f.truncate(40)
        else:
            f.seek(0, 2)
            f.write(b"appended")
    before = snapshot(out)
    code, err = run(capsys, verb, inp, out)
    assert_refused(code, err, f"output {out} is a file lorafuse did not write", "--overwrite")
    assert snapshot(out) == before


@pytest.mark.parametrize("verb", VERBS, ids=str)
def test_a_folder_of_the_users_is_refused(verb, inp, tmp_path, capsys):
    out = out_path(tmp_path, verb)
    out.mkdir()
    make_foreign_folder(out)
    before = snapshot(out)
    code, err = run(capsys, verb, inp, out)
    if verb.folder:
        assert_refused(code, err, f"output {out} is a folder lorafuse did not write (no {MANIFEST})",
                       "README.md, config.json, model.safetensors, notes.md, run.py, scripts/ and 2 more",
                       "nothing was written", "--overwrite")
    else:
        assert_refused(code, err, f"output {out} is a folder; give a file name")
        code, err = run(capsys, verb, inp, out, "--overwrite")  # never replaced by a file
        assert_refused(code, err, f"output {out} is a folder; give a file name", "even with --overwrite")
    assert snapshot(out) == before and leftovers(out) == []


@pytest.mark.parametrize("verb", VERBS, ids=str)
def test_a_file_of_the_users_is_refused(verb, inp, tmp_path, capsys):
    out = out_path(tmp_path, verb)
    out.write_bytes(b"w\n")
    code, err = run(capsys, verb, inp, out)
    if verb.folder:
        assert_refused(code, err, f"output {out} exists and is not a folder (a file of 2 bytes)")
        code, err = run(capsys, verb, inp, out, "--overwrite")  # never replaced by a folder
        assert_refused(code, err, "is not a folder", "even with --overwrite")
    else:
        assert_refused(code, err, f"output {out} is a file lorafuse did not write (2 bytes", "nothing was written",
                       "--overwrite")
    assert out.read_bytes() == b"w\n" and leftovers(out) == []


# ----------------------------------------------------------------------------- --overwrite


@pytest.mark.parametrize("verb", VERBS, ids=str)
def test_overwrite_replaces_what_the_user_named_and_says_what(verb, inp, tmp_path, capsys):
    out = out_path(tmp_path, verb)
    if verb.folder:
        out.mkdir()
        make_foreign_folder(out)
    else:
        out.write_bytes(b"w\n")
    code, err = run(capsys, verb, inp, out, "--overwrite")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: --overwrite replaced")]
    assert len(notes) == 1, err
    assert notes[0].startswith(f"note: --overwrite replaced {out}, ")
    if verb.folder:
        assert "a folder lorafuse did not write" in notes[0] and "README.md" in notes[0]
        # the user's README.md is gone (a README.md there now is lorafuse's model card, issue #16)
        assert not (out / "notes.md").exists() and not (out / "scripts").exists()
        assert not (out / "README.md").exists() or (out / "README.md").read_bytes() != FOREIGN["README.md"]
    else:
        assert "a file lorafuse did not write (2 bytes" in notes[0]
    assert_lorafuse_output(out, verb.folder)
    assert leftovers(out) == []
    code, err = run(capsys, verb, inp, out, "--overwrite")  # now lorafuse's own: replaced without a note
    assert code == 0 and "note: --overwrite" not in err, err


# ----------------------------------------------------------------------------- paths never replaced


@pytest.mark.parametrize("verb", VERBS, ids=str)
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_the_current_folder_and_those_above_it_are_refused(verb, overwrite, inp, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    deep = work / "deep"
    deep.mkdir(parents=True)
    (deep / "mine.txt").write_text("keep")
    monkeypatch.chdir(deep)
    before = snapshot(tmp_path)
    extra = ("--overwrite",) if overwrite else ()
    for out, words in ((".", [f"output . ({deep}) is the current folder"]),
                       ("./", ["is the current folder"]),
                       ("..", [f"output .. ({work}) holds the current folder {deep}"]),
                       (str(work), [f"output {work} holds the current folder"]),
                       (str(deep / ".." / "deep"), ["is the current folder"])):
        code, err = run(capsys, verb, inp, out, *extra)
        assert_refused(code, err, *words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("verb", VERBS, ids=str)
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_an_input_and_the_folders_around_it_are_refused(verb, overwrite, inp, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(inp.folder)
    extra = ("--overwrite",) if overwrite else ()
    first = verb.first_input(inp)
    cases = [(first, "would overwrite the input"),
             (inp.folder, "which is inside it"),  # the folder that holds the inputs
             (inp.root, "which is inside it")]
    folder = verb.input_folder(inp)
    if folder is not None:
        cases.append((folder / f"sub{verb.suffix}", f"is inside the input folder {folder}"))
    for out, words in cases:
        code, err = run(capsys, verb, inp, out, *extra)
        assert_refused(code, err, f"output {out}", words)
    assert snapshot(inp.folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_issue_through_a_subprocess(inp, tmp_path):
    """`mkdir -p models/llama-7b && echo w > models/llama-7b/model.safetensors; lorafuse apply base adapter
    -o models` exited 0 and models/llama-7b was gone; `-o .` said 'Device or resource busy'."""
    (tmp_path / "models" / "llama-7b").mkdir(parents=True)
    (tmp_path / "models" / "llama-7b" / "model.safetensors").write_text("w\n")
    cmd = [sys.executable, "-m", "lorafuse", "apply", str(inp.base), str(inp.a1), "--no-progress", "-q", "-o"]
    proc = subprocess.run([*cmd, "models"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == ("lorafuse apply: error: OutputError: output models is a folder lorafuse did not write "
                           f"(no {MANIFEST}) holding llama-7b/; lorafuse replaces an output folder as a whole, so "
                           "it would delete them: nothing was written. Give a new or empty folder, or pass "
                           "--overwrite (Python: overwrite=True) to replace it with everything in it\n")
    assert (tmp_path / "models" / "llama-7b" / "model.safetensors").read_text() == "w\n"
    proc = subprocess.run([*cmd, "."], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"output . ({tmp_path}) is the current folder" in proc.stderr
    assert "busy" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    proc = subprocess.run([*cmd, "models/llama-7b-merged"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "models" / "llama-7b" / "model.safetensors").read_text() == "w\n"
    assert_lorafuse_output(tmp_path / "models" / "llama-7b-merged", True)


def test_refusals_come_before_the_work(inp, tmp_path, capsys, monkeypatch):
    """A refused output costs nothing: the check runs before extract, combine, resize and the plots work."""
    import lorafuse.ops.extract as extract_mod

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the work started")

    monkeypatch.setattr(extract_mod, "extract", boom)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    code, err = run(capsys, VERBS[7], inp, out)
    assert_refused(code, err, f"output {out} is a folder lorafuse did not write")


# ----------------------------------------------------------------------------- the Python API


@pytest.mark.parametrize("fmt", ["peft", "kohya", "diffusers"])
def test_adapter_save_follows_the_rules(fmt, inp, tmp_path):
    adapter = lorafuse.load({"peft": inp.a1, "kohya": inp.flux, "diffusers": inp.diffusers}[fmt])
    folder = fmt == "peft"
    out = tmp_path / ("out" if folder else "out.safetensors")
    assert adapter.save(out) == out
    assert_lorafuse_output(out, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OverwriteWarning)  # a lorafuse output: no warning
        adapter.save(out)
    user = tmp_path / ("user" if folder else "user.safetensors")
    if folder:
        user.mkdir()
        make_foreign_folder(user)
    else:
        save_file({"w": np.ones(2, np.float32)}, str(user), metadata={"author": "me"})
    before = snapshot(user)
    with pytest.raises(OutputError) as info:
        adapter.save(user)
    assert f"output {user} is a {'folder' if folder else 'file'} lorafuse did not write" in str(info.value)
    assert "overwrite=True" in str(info.value)
    assert snapshot(user) == before
    with pytest.warns(OverwriteWarning, match=f"overwrite=True replaced {user}, a (folder|file) lorafuse did not "
                                              "write"):  # (round 7: the API's keyword, not the CLI's flag)
        adapter.save(user, overwrite=True)
    assert_lorafuse_output(user, folder)


def test_api_apply_convert_and_plots_take_overwrite(inp, tmp_path):
    user_dir = tmp_path / "merged"
    user_dir.mkdir()
    (user_dir / "keep.txt").write_text("keep")
    user_file = tmp_path / "user.safetensors"
    user_file.write_bytes(b"not a safetensors file")
    user_png = tmp_path / "plot.png"
    Image.new("RGB", (4, 4)).save(user_png)  # a PNG of the user's: no lorafuse text chunk
    calls: list[tuple[Path, Callable[[bool], object]]] = [
        (user_dir, lambda ow: lorafuse.apply(inp.base, [inp.a1], out=user_dir, progress=False, overwrite=ow)),
        (user_file, lambda ow: lorafuse.convert(inp.flux, user_file, to="kohya", overwrite=ow)),
        (user_png, lambda ow: plot_spectrum(lorafuse.load(inp.a1), user_png, overwrite=ow)),
        (user_png, lambda ow: plot_similarity(np.eye(2), ["a", "b"], user_png, overwrite=ow)),
    ]
    for path, call in calls[:3]:
        before = snapshot(path)
        with pytest.raises(OutputError, match=f"output {path} is a (folder|file) lorafuse did not write"):
            call(False)
        assert snapshot(path) == before
        with pytest.warns(OverwriteWarning, match=f"replaced {path}"):
            call(True)
        assert_lorafuse_output(path, path.is_dir())
    calls[3][1](False)  # the PNG is lorafuse's now: replaced without overwrite


def test_outputs_load_in_peft_and_transformers_with_the_manifest(tmp_path):
    """The manifest is an extra file that PEFT's from_pretrained, transformers' from_pretrained and lorafuse
    itself ignore; an output used as an input is not copied with its old manifest."""
    case = llama_case(tmp_path / "case", seed=7)
    merged = tmp_path / "merged"
    lorafuse.apply(case.base_dir, [case.adapter_dir], out=merged, progress=False)
    model = case.model_cls.from_pretrained(str(merged))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for key, ref in case.merged_state.items():
        np.testing.assert_allclose(state[key], ref, rtol=0, atol=1e-5, err_msg=key)
    resized = tmp_path / "resized"
    main(["resize", str(case.adapter_dir), "--rank", "2", "-o", str(resized), "-q"])
    assert (resized / MANIFEST).is_file()
    peft_model = PeftModel.from_pretrained(case.model_cls.from_pretrained(str(case.base_dir)), str(resized))
    assert sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n) == len(lorafuse.load(resized))
    # A lorafuse output as the base of another run: the new folder gets its own manifest, listing its files.
    again = tmp_path / "again"
    lorafuse.apply(merged, [case.adapter_dir], out=again, progress=False)
    assert_lorafuse_output(again, True)


def test_an_old_mark_is_replaced_by_a_fresh_one(inp, tmp_path):
    """Metadata read from a lorafuse-written file (kohya keeps an input's metadata) does not carry the old
    mark into a new file: the new file has one mark, this version's, last."""
    src = tmp_path / "old.safetensors"
    with safe_open(str(inp.flux), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(src), metadata={MARK: "0.0.1", "ss_network_dim": "2"})
    out = lorafuse.load(src).save(tmp_path / "new.safetensors")
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8:8 + n], object_pairs_hook=lambda p: p)
    meta = dict(meta)["__metadata__"]
    assert [k for k, _ in meta].count(MARK) == 1 and meta[-1] == (MARK, lorafuse.__version__)


# ----------------------------------------------------------------------------- the atomic writers


def _write(tmp: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)


def test_what_a_lorafuse_folder_may_and_may_not_have_become(tmp_path):
    out = tmp_path / "out"
    files = {"a.bin": b"a" * 100, "sub/b.txt": b"b", "sub/deeper/c.txt": b"c"}
    with atomic_dir(out, kind="test") as tmp:
        _write(tmp, files)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "test" and manifest["folders"] == ["sub", "sub/deeper"]
    assert sorted(manifest["files"]) == sorted(files)
    # A listed file that is gone: nothing to lose, replaced.
    (out / "sub" / "b.txt").unlink()
    with atomic_dir(out) as tmp:
        _write(tmp, files)
    # A file added deep inside; a folder added; a listed file changed: refused, each named.
    (out / "sub" / "deeper" / "mine.txt").write_text("m")
    (out / "extra").mkdir()
    (out / "a.bin").write_bytes(b"A" * 100)
    before = snapshot(out)
    with pytest.raises(OutputError) as info:
        with atomic_dir(out):
            raise AssertionError("the body must not run")
    msg = str(info.value)
    assert "entries lorafuse did not write: extra/, sub/deeper/mine.txt" in msg
    assert "files changed since lorafuse wrote them: a.bin" in msg
    assert snapshot(out) == before
    # A manifest that is not lorafuse's (hand-made, or broken JSON): a folder lorafuse did not write.
    for text in ('{"written_by": "someone", "files": {}}', "{not json", '{"written_by": "lorafuse"}'):
        folder = tmp_path / f"m{len(text)}"
        folder.mkdir()
        (folder / MANIFEST).write_text(text)
        with pytest.raises(OutputError, match=f"its {MANIFEST} is not lorafuse's"):
            with atomic_dir(folder):
                raise AssertionError("the body must not run")
        assert (folder / MANIFEST).read_text() == text


def test_any_file_name_round_trips_through_the_manifest(tmp_path):
    """Names that are not UTF-8 (bytes from another system) or not ASCII: the manifest lists them as
    os.listdir gives them, so the output is recognised as lorafuse's own and replaced."""
    out = tmp_path / "out"
    names = [os.fsdecode(b"raw\xff.bin"), "h\u00e9llo \u65e5\u672c.txt", "sub/\u00fc.txt"]
    with atomic_dir(out) as tmp:
        _write(tmp, {n: b"x" for n in names})
    assert json.loads((out / MANIFEST).read_bytes().decode("ascii"))["files"].keys() == set(names)
    assert check_output(out, folder=True) is None  # lorafuse's own, untouched
    (out / os.fsdecode(b"more\xfe")).write_bytes(b"y")
    with pytest.raises(OutputError, match="entries lorafuse did not write: more"):
        check_output(out, folder=True)


def test_links_fifos_and_devices_are_never_replaced(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=f"output {link} is a symbolic link \\(to {target}\\)"):
            with atomic_dir(link, overwrite=overwrite):
                raise AssertionError("the body must not run")
        with pytest.raises(OutputError, match=f"output {fifo} is a FIFO"):
            with atomic_file(fifo, overwrite=overwrite):
                raise AssertionError("the body must not run")
        with pytest.raises(OutputError, match="output /dev/null is a character device"):
            check_output("/dev/null", folder=False, overwrite=overwrite)
    assert link.is_symlink() and (target / "keep.txt").read_text() == "keep" and fifo.is_fifo()
    with pytest.raises(LorafuseValueError, match="give the output a name"):
        check_output(tmp_path / "x" / "..", folder=True)


def _keeps_xattrs(path: Path) -> bool:
    """Whether the file system of `path` keeps user extended attributes (where the stamp decides)."""
    try:
        os.getxattr(path, STAMP_XATTR)
    except OSError as e:
        return e.errno == errno.ENODATA
    return True


def test_single_file_marks_are_read_strictly(tmp_path):
    """A .safetensors file is lorafuse's when its header is valid, the data fills the file and the metadata
    has the mark; a PNG when a tEXt chunk says so (written here by PIL, an independent writer). Each also needs
    the stamp lorafuse puts on what it writes (io.manifest.stamp, put here by hand) where the file system keeps
    extended attributes: without it, a marked file is a copy or a download, maybe the user's only one."""
    marked = {MARK: lorafuse.__version__}
    ok = tmp_path / "ok.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(ok), metadata=marked)
    if _keeps_xattrs(ok):
        with pytest.raises(OutputError, match="a file lorafuse did not write as it is now .*not as lorafuse left it"):
            check_output(ok, folder=False)
    stamp(ok)
    check_output(ok, folder=False)
    for name, meta, tail in (("nomark", {"a": "b"}, b""), ("trailing", marked, b"\0" * 8)):
        bad = tmp_path / f"{name}.safetensors"
        save_file({"w": np.ones(3, np.float32)}, str(bad), metadata=meta)
        with open(bad, "ab") as f:
            f.write(tail)
        with pytest.raises(OutputError, match="is a file lorafuse did not write"):
            check_output(bad, folder=False)
    info = PngImagePlugin.PngInfo()
    info.add_text(MARK, "9.9")
    Image.new("RGB", (2, 2)).save(tmp_path / "ours.png", pnginfo=info)
    stamp(tmp_path / "ours.png")
    check_output(tmp_path / "ours.png", folder=False)
    Image.new("RGB", (2, 2)).save(tmp_path / "theirs.png")
    with pytest.raises(OutputError, match="is a file lorafuse did not write"):
        check_output(tmp_path / "theirs.png", folder=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OverwriteWarning)
        (tmp_path / "empty.png").write_bytes(b"")
        with atomic_file(tmp_path / "empty.png") as tmp:  # an empty file: nothing to lose, no warning
            tmp.write_bytes(b"x")


def test_a_peft_folder_without_a_manifest_is_the_users(inp, tmp_path):
    """PEFT's own save_pretrained output (no manifest) is the user's: resize into it is refused."""
    user = tmp_path / "peft_saved"
    user.mkdir()
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 4).numpy()}, str(user / "adapter_model.safetensors"))
    (user / "adapter_config.json").write_text("{}")
    with pytest.raises(OutputError, match="adapter_config.json, adapter_model.safetensors"):
        lorafuse.load(inp.a1).save(user)

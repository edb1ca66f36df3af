"""What a red-team found in how lorafuse treats the files around an operation, each checked on small files this
test writes itself: an output that is an input under another name (a hard link), an output's permissions, the
folders a failed run made, names near the file system's limit, messages for a path that cannot hold an output,
short writes without an errno, the hash cache's temporary entries, `--weights` and `--from-list` text, paths the
system refuses to look at, and Ctrl-C before a command starts."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse import FormatError, OutputError
from lorafuse.cli import main
from lorafuse.io.atomic import atomic_dir, atomic_file, check_output
from lorafuse_entry import interrupted

H, R = 8, 2
Q = "model.layers.0.self_attn.q_proj"


def _adapter(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": ["q_proj"],
        "base_model_name_or_path": "tiny"}))
    save_file({f"base_model.model.{Q}.lora_A.weight": rng.standard_normal((R, H)).astype(np.float32),
               f"base_model.model.{Q}.lora_B.weight": rng.standard_normal((H, R)).astype(np.float32)},
              str(folder / "adapter_model.safetensors"))
    return folder


def _kohya(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    m = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{m}.lora_down.weight": rng.standard_normal((R, H)).astype(np.float32),
               f"{m}.lora_up.weight": rng.standard_normal((H, R)).astype(np.float32),
               f"{m}.alpha": np.array(float(R), dtype=np.float32)}, str(path))
    return path


def _base(folder: Path) -> Path:
    folder.mkdir(parents=True)
    w = np.random.default_rng(9).standard_normal((H, H)).astype(np.float32)
    save_file({f"{Q}.weight": w}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def _cli(*argv: str) -> int:
    return main(list(argv))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- outputs


def test_an_output_that_is_an_input_under_another_name_is_refused(tmp_path, capsys):
    """A hard link to the input (the same file, as a bind mount or a case-insensitive file system would show
    it) is refused as the input itself, with and without --overwrite: files are compared by identity too."""
    src = _kohya(tmp_path / "k.safetensors")
    other = tmp_path / "sub"
    other.mkdir()
    os.link(src, other / "k.safetensors")
    before = src.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert _cli("resize", str(src), "--rank", "1", "-o", str(other / "k.safetensors"), *extra) == 1
        assert "would overwrite the input" in capsys.readouterr().err
    assert src.read_bytes() == before and os.stat(src).st_nlink == 2


def test_replacing_an_output_keeps_its_permissions(tmp_path):
    """A private output (0600 file; 0700 folder holding 0600 files) stays private when a later run replaces it;
    a new output gets the umask's modes."""
    a = _adapter(tmp_path / "a")
    one, folder = tmp_path / "one.safetensors", tmp_path / "folder"
    lorafuse.resize(_kohya(tmp_path / "k.safetensors"), rank=1, out=one)
    lorafuse.resize(a, rank=1, out=folder)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(one).st_mode) == 0o666 & ~umask
    os.chmod(one, 0o600)
    os.chmod(folder, 0o700)
    os.chmod(folder / "adapter_model.safetensors", 0o600)
    lorafuse.resize(tmp_path / "k.safetensors", rank=1, out=one)
    lorafuse.resize(a, rank=1, out=folder)
    assert stat.S_IMODE(os.stat(one).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(folder / "adapter_model.safetensors").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder / "adapter_config.json").st_mode) == 0o666 & ~umask
    # a read-only output: others' bits kept, the owner's write restored (so that the next run can replace it)
    os.chmod(folder / "adapter_model.safetensors", 0o440)
    os.chmod(folder, 0o550)
    lorafuse.resize(a, rank=1, out=folder)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(folder / "adapter_model.safetensors").st_mode) == 0o640
    lorafuse.resize(a, rank=1, out=folder)  # and it can: nothing is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "folder", "k.safetensors", "one.safetensors"]


def test_a_failed_run_removes_the_folders_it_made(tmp_path, capsys):
    for cm, name in ((atomic_file, "x.safetensors"), (atomic_dir, "x")):
        with pytest.raises(ValueError, match="boom"):
            with cm(tmp_path / "new1" / "new2" / name):
                raise ValueError("boom")
        assert not (tmp_path / "new1").exists()
    # a folder that was there stays; only what the run made goes
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "kept" / "new" / "x.safetensors"):
            raise ValueError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())
    # the same through the command line: a merge that overflows float32 writes nothing and makes no folder
    base, a = _base(tmp_path / "base"), _adapter(tmp_path / "a")
    assert _cli("apply", str(base), str(a), "--weights", "1e38", "-o", str(tmp_path / "n1" / "n2" / "merged")) == 1
    err = capsys.readouterr().err
    assert "overflows float32" in err and "rounded" not in err  # F32 out: nothing is rounded to a narrower type
    assert not (tmp_path / "n1").exists()


@pytest.mark.parametrize("length", [200, 230, 250])
def test_an_output_name_near_the_length_limit_is_written(tmp_path, length):
    """The temporary entry beside the output would pass the 255-byte limit for names: it takes a short form."""
    src = _kohya(tmp_path / "k.safetensors")
    out = tmp_path / ("é" * ((length - 12) // 2) + ".safetensors")  # two bytes per character
    assert len(os.fsencode(out.name)) <= 255
    for _ in range(2):  # the second run replaces the first one's output
        lorafuse.resize(src, rank=1, out=out)
        assert sorted(load_file(str(out))) == sorted(load_file(str(src)))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["k.safetensors", out.name])


def test_a_path_that_cannot_hold_an_output_is_named(tmp_path, capsys):
    src = _kohya(tmp_path / "k.safetensors")
    (tmp_path / "afile").write_text("mine")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    assert _cli("resize", str(src), "--rank", "1", "-o", str(tmp_path / "afile" / "x.safetensors")) == 1
    assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
    assert _cli("resize", str(src), "--rank", "1", "-o", str(tmp_path / "dangling" / "x.safetensors")) == 1
    assert f"is a link to {tmp_path / 'gone'}, which does not exist" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "gone").exists()


def test_a_short_write_without_an_errno_is_an_output_error(tmp_path, monkeypatch):
    """numpy's tofile says "N requested and M written" in an OSError without an errno (a full disk, a file size
    limit): the GGUF writer reports it as an OutputError naming the output, and leaves no temporary file."""
    gguf = pytest.importorskip("gguf")
    a = _adapter(tmp_path / "a")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H,
                               "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1,
                               "intermediate_size": 16, "vocab_size": 32}))
    out = tmp_path / "x.gguf"
    lorafuse.convert(a, out, to="gguf", base_config=cfg)  # the case converts
    first = out.read_bytes()

    def short(self: object, tensor: object) -> None:
        raise OSError("1280 requested and 432 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", short)
    for target, state in ((tmp_path / "new.gguf", "nothing was written"), (out, f"{out} is unchanged")):
        with pytest.raises(OutputError, match=f"cannot write the output {target}: 1280 requested and 432 written.*"
                                              f"{state}"):
            lorafuse.convert(a, target, to="gguf", base_config=cfg, overwrite=True)
    assert out.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == ["a", "config.json", "x.gguf"]


def test_the_hash_cache_leaves_no_temporary_entry_and_follows_no_link(tmp_path, monkeypatch):
    from lorafuse.io import provenance

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("LORAFUSE_HASH_CACHE", str(cache))
    monkeypatch.setattr(provenance, "CACHE_MIN_BYTES", 1)
    monkeypatch.setattr(provenance, "CACHE_SETTLED_NS", 0)
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 4096)
    want = provenance.sha256_file(f)

    def refuse(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(provenance.os, "replace", refuse)
    assert provenance.cached_sha256(f) == want
    assert list(cache.iterdir()) == []  # the temporary entry went with the failure
    monkeypatch.undo()
    monkeypatch.setenv("LORAFUSE_HASH_CACHE", str(cache))
    monkeypatch.setattr(provenance, "CACHE_MIN_BYTES", 1)
    monkeypatch.setattr(provenance, "CACHE_SETTLED_NS", 0)
    entry = cache / provenance._cache_key(os.stat(f))
    planted = tmp_path / "planted"
    planted.write_text("0" * 64 + "\n")
    os.symlink(planted, entry)  # someone else's link at the entry's name in a shared cache: not read
    assert provenance.cached_sha256(f) == want
    assert entry.is_file() and not entry.is_symlink() and entry.read_text().strip() == want
    assert planted.read_text() == "0" * 64 + "\n"


# ----------------------------------------------------------------------------- command-line text


@pytest.mark.parametrize("weights", ["1,,2", "0.5,", ",1", "-inf,1", "nan,1"])
def test_weights_with_an_empty_or_non_finite_field_are_refused(tmp_path, capsys, weights):
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b", 1)
    with pytest.raises(SystemExit) as e:
        _cli("combine", str(a), str(b), "--weights", weights, "-o", str(tmp_path / "out"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --weights" in err and repr(weights) in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_list_is_read_strictly(tmp_path, capsys):
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b", 1)
    lists = tmp_path / "lists"
    lists.mkdir()
    cases = {
        "first.txt": ("missing\nb\n", 1, "first.txt line 1: no such file or folder"),
        "second.txt": ("a\nmissing\n", 1, "second.txt line 2: no such file or folder"),
        "nan.txt": ("a nan\nb\n", 2, "nan.txt line 1: weight 'nan' is not finite"),
        "inf.txt": ("a 1\nb -Inf\n", 2, "inf.txt line 2: weight '-Inf' is not finite"),
        "nul.txt": ("a\nb\0\n", 1, "nul.txt line 2: holds a NUL byte"),
    }
    for name in ("a", "b"):
        os.symlink(tmp_path / name, lists / name)
    for name, (text, code, message) in cases.items():
        (lists / name).write_text(text)
        assert _cli("combine", "--from-list", str(lists / name), "-o", str(tmp_path / "out")) == code, name
        assert message in capsys.readouterr().err, name
    os.mkfifo(lists / "fifo.txt")  # refused at once, without waiting for a writer
    assert _cli("combine", "--from-list", str(lists / "fifo.txt"), "-o", str(tmp_path / "out")) == 1
    assert "is a FIFO" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # the list is an input: an output that holds it, or is it, is refused even with --overwrite
    (lists / "ok.txt").write_text("a\nb\n")
    before = _snapshot(lists)
    assert _cli("combine", "--from-list", str(lists / "ok.txt"), "-o", str(lists), "--overwrite") == 1
    assert "would overwrite the input" in capsys.readouterr().err
    assert _snapshot(lists) == before
    assert _cli("combine", "--from-list", str(lists / "ok.txt"), "-o", str(tmp_path / "out"), "-q") == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and a.is_dir() and b.is_dir()


def test_paths_the_system_will_not_look_at_are_one_line_errors(tmp_path):
    """A name longer than the file system allows and a loop of links: one line and exit 1 from every command
    that reads them, and lorafuse's own FormatError from the Python API (not OSError or RuntimeError)."""
    long = tmp_path / ("x" * 300 + ".safetensors")
    os.symlink(tmp_path / "loop2.safetensors", tmp_path / "loop1.safetensors")
    os.symlink(tmp_path / "loop1.safetensors", tmp_path / "loop2.safetensors")
    base = _base(tmp_path / "base")
    loop = tmp_path / "loop1.safetensors"
    runs = [["info", str(long)], ["similarity", str(long), str(long)], ["resize", str(long), "--rank", "1"],
            ["apply", str(base), str(long)], ["extract", str(base), str(long), "--rank", "1"],
            ["extract", str(loop), str(base), "--rank", "1"], ["info", str(loop)]]
    for argv in runs:
        out = [] if argv[0] in ("info", "similarity") else ["-o", str(tmp_path / "out")]
        res = subprocess.run([sys.executable, "-m", "lorafuse.cli", *argv, *out], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 1, (argv, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, (argv, res.stderr)
    for target in (long, loop):
        with pytest.raises(FormatError):
            lorafuse.load(target)
    with pytest.raises(FormatError):
        lorafuse.extract(loop, base, tmp_path / "out", rank=1)
    assert not (tmp_path / "out").exists()


def test_ctrl_c_before_the_command_starts_is_said_in_one_line(monkeypatch, capsys):
    import lorafuse.cli as cli

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", stopped)
    assert main(["info", "x"]) == 130
    assert capsys.readouterr().err == "lorafuse: interrupted; no output was written\n"
    try:  # an import that Ctrl-C stopped halfway raises ImportError while handling it
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("partially initialized module") from None
    except ImportError as e:
        assert interrupted(e)
    assert not interrupted(ImportError("no module named x"))


def test_an_output_edited_in_place_is_the_users(tmp_path):
    """Every output file is stamped with its size and modification time (an extended attribute, not its bytes):
    a same-size edit in place of a file too big to hash, or of a marked .safetensors file, makes it the user's;
    an untouched output is replaced silently; one with no stamp (copied, downloaded) is the user's too."""
    from lorafuse.io.manifest import STAMP_XATTR

    folder, one = tmp_path / "out", tmp_path / "one.safetensors"
    with atomic_dir(folder) as tmp:
        (tmp / "big.bin").write_bytes(b"\1" * (3 << 20))  # over the manifest's hash limit: not hashed
    with atomic_file(one) as tmp:
        save_file({"w": np.ones(4, np.float32)}, str(tmp), metadata={"lorafuse_version": lorafuse.__version__})
    try:
        os.getxattr(one, STAMP_XATTR)
    except OSError:
        pytest.skip("this file system keeps no extended attributes")
    for _ in range(2):  # untouched: replaced silently, and stamped again
        assert check_output(folder, folder=True) is None and check_output(one, folder=False) is None
        with atomic_dir(folder) as tmp:
            (tmp / "big.bin").write_bytes(b"\1" * (3 << 20))
        with atomic_file(one) as tmp:
            save_file({"w": np.ones(4, np.float32)}, str(tmp), metadata={"lorafuse_version": lorafuse.__version__})
    for path in (folder / "big.bin", one):
        with open(path, "r+b") as f:  # the same size, the header and mark intact
            f.seek(-4, os.SEEK_END)
            f.write(b"\0\0\0\0")
    with pytest.raises(OutputError, match="files changed since lorafuse wrote them: big.bin"):
        check_output(folder, folder=True)
    with pytest.raises(OutputError, match="is a file lorafuse did not write"):
        check_output(one, folder=False)
    for path in (folder / "big.bin", one):
        os.removexattr(path, STAMP_XATTR)  # no stamp where the file system keeps them: a copy, maybe the only one
    with pytest.raises(OutputError, match="files changed since lorafuse wrote them: big.bin"):
        check_output(folder, folder=True)
    with pytest.raises(OutputError, match="is a file lorafuse did not write as it is now"):
        check_output(one, folder=False)


def test_a_peft_folder_whose_files_are_not_files_says_which(tmp_path):
    a = _adapter(tmp_path / "a")
    (a / "adapter_config.json").unlink()
    os.mkfifo(a / "adapter_config.json")
    with pytest.raises(FormatError, match=r"adapter_config.json: is a FIFO, not a file"):
        lorafuse.load(a)
    b = _adapter(tmp_path / "b")
    (b / "adapter_model.safetensors").unlink()
    (b / "adapter_model.safetensors").mkdir()
    with pytest.raises(FormatError, match=r"adapter_model.safetensors: .*a directory, not a file"):
        lorafuse.load(b)


def test_dir_lists_the_public_names_only():
    names = {n for n in dir(lorafuse) if not n.startswith("_")}
    assert names == set(lorafuse.__all__) - {"__version__"}
    assert {"os", "annotations", "TYPE_CHECKING"}.isdisjoint(names) and "__version__" in dir(lorafuse)

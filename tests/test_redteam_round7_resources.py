"""Red team, round 7: resources and interruption.

- the open-file limit (EMFILE) while a failed run removes its temporary folder: shutil.rmtree's error callback
  retried os.open with the path alone (TypeError, a traceback) and the temporary folder stayed behind;
- a failed run said "the temporary output was removed" when it could not be (EMFILE), naming no leftover;
- an error while the finished folder's manifest is written (os.fwalk under EMFILE names '.' or nothing) escaped
  as a bare OSError ("lorafuse resize: error: Too many open files"), not an OutputError naming the output;
- convert advised --overwrite for an existing file at a name it cannot write (no .safetensors / .gguf suffix),
  and with --overwrite then refused the name;
- a module that would not load (numpy under ulimit -v: "failed to map segment"), or memory running out, before
  the command started was a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from redteam_fixtures import kohya_file, peft_folder, run_cli, stop_import, write_recipe

from lorafuse.errors import OutputError
from lorafuse.io.atomic import atomic_dir
from lorafuse.io.manifest import ADAPTER

pytestmark = pytest.mark.filterwarnings("ignore")

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 8), "model.layers.0.self_attn.v_proj": (16, 8)}
TEMP = re.compile(r"\.out\.tmp-\d+-[a-z0-9_]{8}\Z")


def _emfile(path: str, *args: object, **kwargs: object) -> int:
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), os.fsdecode(path))


# ----------------------------------------------------------------------------- 1. cleanup under the open-file limit
def test_a_temporary_folder_that_cannot_be_removed_is_named_not_a_traceback(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:  # was: TypeError: open() missing required argument 'flags'
        with atomic_dir(out, kind=ADAPTER) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"half")
            monkeypatch.setattr(os, "open", _emfile)  # no descriptor left: rmtree cannot open the folder either
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(tmp / "adapter_config.json"))
    monkeypatch.undo()
    left = sorted(p.name for p in tmp_path.iterdir())
    msg = str(e.value)
    assert not out.exists()
    assert "`ulimit -n`" in msg, msg  # what to do about the limit
    assert len(left) == 1 and TEMP.match(left[0]), left
    # was: "the temporary output was removed" while it was still there
    assert f"the temporary output {tmp_path / left[0]} could not be removed" in msg, msg


def test_an_error_writing_the_manifest_names_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"

    def fwalk(*args: object, **kwargs: object) -> object:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))  # as os.fwalk raises it: no file named

    with pytest.raises(OutputError) as e:  # was: a bare OSError, "lorafuse resize: error: Too many open files"
        with atomic_dir(out, kind=ADAPTER) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"x")
            monkeypatch.setattr(os, "fwalk", fwalk)
    monkeypatch.undo()
    assert str(e.value).startswith(f"cannot write the output {out}: Too many open files"), str(e.value)
    assert "the temporary output was removed and nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []


_UNDER_LIMIT = """
import resource, sys
from lorafuse.cli import main
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
sys.exit(main(sys.argv[2:]))
"""


def test_combine_under_small_open_file_limits_is_one_line_and_leaves_only_named_temporaries(tmp_path: Path) -> None:
    """A real limit: the command loaded, then RLIMIT_NOFILE set a few descriptors above what is open."""
    a, b = peft_folder(tmp_path / "a", SHAPES, 1), peft_folder(tmp_path / "b", SHAPES, 2)
    out = tmp_path / "o" / "out"
    out.parent.mkdir()
    failed = 0
    for extra in range(0, 8):
        limit = 3 + extra  # stdin, stdout, stderr and a few more
        r = subprocess.run([sys.executable, "-c", _UNDER_LIMIT, str(limit), "combine", str(a), str(b), "-o", str(out),
                            "-q"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert "Traceback" not in r.stderr, (limit, r.stderr[-3000:])
        assert r.returncode in (0, 1), (limit, r.returncode, r.stderr[-2000:])
        assert r.stderr.count("\n") <= 1, (limit, r.stderr)
        entries = sorted(p.name for p in out.parent.iterdir() if p.name != "out")
        assert all(TEMP.match(n) for n in entries), (limit, entries)  # only lorafuse's clearly named entries
        for n in entries:
            assert str(out.parent / n) in r.stderr or "could not be removed" not in r.stderr, (limit, r.stderr)
        failed += r.returncode != 0
    assert failed  # the limits reached the run
    r = subprocess.run([sys.executable, "-m", "lorafuse", "combine", str(a), str(b), "-o", str(out), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # the next run removed what the others left
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


# ----------------------------------------------------------------------------- 2. convert: the name before --overwrite
@pytest.mark.parametrize("to", ["peft", "gguf"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_refuses_a_name_it_cannot_write_before_judging_what_is_there(tmp_path: Path, to: str,
                                                                              overwrite: bool) -> None:
    src = kohya_file(tmp_path / "k.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 1) if to == "peft" \
        else peft_folder(tmp_path / "a", SHAPES, 1)
    out = tmp_path / "notes"
    out.write_text("my notes\n")
    extra = ["--arch", "llama"] if to == "gguf" else []
    code, _, err = run_cli(["convert", str(src), "--to", to, *extra, "-o", str(out)]
                           + (["--overwrite"] if overwrite else []))
    assert code == 2, err
    suffix = ".gguf" if to == "gguf" else ".safetensors"
    assert f"give a name ending in {suffix}" in err, err
    assert "--overwrite" not in err, err  # was: "pass --overwrite", which then refused the name
    assert out.read_text() == "my notes\n"


# ----------------------------------------------------------------------------- 3. before the command starts
def test_a_module_that_will_not_load_before_the_command_is_one_line(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    a = peft_folder(tmp_path / "a", SHAPES, 1)
    monkeypatch.delitem(sys.modules, "lorafuse.backends", raising=False)
    stop_import(monkeypatch, "lorafuse.backends",
                ImportError("_umath_linalg.so: failed to map segment from shared object"))
    code, _, err = run_cli(["info", str(a)])  # was: the ImportError's traceback
    assert code == 1
    assert err == "lorafuse: error: _umath_linalg.so: failed to map segment from shared object; no output was " \
                  "written\n", err


def test_memory_running_out_before_the_command_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorafuse._variants as variants

    a = peft_folder(tmp_path / "a", SHAPES, 1)

    def no_memory() -> None:
        raise MemoryError

    monkeypatch.setattr(variants, "forced_variant", no_memory)
    code, _, err = run_cli(["info", str(a)])  # was: a MemoryError traceback
    assert code == 1
    assert err.startswith("lorafuse: error: out of memory") and err.count("\n") == 1, err


def test_under_a_small_address_space_limit_the_cli_is_one_line(tmp_path: Path) -> None:
    """ulimit -v: each limit fails somewhere else (numpy's import, OpenBLAS, an arena), never with a traceback."""
    a = peft_folder(tmp_path / "a", SHAPES, 1)

    def limited(limit: int) -> subprocess.CompletedProcess[str]:
        def pre() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

        return subprocess.run([sys.executable, "-m", "lorafuse", "info", str(a)], capture_output=True, text=True,
                              timeout=120, preexec_fn=pre)

    reached = 0
    for mib in range(64, 192, 12):  # from below what the interpreter needs to more than the command needs
        r = limited(mib << 20)
        assert "Traceback" not in r.stderr, (mib, r.stderr[-3000:])
        if "lorafuse" in r.stderr or r.returncode == 0:  # lorafuse ran (below, the interpreter itself could not)
            reached += 1
            assert r.returncode in (0, 1) and r.stderr.count("\n") <= 1, (mib, r.returncode, r.stderr)
    assert reached


# ----------------------------------------------------------------------------- 4. out of memory after an output
def test_out_of_memory_in_a_later_stage_names_the_kept_intermediate_output(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import lorafuse.cli as cli

    peft_folder(tmp_path / "a", SHAPES, 1)
    peft_folder(tmp_path / "b", SHAPES, 2)
    recipe = write_recipe(tmp_path, "name: s1\nmerge_method: linear\nmodels:\n  - model: a\n  - model: b\n---\n"
                                    "name: s2\nmerge_method: resize\nmodels:\n  - model: s1\nparameters: {rank: 1}\n")

    def no_memory(args: object) -> int:
        raise MemoryError

    monkeypatch.setattr(cli, "_cmd_resize", no_memory)  # the second stage runs out of memory
    keep = tmp_path / "keep"
    code, _, err = run_cli(["run", str(recipe), "-o", str(tmp_path / "out"), "--intermediate-dir", str(keep), "-q"])
    assert code == 1
    assert (keep / "s1" / "adapter_config.json").is_file()  # the first stage's output, kept
    assert not (tmp_path / "out").exists()
    assert "no output was written" not in err, err  # was: said so, with keep/s1 written
    assert err.startswith("lorafuse run: error: out of memory") and f"{keep / 's1'} was written before it failed" \
        in err and err.count("\n") == 1, err

"""Red team, round 17: lorafuse used as scripts and pipelines use it, several runs at once around each other's files.

1. A file or folder beside the output that only happens to be named as a killed run's leftover
   (`.NAME.tmp-PID-XXXXXXXX`, `.NAME.old-PID-XXXXXXXX`, its PID gone) was deleted by the next run writing NAME, or
   moved to NAME: the user's notes lost. A run marks its own temporary and set-aside entries (an extended attribute)
   and only those, or empty ones, are removed.
2. Reading the umask set the whole process's umask to 0 for an instant: every file that another thread of the
   caller's program (or another lorafuse run in a thread) created meanwhile got mode 0o666 / 0o777, writable by
   everyone. The umask is now read without changing it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import kohya_file, llm_base, peft_folder
from safetensors.numpy import load_file

import lorafuse
from lorafuse.io import atomic

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8)}
TEMP_MARK = "user.lorafuse.temporary"  # io.atomic.TEMP_XATTR


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    return llm_base(tmp_path / "base", SHAPES), peft_folder(tmp_path / "a", SHAPES, seed=1)


def _merged_ok(out: Path, base: Path, adapter: Path) -> None:
    """The merged q_proj against numpy float64: W + B @ A (alpha = rank)."""
    w = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    f = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    ref = w + f[f"{key}.lora_B.weight"].astype(np.float64) @ f[f"{key}.lora_A.weight"].astype(np.float64)
    got = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_a_users_file_named_like_a_killed_runs_temporary_file_is_kept(tmp_path, inputs):
    base, adapter = inputs
    out = tmp_path / "merged"
    notes = tmp_path / f".merged.tmp-{_dead_pid()}-abcdefgh"
    notes.write_text("my precious notes\n")
    lorafuse.apply(base, [adapter], out=out, progress=False)
    _merged_ok(out, base, adapter)
    assert notes.read_text() == "my precious notes\n"


def test_a_users_folder_named_like_a_killed_runs_temporary_entry_is_kept(tmp_path):
    """A file output (resize of a kohya file): a folder of the user's beside it, named as a dead run's entry."""
    src = kohya_file(tmp_path / "k.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", seed=3)
    out = tmp_path / "k_r1.safetensors"
    keep = tmp_path / f".k_r1.safetensors.tmp-{_dead_pid()}-zz_99x00"
    keep.mkdir()
    (keep / "eval.sh").write_text("#!/bin/sh\n")
    lorafuse.resize(src, 1, out=out)
    assert out.is_file()
    assert (keep / "eval.sh").read_text() == "#!/bin/sh\n"


def test_a_users_folder_named_like_a_set_aside_output_is_neither_moved_nor_deleted(tmp_path, inputs):
    base, adapter = inputs
    out = tmp_path / "merged"
    aside = tmp_path / f".merged.old-{_dead_pid()}-0123abcd"
    aside.mkdir()
    (aside / "notes.txt").write_text("keep\n")
    lorafuse.apply(base, [adapter], out=out, progress=False)  # the user's folder was moved to `merged`: refused
    _merged_ok(out, base, adapter)
    assert (aside / "notes.txt").read_text() == "keep\n"
    assert not (out / "notes.txt").exists()


def test_a_killed_runs_own_leftovers_are_still_removed(tmp_path, inputs):
    """The other side: what a run killed outright (SIGKILL) leaves is removed by the next run, and an empty entry
    of the name (killed before it marked it) too; the output carries no mark of a temporary entry."""
    base, adapter = inputs
    out = tmp_path / "merged"
    script = ("import os, sys, lorafuse\n"
              "from lorafuse.io import atomic\n"
              "with atomic.atomic_dir(sys.argv[1]) as tmp:\n"
              "    (tmp / 'model.safetensors').write_bytes(b'partial')\n"
              "    os.kill(os.getpid(), 9)\n")
    killed = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp-")]
    assert len(left) == 1
    empty = tmp_path / f".merged.tmp-{_dead_pid()}-aaaaaaaa"
    empty.touch()
    lorafuse.apply(base, [adapter], out=out, progress=False)
    _merged_ok(out, base, adapter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base", "merged"]
    if hasattr(os, "listxattr"):
        assert TEMP_MARK not in os.listxattr(out)
        assert TEMP_MARK not in os.listxattr(out / "model.safetensors")


def test_writing_an_output_never_sets_the_process_umask_to_zero(tmp_path, inputs, monkeypatch):
    """os.umask(0) for an instant: a file another thread creates in that instant is writable by everyone."""
    base, adapter = inputs
    real = os.umask
    seen: list[int] = []

    def spy(mask: int) -> int:
        seen.append(mask)
        return real(mask)

    monkeypatch.setattr(os, "umask", spy)
    before = real(0o022)
    try:
        lorafuse.apply(base, [adapter], out=tmp_path / "merged", progress=False)
    finally:
        real(before)
    assert 0 not in seen, seen
    mode = stat.S_IMODE(os.stat(tmp_path / "merged" / "model.safetensors").st_mode)
    assert mode == 0o644, oct(mode)


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_the_outputs_folder_removed_while_the_run_goes_on_is_said(tmp_path, inputs, monkeypatch, how):
    """Another process removes (or renames) the folder the output is written in while the run goes on: one line
    that says so, nothing left behind, not a bare 'No such file or directory'."""
    import shutil

    from lorafuse.errors import OutputError

    base, adapter = inputs
    folder = tmp_path / "runs"
    out = folder / "merged"
    real = atomic._commit_check

    def meanwhile(*args, **kwargs):
        if how == "removed":
            shutil.rmtree(folder)
        else:
            os.rename(folder, tmp_path / "moved")
        return real(*args, **kwargs)

    monkeypatch.setattr(atomic, "_commit_check", meanwhile)
    with pytest.raises(OutputError) as e:
        lorafuse.apply(base, [adapter], out=out, progress=False)
    assert f"its folder {folder} was removed or renamed while the run went on" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "moved").exists() or os.listdir(tmp_path / "moved") == []


def test_an_adapter_folder_replaced_between_its_config_and_its_weights_is_refused(tmp_path, monkeypatch):
    """`lorafuse combine -o mix` (or a download) replaces the folder `mix` while `apply base mix` reads it: the
    config read was the old one (lora_alpha 2, scale 1), the weights the new one's (lora_alpha 8, scale 4). The merged
    model came out with the new weights at the old scale, a model neither version makes; now refused."""
    import lorafuse.formats.peft as peft_format
    from lorafuse.errors import InputChangedError

    base = llm_base(tmp_path / "base", SHAPES)
    mix = peft_folder(tmp_path / "mix", SHAPES, seed=1, alpha=2)
    new = peft_folder(tmp_path / "new", SHAPES, seed=2, alpha=8)
    real = peft_format._read_config

    def then_replaced(folder):
        cfg = real(folder)
        if new.exists():
            os.rename(mix, tmp_path / "old")
            os.rename(new, mix)
        return cfg

    monkeypatch.setattr(peft_format, "_read_config", then_replaced)
    out = tmp_path / "merged"
    with pytest.raises(InputChangedError, match="adapter_config.json was replaced while the adapter was read"):
        lorafuse.apply(base, [mix], out=out, progress=False)
    assert not out.exists()
    monkeypatch.setattr(peft_format, "_read_config", real)
    lorafuse.apply(base, [mix], out=out, progress=False)  # read again once written: the new version, whole
    m = "model.layers.0.self_attn.q_proj"
    f = load_file(str(mix / "adapter_model.safetensors"))
    w = load_file(str(base / "model.safetensors"))[f"{m}.weight"].astype(np.float64)
    key = f"base_model.model.{m}"
    ref = w + 4.0 * (f[f"{key}.lora_B.weight"].astype(np.float64) @ f[f"{key}.lora_A.weight"])
    np.testing.assert_allclose(load_file(str(out / "model.safetensors"))[f"{m}.weight"], ref, rtol=1e-5, atol=1e-5)

"""Sixth red-team round, files and outputs: each test is a finding that was wrong before, checked against the file
system itself (what is left beside the output, what a mount point holds, the exit status a signal gives)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from redteam_fixtures import kohya_file, namespace_prefix, peft_folder

from lorafuse.io import atomic

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (8, 8)}


def _hidden(folder: Path) -> list[str]:
    """What a run left beside its output: the hidden temporary entries (`.NAME.tmp-PID-...`, `.lorafuse-run-...`)."""
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


# ----------------------------------------------------------------------------- 1: an output that is a mount point

_IN_MOUNT = """
import json, subprocess, sys
from pathlib import Path
cmds = json.loads(sys.argv[1])
out = []
for argv in cmds:
    p = subprocess.run([sys.executable, "-c", "import sys; from lorafuse.cli import main; sys.exit(main(sys.argv[1:]))",
                        *argv], capture_output=True, text=True)
    out.append([p.returncode, p.stdout, p.stderr])
print(json.dumps(out))
"""


def _mount_prefix(probe_dir: Path) -> list[str] | None:
    """A command prefix under which `mount --bind` works (root, or an unprivileged user and mount namespace)."""
    probe_dir.mkdir()
    (probe_dir / "a").mkdir()
    (probe_dir / "b").mkdir()
    return namespace_prefix(f"mount --bind {probe_dir / 'a'} {probe_dir / 'b'}")


def _in_namespace(prefix: list[str], mount: str, cwd: Path, cmds: list[list[str]]) -> list[list]:
    """Run the lorafuse command lines `cmds` after the shell command `mount`, in a private mount namespace."""
    script = f"{mount} && exec {sys.executable} -c \"$0\" \"$1\""
    p = subprocess.run([*prefix, "sh", "-c", script, _IN_MOUNT, json.dumps(cmds)], capture_output=True, text=True,
                       cwd=cwd, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _run_with_mount(tmp_path: Path, source: Path, point: Path, cmds: list[list[str]], monkeypatch,
                    capsys) -> list[list]:
    """Run the lorafuse command lines `cmds` with `source` bind-mounted on `point` (in a private mount namespace);
    where no namespace can be made, the mount table lorafuse reads is made to list `point` (the same decision)."""
    prefix = _mount_prefix(tmp_path / "probe")
    if prefix is not None:
        return _in_namespace(prefix, f"mount --bind {source} {point}", tmp_path, cmds)
    from lorafuse.cli import main

    table = atomic._mount_table  # the fallback: the same check, told of the mount
    monkeypatch.setattr(atomic, "_mount_table", lambda: [*(table() or []), os.path.realpath(point)])
    results = []
    for argv in cmds:
        code = main(argv)
        captured = capsys.readouterr()
        results.append([code, captured.out, captured.err])
    return results


def test_an_output_folder_that_is_a_mount_point_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """`docker run -v $PWD/out:/out ... -o /out`: the output is a mount point, which rename(2) cannot replace
    (EBUSY). It was found only at the commit, after all the work (a merge of a large model), as 'Device or
    resource busy', and the dry run said it would be written. It is refused before any work, naming the mount
    point and a path inside it that works."""
    a = peft_folder(tmp_path / "a", SHAPES, 1)
    (tmp_path / "disk").mkdir()  # a new, empty disk: an empty folder is a place an output may be
    out = tmp_path / "out"
    out.mkdir()
    res = _run_with_mount(tmp_path, tmp_path / "disk", out, [
        ["resize", str(a), "--rank", "1", "-o", str(out), "--dry-run"],
        ["resize", str(a), "--rank", "1", "-o", str(out), "--overwrite"],
        ["resize", str(a), "--rank", "1", "-o", str(out / "out")],
    ], monkeypatch, capsys)
    for rc, _stdout, err in res[:2]:
        assert rc == 1, err
        assert "is a mount point" in err and f"{out / 'out'}" in err, err
        assert err.count("\n") <= 1 and "Traceback" not in err
    assert res[2][0] == 0, res[2][2]  # the path the message gives works
    # on the mounted disk (seen outside the namespace at its source), or where the fallback left the folder
    made = [d for d in (tmp_path / "disk", out) if os.listdir(d)]
    assert len(made) == 1 and os.listdir(made[0]) == ["out"], made
    assert (made[0] / "out" / "adapter_model.safetensors").is_file()
    assert _hidden(tmp_path) == []


def test_an_output_file_that_is_a_bind_mount_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """A file bind-mounted over the output's name (docker -v file:file) cannot be replaced by a rename either."""
    k = kohya_file(tmp_path / "k.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 3)
    (tmp_path / "host.safetensors").write_bytes(b"")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"")
    res = _run_with_mount(tmp_path, tmp_path / "host.safetensors", out, [
        ["convert", str(k), "--to", "peft", "-o", str(out), "--dry-run"],
    ], monkeypatch, capsys)
    rc, _stdout, err = res[0]
    assert rc == 1 and "is a mount point" in err and "another path" in err, err
    assert (tmp_path / "host.safetensors").read_bytes() == b""
    assert _hidden(tmp_path) == []


# ----------------------------------------------------------------------------- 2: SIGHUP (terminal closed)

_SIGNAL_AT = """
import os, signal, sys
import lorafuse.io.atomic as at
where = sys.argv[1]
original = getattr(at, where)
def send(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGHUP)
    return original(*args, **kwargs)
setattr(at, where, send)
from lorafuse.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _hup_run(where: str, argv: list[str], ignore: bool = False) -> subprocess.CompletedProcess[str]:
    def pre() -> None:
        if ignore:  # nohup
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    return subprocess.run([sys.executable, "-c", _SIGNAL_AT, where, *argv], capture_output=True, text=True,
                          timeout=120, preexec_fn=pre)


def test_a_hang_up_while_writing_removes_the_temporary_output(tmp_path):
    """An ssh session dropped or a terminal closed sends SIGHUP, whose default action killed lorafuse mid-write:
    the temporary output (the size of the merged model) stayed hidden beside -o. It ends the command as SIGTERM
    does: the temporary output removed, one line, exit status 128 + 1."""
    a = peft_folder(tmp_path / "a", SHAPES, 1)
    out = tmp_path / "out"
    p = _hup_run("write_manifest", ["resize", str(a), "--rank", "1", "-o", str(out)])
    assert p.returncode == 129, (p.returncode, p.stderr)
    assert p.stderr.strip() == "lorafuse resize: terminated (SIGHUP); no output was written", p.stderr
    assert not out.exists() and _hidden(tmp_path) == []


def test_a_hang_up_while_the_output_is_put_in_place_waits_for_it(tmp_path):
    """SIGHUP is held, as SIGINT and SIGTERM are, while the output is renamed into place: the output is then whole
    and the message says it was written."""
    a = peft_folder(tmp_path / "a", SHAPES, 1)
    out = tmp_path / "out"
    p = _hup_run("_keep_modes", ["resize", str(a), "--rank", "1", "-o", str(out)])
    assert p.returncode == 129, (p.returncode, p.stderr)
    assert p.stderr.strip() == f"lorafuse resize: terminated (SIGHUP) after {out} was written", p.stderr
    assert (out / "adapter_model.safetensors").is_file() and _hidden(tmp_path) == []


def test_a_hang_up_under_nohup_is_still_ignored(tmp_path):
    """nohup ignores SIGHUP: lorafuse keeps it ignored (the command completes)."""
    a = peft_folder(tmp_path / "a", SHAPES, 1)
    out = tmp_path / "out"
    p = _hup_run("write_manifest", ["resize", str(a), "--rank", "1", "-o", str(out), "-q"], ignore=True)
    assert p.returncode == 0, p.stderr
    assert (out / "adapter_model.safetensors").is_file() and _hidden(tmp_path) == []


# ----------------------------------------------------------------------------- 3: a folder that cannot be written


def test_an_output_on_a_read_only_disk_is_refused_before_any_work_and_by_the_dry_run(tmp_path, monkeypatch, capsys):
    """`-o` on a read-only file system (or a folder the user may not write in): the dry run said it would write
    there, and the run did all its work (an SVD combine, the similarity matrix, printed) before failing to make
    its temporary output. The system says so before any work: the dry run and the run refuse at once, in the
    words of the failure, exit status 1."""
    a = peft_folder(tmp_path / "a", SHAPES, 1)
    b = peft_folder(tmp_path / "b", SHAPES, 2)
    ro = tmp_path / "ro"
    ro.mkdir()
    cmds = [["combine", str(a), str(b), "-o", str(ro / "ab"), "--dry-run"],
            ["resize", str(a), "--rank", "1", "-o", str(ro / "new" / "r1")],
            ["similarity", str(a), str(b), "--plot", str(ro / "sim.svg")]]
    prefix = _mount_prefix(tmp_path / "probe")
    if prefix is not None:
        res = _in_namespace(prefix, f"mount -t tmpfs -o ro,size=64k tmpfs {ro}", tmp_path, cmds)
        why = "Read-only file system"
    else:  # a user without namespaces: a folder of mode 0555 (root would write in it)
        from lorafuse.cli import main

        ro.chmod(0o555)
        res = []
        for argv in cmds:
            code = main(argv)
            captured = capsys.readouterr()
            res.append([code, captured.out, captured.err])
        ro.chmod(0o755)
        why = "Permission denied"
    (rc0, out0, err0), (rc1, _, err1), (rc2, out2, err2) = res
    assert rc0 == 1 and out0 == "", (rc0, out0)
    assert err0.strip() == (f"lorafuse combine: error: OutputError: cannot create a temporary folder beside the "
                            f"output {ro / 'ab'}: {why}"), err0
    assert rc1 == 1 and f"cannot create the folder {ro / 'new'} for the output {ro / 'new' / 'r1'}: {why}" in err1
    assert rc2 == 1 and out2 == "", out2  # refused before the matrix was computed and printed
    assert f"cannot create a temporary file beside the output {ro / 'sim.svg'}: {why}" in err2, err2
    assert os.listdir(ro) == []


# ----------------------------------------------------------------------------- 4: the group of a replaced output


def test_a_replaced_output_keeps_its_group(tmp_path):
    """A team's output folder (group `team`, mode 2775) was replaced by one of the user's own group: its mode said
    group-writable, but for another group, so the team lost access. The group is kept where the user may give it
    (root; a group the user is in), before the mode (a chown clears the set-group-ID bit)."""
    a = peft_folder(tmp_path / "a", SHAPES, 1)
    groups = [g for g in ([54321] if os.geteuid() == 0 else os.getgroups()) if g != os.getegid()]
    team = groups[0] if groups else os.getegid()
    out = tmp_path / "out"
    kfile = tmp_path / "r.safetensors"
    k = kohya_file(tmp_path / "k.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 3)
    from lorafuse.cli import main

    assert main(["resize", str(a), "--rank", "1", "-o", str(out), "-q"]) == 0
    assert main(["resize", str(k), "--rank", "1", "-o", str(kfile), "-q"]) == 0
    for p in (out, out / "adapter_model.safetensors", kfile):
        os.chown(p, -1, team)
    os.chmod(out, 0o2775)
    os.chmod(out / "adapter_model.safetensors", 0o664)
    os.chmod(kfile, 0o640)
    assert main(["resize", str(a), "--rank", "1", "-o", str(out), "-q"]) == 0
    assert main(["resize", str(k), "--rank", "1", "-o", str(kfile), "-q"]) == 0
    st, inner, f = os.stat(out), os.stat(out / "adapter_model.safetensors"), os.stat(kfile)
    assert (st.st_gid, oct(st.st_mode & 0o7777)) == (team, oct(0o2775))
    assert (inner.st_gid, oct(inner.st_mode & 0o777)) == (team, oct(0o664))
    assert (f.st_gid, oct(f.st_mode & 0o777)) == (team, oct(0o640))

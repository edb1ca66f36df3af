"""Lead, round 15: the console script's entry (`lorafuse_entry.run`) ends the process without the interpreter's
teardown once a command is done; what a command wrote, printed and returned must be exactly what `main` gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
RUN = "import sys; from lorafuse_entry import run; sys.exit(run())"


def _model(tmp: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A float32 base of two q_proj weights and a rank-2 PEFT adapter on them; returns the float64 merge."""
    rng = np.random.default_rng(7)
    base, ad = tmp / "base", tmp / "ad"
    base.mkdir()
    ad.mkdir()
    weights = {f"model.layers.{i}.self_attn.q_proj.weight": rng.standard_normal((12, 10)).astype(np.float32)
               for i in range(2)}
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    factors: dict[str, np.ndarray] = {}
    want: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        a = rng.standard_normal((2, 10)).astype(np.float32)
        b = rng.standard_normal((12, 2)).astype(np.float32)
        factors[f"{stem}.lora_A.weight"] = a
        factors[f"{stem}.lora_B.weight"] = b
        want[name] = w.astype(np.float64) + 3.0 / 2 * (b.astype(np.float64) @ a.astype(np.float64))
    save_file(factors, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 3,
                                                        "target_modules": ["q_proj"]}))
    return base, ad, want


def _script(code: str, *args: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)  # type: ignore[call-overload]


def test_the_installed_console_script_is_run() -> None:
    """pyproject's console script is lorafuse_entry:run (the entry these tests check), not main."""
    import re

    text = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+; the project supports 3.10
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert re.findall(r'^lorafuse\s*=\s*"([^"]+)"', section, flags=re.M) == ["lorafuse_entry:run"]


def test_run_writes_the_merge_and_prints_all_of_its_output_to_a_pipe(tmp_path: Path) -> None:
    base, ad, want = _model(tmp_path)
    out = tmp_path / "out"
    p = _script(RUN, "apply", base, ad, "-o", out, "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)  # the whole JSON document reached the pipe before the process ended
    assert report["out"] == str(out) and sorted(report["merged"]) == sorted(want)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_allclose(got[name].astype(np.float64), w, rtol=2e-6, atol=2e-6)
    assert (out / "lorafuse_manifest.json").is_file()


def test_run_gives_mains_status_and_one_line_on_failure(tmp_path: Path) -> None:
    base, _, _ = _model(tmp_path)
    p = _script(RUN, "apply", base, tmp_path / "missing-adapter", "-o", tmp_path / "o")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "missing-adapter" in p.stderr
    assert not (tmp_path / "o").exists()


def test_run_keeps_atexit_handlers_and_waits_for_other_threads(tmp_path: Path) -> None:
    """A caller's atexit handler still runs, and a thread still running when the command ends is not cut off:
    run then leaves through the interpreter's own exit."""
    base, ad, _ = _model(tmp_path)
    mark, late = tmp_path / "atexit.txt", tmp_path / "thread.txt"
    code = (f"import atexit, sys, threading, time, pathlib\n"
            f"atexit.register(lambda: pathlib.Path({str(mark)!r}).write_text('ran'))\n"
            f"def slow():\n    time.sleep(0.5)\n    pathlib.Path({str(late)!r}).write_text('done')\n"
            f"threading.Thread(target=slow).start()\n"
            f"from lorafuse_entry import run\nsys.exit(run())\n")
    p = _script(code, "apply", base, ad, "-o", tmp_path / "o")
    assert p.returncode == 0, p.stderr
    assert mark.read_text() == "ran"
    assert late.read_text() == "done"
    p = _script(f"import atexit, sys, pathlib\n"
                f"atexit.register(lambda: pathlib.Path({str(mark)!r}).write_text('again'))\n"
                f"from lorafuse_entry import run\nsys.exit(run())\n", "info", ad)
    assert p.returncode == 0 and "peft" in p.stdout
    assert mark.read_text() == "again"


def test_run_with_a_reader_that_left_is_quiet(tmp_path: Path) -> None:
    """`lorafuse info ... | head -1`: status 141 and no 'Exception ignored' from a flush at the exit."""
    _, ad, _ = _model(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", RUN, "info", str(ad)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader left before anything was read
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=120) in (0, 141)
    assert "Exception ignored" not in err and "Traceback" not in err


def _data_start(path: Path) -> int:
    import struct

    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _file_offsets(path: Path) -> dict[str, int]:
    start = _data_start(path)
    with open(path, "rb") as f:
        f.seek(8)
        header = json.loads(f.read(start - 8))
    return {k: start + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_encode_header_pads_to_the_data_start_asked_for_modulo_a_page() -> None:
    from lorafuse.io.safetensors import PAGE_ALIGN, TensorSpec, encode_header

    specs = [TensorSpec("a", "F32", (3, 5)), TensorSpec("b", "BF16", (7,))]
    natural, offsets = encode_header(specs, {"format": "pt"})
    assert len(natural) % 8 == 0 and offsets == {"a": 0, "b": 60}
    for want in (8, 856, 2616, 4088, len(natural), len(natural) + 8):
        header, _ = encode_header(specs, {"format": "pt"}, want)
        assert len(header) % PAGE_ALIGN == want % PAGE_ALIGN
        assert len(natural) <= len(header) < len(natural) + PAGE_ALIGN
        body = header[8:]
        assert json.loads(body) == json.loads(natural[8:])  # spaces only
        assert body.rstrip(b" ") == natural[8:].rstrip(b" ")
    # not a multiple of 8 (data would start misaligned): the natural header
    assert encode_header(specs, {"format": "pt"}, 2617)[0] == natural


def test_apply_keeps_copied_tensors_at_their_place_within_pages(tmp_path: Path) -> None:
    """Tensors apply copies unchanged (copy_file_range) sit at the same offset modulo 4096 as in the base, so the
    kernel copies them page by page; the file still loads in safetensors (numpy and torch) with every value."""
    import torch
    from safetensors.torch import load_file as load_torch

    rng = np.random.default_rng(3)
    base, ad = tmp_path / "base", tmp_path / "ad"
    base.mkdir()
    ad.mkdir()
    weights = {"model.embed_tokens.weight": rng.standard_normal((300, 16)).astype(np.float32),
               "model.layers.0.input_layernorm.weight": rng.standard_normal(16).astype(np.float32),
               "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float32),
               "model.layers.0.mlp.up_proj.weight": rng.standard_normal((40, 16)).astype(np.float32)}
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    a = rng.standard_normal((2, 16)).astype(np.float32)
    b = rng.standard_normal((16, 2)).astype(np.float32)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                        "target_modules": ["q_proj"]}))
    out = tmp_path / "out"
    p = _script(RUN, "apply", base, ad, "-o", out)
    assert p.returncode == 0, p.stderr
    src, dst = _file_offsets(base / "model.safetensors"), _file_offsets(out / "model.safetensors")
    assert _data_start(out / "model.safetensors") % 8 == 0
    copied = [k for k in weights if "q_proj" not in k]
    for k in copied:
        assert (dst[k] - src[k]) % 4096 == 0, k
    got = load_file(str(out / "model.safetensors"))
    for k in copied:
        np.testing.assert_array_equal(got[k], weights[k])
    want_q = weights["model.layers.0.self_attn.q_proj.weight"].astype(np.float64) + b.astype(np.float64) @ a
    np.testing.assert_allclose(got["model.layers.0.self_attn.q_proj.weight"], want_q, rtol=2e-6, atol=2e-6)
    t = load_torch(str(out / "model.safetensors"))
    assert torch.equal(t["model.embed_tokens.weight"], torch.from_numpy(weights["model.embed_tokens.weight"]))


def test_an_adapter_whose_rank_directions_are_scaled_apart_is_combined_not_zeroed(tmp_path: Path) -> None:
    """One adapter's two rank directions carry B x 2^30, A x 2^-30 and B x 2^-30, A x 2^30 (the same product):
    sum_i ||B_i||_F ||A_i||_F is 2^60 times its delta's norm. A 'terms cancel' test on that size (tried this round
    and not kept) wrote it as zeros; both engines must give numpy float64's delta."""
    import lorafuse

    rng = np.random.default_rng(0)
    q = "model.layers.0.self_attn.q_proj"
    s = np.array([2.0**30, 2.0**-30])
    a, b = rng.standard_normal((2, 16)), rng.standard_normal((16, 2))
    want = {"x": b @ a, "y": None}
    for name, (fa, fb) in {"x": (a / s[:, None], b * s[None, :]),
                           "y": (rng.standard_normal((2, 16)), rng.standard_normal((16, 2)))}.items():
        folder = tmp_path / name
        folder.mkdir()
        save_file({f"base_model.model.{q}.lora_A.weight": fa.astype(np.float32),
                   f"base_model.model.{q}.lora_B.weight": fb.astype(np.float32)},
                  str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                                "target_modules": ["q_proj"]}))
        if want[name] is None:
            want[name] = fb.astype(np.float32).astype(np.float64) @ fa.astype(np.float32).astype(np.float64)
    expected = want["x"] + 1e-6 * want["y"]
    for engine in ("memory", "stream"):
        mix = lorafuse.combine([tmp_path / "x", tmp_path / "y"], [1, 1e-6], rank=4, engine=engine, dtype="fp32")
        u = mix.updates[q]
        bb, aa = (np.asarray(x, np.float64) for x in u.stored_factors(0))
        got = u.scale * bb @ aa
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5, engine


def test_writer_writes_in_pieces_of_at_most_write_piece_and_survives_short_writes(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """SafetensorsWriter hands the kernel at most WRITE_PIECE bytes a call (large calls made the page cache's
    largest folios, slow on this VM), including the partial counts a write() may return: the file is complete and
    reads back equal in safetensors."""
    import os

    from lorafuse.io import safetensors as st

    rng = np.random.default_rng(5)
    big = rng.standard_normal((700, 1000)).astype(np.float32)  # 2.8 MB: 11 pieces
    small = rng.standard_normal(33).astype(np.float32)
    sizes: list[int] = []
    real_write, real_pwrite = os.write, os.pwrite

    def short_write(fd: int, data: memoryview) -> int:  # type: ignore[no-untyped-def]
        sizes.append(len(data))
        return real_write(fd, data[: max(1, len(data) * 2 // 3)])  # a partial write, as a signal or a pipe gives

    def short_pwrite(fd: int, data: memoryview, at: int) -> int:  # type: ignore[no-untyped-def]
        sizes.append(len(data))
        return real_pwrite(fd, data[: max(1, len(data) * 2 // 3)], at)

    monkeypatch.setattr(st.os, "write", short_write)
    monkeypatch.setattr(st.os, "pwrite", short_pwrite)
    specs = [st.TensorSpec("big", "F32", big.shape), st.TensorSpec("small", "F32", small.shape)]
    with st.SafetensorsWriter(tmp_path / "seq.safetensors", specs, {"format": "pt"}) as w:
        w.write("big", big)
        w.write("small", small)
    with st.SafetensorsWriter(tmp_path / "at.safetensors", specs, {"format": "pt"}) as w:
        w.write_at("small", small)
        w.write_at("big", big)
    monkeypatch.undo()
    assert sizes and max(sizes) <= st.WRITE_PIECE
    assert sum(1 for s in sizes if s == st.WRITE_PIECE) >= 2 * (big.nbytes // st.WRITE_PIECE)
    for name in ("seq", "at"):
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        np.testing.assert_array_equal(got["big"], big)
        np.testing.assert_array_equal(got["small"], small)


def test_compiles_lost_memory_error_while_lorafuse_loads_is_one_line(tmp_path: Path) -> None:
    """Under ulimit -v, compiling one of lorafuse's modules can fail as "SystemError: <built-in function compile>
    returned NULL without setting an exception" (a MemoryError CPython lost): one line and status 1, not a
    traceback. Simulated by a finder that fails so for lorafuse.cli."""
    code = ("import sys\n"
            "class Lost:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'lorafuse.cli':\n"
            "            raise SystemError('<built-in function compile> returned NULL without setting an exception')\n"
            "        return None\n"
            "sys.meta_path.insert(0, Lost())\n"
            "from lorafuse_entry import run\nsys.exit(run())\n")
    p = _script(code, "--version")
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0
    assert "out of memory while loading lorafuse" in p.stderr
    other = code.replace("returned NULL without setting an exception", "some other internal error")
    p = _script(other, "--version")
    assert p.returncode != 0 and "some other internal error" in p.stderr  # a bug stays visible


def test_a_ctrl_c_landing_where_python_ignores_exceptions_is_sent_again() -> None:
    """A SIGINT whose handler runs inside importlib's module-lock callback (or a __del__) would be printed as
    "Exception ignored ... KeyboardInterrupt" with a traceback and lost: the console script's handler sends it
    again instead, to land once that code is done."""
    import signal
    import types

    import lorafuse_entry

    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    try:
        cb = types.SimpleNamespace(f_code=types.SimpleNamespace(co_name="cb",
                                                                co_filename="<frozen importlib._bootstrap>"))
        before = list(lorafuse_entry.SEEN)
        assert lorafuse_entry._on_sigint(signal.SIGINT, cb) is None  # no KeyboardInterrupt raised there
        assert lorafuse_entry.SEEN == before
        for _ in range(1000):  # the re-sent signal reaches the (recording) handler at the next check
            if got:
                break
        assert got == [signal.SIGINT]
        plain = types.SimpleNamespace(f_code=types.SimpleNamespace(co_name="main", co_filename="x.py"))
        try:
            lorafuse_entry._on_sigint(signal.SIGINT, plain)
            raise AssertionError("no KeyboardInterrupt")
        except KeyboardInterrupt:
            pass
        finally:
            lorafuse_entry.SEEN[:] = before
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_in_cli_main_before_its_own_handlers_is_one_line(tmp_path: Path) -> None:
    """A SIGINT landing in lorafuse.cli.main before its own handlers and words take over (while it checks the
    standard streams) escaped the console script as a traceback (CI hit it once): one line, status 130."""
    _, ad, _ = _model(tmp_path)
    code = ("import sys\nimport lorafuse.cli as c\n"
            "def ctrl_c():\n    raise KeyboardInterrupt\n"
            "c._standard_streams = ctrl_c\n"
            "from lorafuse_entry import run\nsys.exit(run())\n")
    p = _script(code, "info", ad)
    assert p.returncode == 130, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    assert p.stderr.strip() == "lorafuse: interrupted; no output was written"

"""Shared test setup: keep transformers quiet (warnings are filtered in pyproject.toml); keep the sha256 cache
of large inputs (lorafuse.io.provenance) in a folder of this test session, never in the user's ~/.cache."""

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import transformers

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

if "LORAFUSE_HASH_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="lorafuse-test-sha256-")
    os.environ["LORAFUSE_HASH_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)


@pytest.fixture
def at_pass(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, Callable[[], None]], None]:
    """at_pass(n, action): action() runs once, in this process, as the streamed combine's pass n starts (before
    any adapter of that pass is read): a change between passes."""
    from lorafuse.ops.combine import many

    def install(pass_no: int, action: Callable[[], None]) -> None:
        real = many._SvdSketch.start
        done: list[bool] = []

        def start(self: many._SvdSketch, n: int) -> None:
            if n == pass_no and not done:  # (start runs once per module)
                done.append(True)
                action()
            real(self, n)

        monkeypatch.setattr(many._SvdSketch, "start", start)

    return install


@pytest.fixture
def swap_in() -> Callable[[Path, Path], None]:
    """swap_in(f, other): a copy of `other` put in f's place with f's size (same-size files) and modification time,
    as `cp -p` and a rename would: only the inode and the change time tell them apart."""

    def swap(f: Path, other: Path) -> None:
        st = f.stat()
        spare = f.with_name(f.name + ".swap")
        spare.write_bytes(other.read_bytes())
        os.utime(spare, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(spare, f)
        assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns

    return swap

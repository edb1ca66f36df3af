"""engine 'ray' with a cluster address that accepts no connection: refused within seconds, naming the address,
before Ray is started (ray.init waits minutes on such an address), and nothing is written."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from redteam_fixtures import peft_folder

from lorafuse.cli import main
from lorafuse.ops.combine import ray_engine

pytest.importorskip("ray")


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("form", ["{}", "ray://{}"])
def test_an_address_nothing_answers_is_refused_before_ray_starts(tmp_path: Path, capsys, form: str):
    import ray

    shapes = {"model.layers.0.self_attn.q_proj": (16, 12)}
    a = peft_folder(tmp_path / "a", shapes, seed=1)
    b = peft_folder(tmp_path / "b", shapes, seed=2)
    address = form.format(f"127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    rc = main(["combine", str(a), str(b), "--rank", "2", "--engine", "ray", "--ray-address", address,
               "-o", str(tmp_path / "out"), "--no-progress"])
    assert rc == 1 and time.monotonic() - start < ray_engine.CONNECT_SECONDS
    err = capsys.readouterr().err
    assert f"cannot reach Ray at {address!r}" in err and "did not accept a connection" in err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_local_forms_are_left_to_ray():
    for address in (None, "auto", "local", "not an address"):
        ray_engine._check_reachable(address)  # no connection tried, no error


"""A Hugging Face cache laid out as huggingface_hub lays it out, built by tests (no network): shared by
test_hub.py and test_recipes.py."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest


def cache_repo(home: Path, repo: str, files: dict[str, bytes], commit: str, refs: tuple[str, ...] = ("main",),
               tree: dict[str, int] | None = None) -> Path:
    """Put one commit of a model repository into the cache under `home` (HF_HOME) as huggingface_hub does;
    `tree` (file -> size) also writes the commit's tree listing (trees/<commit>.json). The snapshot folder."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    if tree is not None:
        (root / "trees").mkdir(exist_ok=True)
        (root / "trees" / f"{commit}.json").write_text(json.dumps(
            {"format_version": 1, "files": {n: {"size": s, "blob_id": "0" * 40} for n, s in tree.items()}}))
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def offline_hub(monkeypatch: pytest.MonkeyPatch, home: Path, work: Path) -> None:
    """HF_HOME = `home`, offline, no other Hub variable set; the current folder `work` (made here, empty: no local
    org/... shadows an id)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work.mkdir()
    monkeypatch.chdir(work)


def bar_recording_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, src: Path) -> list[bool]:
    """`src` as org/ad in an offline cache, and snapshot_download drawing a huggingface_hub bar as a real download
    does: the list records whether bars were off during each download (bars enabled to start with, whatever a
    CI's HF_HUB_DISABLE_PROGRESS_BARS says)."""
    import importlib

    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars, tqdm

    cache_repo(tmp_path / "home", "org/ad", folder_files(src), "c" * 40)
    offline_hub(monkeypatch, tmp_path / "home", tmp_path / "work")
    real = huggingface_hub.snapshot_download
    seen: list[bool] = []

    def drawing(*args: object, **kwargs: object) -> str:
        seen.append(are_progress_bars_disabled())
        for _ in tqdm(range(3), desc="Fetching files"):
            pass
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", drawing)
    bars = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (the package's `tqdm` is its class)
    monkeypatch.setattr(bars, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    enable_progress_bars()
    return seen

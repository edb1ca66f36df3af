"""Round 11 red team, Hub ids: a repository holding several PEFT adapters in sub-folders (PEFT's save_pretrained
of adapters not named 'default', a common layout of adapter collections on the Hub).

Offline: huggingface_hub.snapshot_download is replaced by a stand-in over an in-memory repository that honours
allow_patterns and ignore_patterns as huggingface_hub does (fnmatch, `*` matching `/` too) and records each file
it fetched. References: the files written by the peft_fixtures (safetensors) and numpy float64."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from hub_fixtures import folder_files
from peft_fixtures import another_adapter, llama_case
from safetensors.numpy import load_file, save_file

from lorafuse.cli import main
from lorafuse.errors import FormatError
from lorafuse.io import hub

SNAP = "7" * 40


@pytest.fixture
def remote(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """(files, fetched): put a repository's files in `files`; `fetched` lists what the stand-in downloaded."""
    files: dict[str, bytes] = {}
    fetched: list[str] = []
    snapshot = tmp_path / "hubcache" / "models--org--repo" / "snapshots" / SNAP

    def fake(repo_id, **kw):
        allow, ignore = kw.get("allow_patterns") or [], kw.get("ignore_patterns") or []
        for name, data in files.items():
            if not any(fnmatch.fnmatch(name, p) for p in allow) or any(fnmatch.fnmatch(name, p) for p in ignore):
                continue
            if not (snapshot / name).exists():
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / name).write_bytes(data)
                fetched.append(name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return files, fetched


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("two")
    case = llama_case(root / "llama", seed=5)
    other = another_adapter(case, root / "b", rank=2, alpha=4, seed=3)
    return case, other


def _nested(files: dict[str, bytes], case, other) -> None:
    for sub, folder in (("style_a", case.adapter_dir), ("style_b", other)):
        for k, v in folder_files(folder).items():
            files[f"{sub}/{k}"] = v
    files["README.md"] = b"# two adapters\n"


def test_a_repo_of_adapters_in_sub_folders_fetches_no_weights_and_names_them(remote, two, capsys, tmp_path):
    """Before: every sub-folder's adapter weights were downloaded, then the id was refused as holding 'no
    adapter_config.json and no .safetensors file at its top level', which named neither the adapters nor how to
    read one (a local folder of that layout names them)."""
    files, fetched = remote
    case, other = two
    _nested(files, case, other)
    out = tmp_path / "out"
    code = main(["apply", str(case.base_dir), "org/repo", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert [f for f in fetched if f.endswith(".safetensors")] == []
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "style_a" in err and "style_b" in err and "org/repo" in err
    assert "hf download org/repo --include 'style_a/*'" in err


def test_the_python_call_says_the_same(remote, two):
    files, fetched = remote
    case, other = two
    _nested(files, case, other)
    with pytest.raises(FormatError, match=r"2 PEFT adapters in sub-folders \(style_a, style_b\)"):
        hub.local_adapter("org/repo@v1")
    assert not [f for f in fetched if f.endswith(".safetensors")]


def test_a_kohya_file_at_the_top_beside_sub_folder_adapters_is_the_adapter_and_only_it_is_fetched(
        remote, two, capsys, tmp_path):
    """The repository's top-level file is still the one adapter its id names (the rule for a folder holding one
    file); the sub-folders' adapters are not downloaded for it. The merged weights: numpy float64."""
    files, fetched = remote
    case, other = two
    _nested(files, case, other)
    rng = np.random.default_rng(4)
    base = load_file(str(case.base_dir / "model.safetensors"))
    name = next(k for k in sorted(base) if k.endswith("q_proj.weight"))
    out_f, in_f = base[name].shape
    down = rng.standard_normal((2, in_f)).astype(np.float32)
    up = rng.standard_normal((out_f, 2)).astype(np.float32)
    module = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
    kohya = tmp_path / "k.safetensors"
    save_file({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
               f"{module}.alpha": np.array(1.0, dtype=np.float32)}, str(kohya))
    files["style.safetensors"] = kohya.read_bytes()
    got = hub.local_adapter("org/repo")
    assert got.name == "style.safetensors"
    assert sorted(f for f in fetched if f.endswith(".safetensors")) == ["style.safetensors"]


@pytest.mark.parametrize("spec, said", [
    ("https://huggingface.co/org/lora/tree/v1", "give the Hub id as org/lora@v1"),
    ("hf://org/lora/tree/main/", "give the Hub id as org/lora@main"),
    ("huggingface.co/org/lora/tree/3f2a9c1", "give the Hub id as org/lora@3f2a9c1"),
])
def test_a_repository_page_at_a_revision_says_the_id_with_that_revision(remote, two, capsys, spec, said):
    """A repository's page at a branch, tag or commit (the address a browser shows): before, its revision was
    taken for a folder inside the repository (`hf download org/lora --include 'tree/v1/*'`)."""
    case, _ = two
    code = main(["apply", str(case.base_dir), spec, "-o", "out"])
    err = capsys.readouterr().err
    assert code == 1 and said in err and "tree/" not in err.split("no such file or directory", 1)[1]
    assert len(err.strip().splitlines()) == 1


def test_a_diffusers_lora_repo_fetches_its_adapter_file_only(remote, two, tmp_path):
    """A diffusers LoRA repository (pytorch_lora_weights.safetensors, the file read: held_adapter_file) that also
    holds other .safetensors files (a kohya copy, pivotal-tuning embeddings, older epochs in a folder): before,
    every one of them was downloaded though only pytorch_lora_weights.safetensors is read."""
    files, fetched = remote
    case, _ = two
    lora = case.adapter_dir / "adapter_model.safetensors"
    files["pytorch_lora_weights.safetensors"] = lora.read_bytes()
    files["style_kohya.safetensors"] = b"x" * 64
    files["embeddings.safetensors"] = b"y" * 64
    files["epochs/epoch-1.safetensors"] = b"z" * 64
    files["README.md"] = b"# lora\n"
    got = hub.local_adapter("org/repo")
    assert got.name == "pytorch_lora_weights.safetensors" and got.read_bytes() == lora.read_bytes()
    assert [f for f in fetched if f.endswith(".safetensors")] == ["pytorch_lora_weights.safetensors"]


def test_a_kohya_repo_without_the_diffusers_file_still_gets_its_one_file(remote, two):
    files, fetched = remote
    case, _ = two
    files["style.safetensors"] = (case.adapter_dir / "adapter_model.safetensors").read_bytes()
    got = hub.local_adapter("org/repo")
    assert got.name == "style.safetensors" and fetched == ["style.safetensors"]

"""Red team round 7, Hub ids (io.hub): what a Hub id resolves to and what it says when it cannot.

1. A repository holding a PEFT adapter beside a full model (config.json + model.safetensors: a fine-tune published
   with its adapter) given as the base model fetched only adapter_model.safetensors, and apply refused it as "a
   PEFT adapter", while the same repository fully cached (or as a local folder) merged into model.safetensors:
   the result hung on what had been downloaded. A base / checkpoint now fetches the model's weights, an adapter
   the adapter's file.
2. A snapshot found in the cache offline that lacks the weights (an interrupted download leaves the blob as
   `.incomplete` and no link; a download of the configs only), where huggingface_hub has no listing of the commit
   to tell, failed later naming a folder of the cache ("no .safetensors checkpoint found",
   "adapter_model.safetensors not found"), or said the repository holds no adapter: now one line naming the id,
   the commit, the missing files and HF_HUB_OFFLINE.
3. An id that is not found whose first part is a local folder (`loras/my-lora` typed for `loras/my_lora`) says
   so, with the closest name there.

The Hub is never reached: a cache laid out as huggingface_hub lays it out (hub_fixtures), HF_HUB_OFFLINE=1, or
huggingface_hub.snapshot_download replaced by a stand-in copying a repository's files matching the patterns.
References: PEFT's own merge (peft_fixtures.Case.merged_state) and the safetensors package.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
from hub_fixtures import cache_repo, folder_files
from peft_fixtures import llama_case
from safetensors.numpy import load_file
from safetensors.numpy import save as save_bytes

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import FormatError
from lorafuse.io import hub
from lorafuse.io.checkpoint import Checkpoint

COMMIT = "7" * 40


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    c = llama_case(tmp_path_factory.mktemp("llama"), seed=5)
    return SimpleNamespace(case=c, base=folder_files(c.base_dir), adapter=folder_files(c.adapter_dir))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HOME = an empty cache under tmp_path, offline; the current folder tmp_path/work. HF_HOME."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return home


@pytest.fixture
def remote(offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A stand-in for snapshot_download over one repository's files: it copies those matching the patterns
    (fnmatch, as huggingface_hub) into one snapshot and records each call's patterns."""
    files: dict[str, bytes] = {}
    calls: list[list[str]] = []
    snapshot = tmp_path / "models--org--both" / "snapshots" / COMMIT

    def fake(repo_id, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(kw["allow_patterns"]))
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if any(fnmatch.fnmatch(name, p) for p in kw["allow_patterns"]):
                (snapshot / name).write_bytes(data)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return files, calls, snapshot


def fetched(calls: list[list[str]], name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for call in calls for p in call)


# ----------------------------------------------------------------------------- 1: adapter beside a model


def test_a_repo_with_a_model_and_an_adapter_as_the_base_merges_into_the_model(case, remote, capsys):
    files, calls, _ = remote
    files.update(case.base)
    files.update(case.adapter)
    code = main(["apply", "org/both", str(case.case.adapter_dir), "-o", "out"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert fetched(calls, "model.safetensors") and not fetched(calls, "adapter_model.safetensors")
    got = load_file("out/model.safetensors")
    want = case.case.merged_state  # PEFT's merge_and_unload of the same adapter into the same base
    assert got.keys() == want.keys()
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6, err_msg=name)
    assert hub.spec_origin("org/both") == ("org/both", None, COMMIT)


def test_a_repo_with_a_model_and_an_adapter_as_an_adapter_fetches_the_adapter_only(case, remote):
    files, calls, _ = remote
    files.update(case.base)
    files.update(case.adapter)
    ad = lorafuse.load("org/both")
    assert ad.format == "peft" and len(ad) == len(lorafuse.load(case.case.adapter_dir))
    assert fetched(calls, "adapter_model.safetensors") and not fetched(calls, "model.safetensors")


def test_a_repo_with_a_model_and_an_adapter_as_a_checkpoint(case, remote):
    files, calls, _ = remote
    files.update(case.base)
    files.update(case.adapter)
    ck = Checkpoint("org/both")
    raw = load_file(str(case.case.base_dir / "model.safetensors"))
    assert sorted(ck.keys()) == sorted(raw) and [f.name for f in ck.files()] == ["model.safetensors"]
    assert fetched(calls, "model.safetensors") and not fetched(calls, "adapter_model.safetensors")


# ----------------------------------------------------------------------------- 2: a snapshot cached without weights


def partial(home: Path, repo: str, files: dict[str, bytes], drop: str) -> None:
    """`repo` cached as huggingface_hub leaves it when the download of `drop` was interrupted: its blob
    `<sha256>.incomplete` holds half the bytes, the snapshot has no link for it, and no tree listing is cached."""
    cache_repo(home, repo, {k: v for k, v in files.items() if k != drop}, COMMIT)
    blobs = home / "hub" / ("models--" + repo.replace("/", "--")) / "blobs"
    (blobs / ("0" * 64 + ".incomplete")).write_bytes(files[drop][: len(files[drop]) // 2])


def expect_offline_message(info: pytest.ExceptionInfo[FormatError], head: str, repo: str, missing: str) -> None:
    msg = str(info.value)
    assert msg.startswith(head), msg
    assert f"holds {repo} (commit {COMMIT}) without {missing}" in msg and "HF_HUB_OFFLINE is set" in msg, msg
    assert "\n" not in msg


def test_an_interrupted_peft_adapter_offline_names_the_id_and_the_file(case, offline):
    partial(offline, "org/lora", case.adapter, "adapter_model.safetensors")
    with pytest.raises(FormatError) as info:
        lorafuse.load("org/lora")
    expect_offline_message(info, "adapter org/lora: ", "org/lora", "adapter_model.safetensors")


def test_an_interrupted_base_offline_names_the_id_and_the_file(case, offline, capsys):
    partial(offline, "org/base", case.base, "model.safetensors")
    code = main(["apply", "org/base", str(case.case.adapter_dir), "-o", "out"])
    err = capsys.readouterr().err
    assert code == 1 and "base model org/base: the Hugging Face cache" in err and f"commit {COMMIT}" in err, err
    assert "HF_HUB_OFFLINE is set" in err and not Path("out").exists()


def test_an_interrupted_shard_offline_names_the_shard(case, offline):
    raw = load_file(str(case.case.base_dir / "model.safetensors"))
    names = sorted(raw)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    files = {k: v for k, v in case.base.items() if k != "model.safetensors"}
    files["model-00001-of-00002.safetensors"] = save_bytes({n: raw[n] for n in first})
    files["model-00002-of-00002.safetensors"] = save_bytes({n: raw[n] for n in second})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": {
        **{n: "model-00001-of-00002.safetensors" for n in first},
        **{n: "model-00002-of-00002.safetensors" for n in second}}}).encode()
    partial(offline, "org/sharded", files, "model-00002-of-00002.safetensors")
    with pytest.raises(FormatError) as info:
        hub.local_path("org/sharded", what="base model")
    expect_offline_message(info, "base model org/sharded: ", "org/sharded", "model-00002-of-00002.safetensors")


def test_a_kohya_repo_cached_without_its_file_offline_is_not_said_to_hold_no_adapter(case, offline):
    cache_repo(offline, "org/kohya", {"README.md": b"# style\n"}, COMMIT)
    with pytest.raises(FormatError) as info:
        lorafuse.load("org/kohya@main")
    expect_offline_message(info, "adapter org/kohya@main: ", "org/kohya@main", "any .safetensors file")
    assert "holds no" not in str(info.value)


def test_a_model_beside_an_adapter_cached_without_the_model_offline_is_not_called_an_adapter(case, offline, capsys):
    partial(offline, "org/both", {**case.base, **case.adapter}, "model.safetensors")
    code = main(["apply", "org/both", str(case.case.adapter_dir), "-o", "out"])
    err = capsys.readouterr().err
    assert code == 1 and "is a PEFT adapter" not in err, err
    assert f"base model org/both: the Hugging Face cache {offline / 'hub'} holds org/both (commit {COMMIT}) without " \
           "model.safetensors" in err and "HF_HUB_OFFLINE is set" in err and not Path("out").exists()


def test_a_complete_snapshot_offline_still_loads(case, offline):
    cache_repo(offline, "org/lora", case.adapter, COMMIT)
    assert len(lorafuse.load("org/lora")) == len(lorafuse.load(case.case.adapter_dir))


# ----------------------------------------------------------------------------- 3: a misspelled local path


def test_a_missing_id_whose_folder_exists_suggests_the_path(offline, monkeypatch):
    Path("loras/my_lora").mkdir(parents=True)
    real = huggingface_hub.snapshot_download

    def fake(repo_id, **kw):  # type: ignore[no-untyped-def]
        response = SimpleNamespace(headers={}, request=None, status_code=404)
        raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(FormatError, match=re.escape(f"(a local folder loras{os.sep} exists: did you mean "
                                                    f"{os.path.join('loras', 'my_lora')}?)")):
        lorafuse.load("loras/my-lora")
    # offline and not cached: the same hint
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real)
    with pytest.raises(FormatError, match=r"HF_HUB_OFFLINE.*did you mean loras/my_lora\?"):
        lorafuse.load("loras/my-lora")
    # no local folder: no hint
    with pytest.raises(FormatError) as info:
        lorafuse.load("elsewhere/my-lora")
    assert "local folder" not in str(info.value)


# ----------------------------------------------------------------------------- 4: Hub forms lorafuse reads as paths


@pytest.mark.parametrize("spec, hint", [
    ("org/kohya/style.safetensors", "if style.safetensors is in the Hub repository org/kohya: lorafuse reads a "
     "repository by its id, not a file or folder inside it; fetch it with `hf download org/kohya style.safetensors` "
     "and give the path that prints"),
    ("org/peft/checkpoint-100", "if checkpoint-100 is in the Hub repository org/peft: lorafuse reads a repository "
     "by its id, not a file or folder inside it; fetch it with `hf download org/peft --include 'checkpoint-100/*'` "
     "and give the folder that prints followed by /checkpoint-100"),
    ("https://huggingface.co/org/peft/tree/v2/checkpoint-100", "fetch it with `hf download org/peft --include "
     "'checkpoint-100/*' --revision v2`"),
    ("https://huggingface.co/org/kohya/blob/main/style.safetensors", "fetch it with `hf download org/kohya "
     "style.safetensors --revision main`"),
    ("hf://org/lora", "give the Hub id as org/lora, without hf:/"),
    ("datasets/org/lora", "Hub ids name model repositories; a dataset repository is not read"),
    ("spaces/org/demo", "Hub ids name model repositories; a space repository is not read"),
])
def test_a_hub_form_read_as_a_path_says_what_to_give(offline, capsys, spec, hint):
    code = main(["info", spec])
    err = capsys.readouterr().err
    assert code == 1 and "no such file or directory (" in err and hint in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_local_looking_path_gets_no_hub_hint(offline, capsys):
    Path("loras").mkdir()
    code = main(["info", "loras/org/x.safetensors"])
    err = capsys.readouterr().err
    assert code == 1 and err.rstrip().endswith("loras/org/x.safetensors: no such file or directory"), err


# ----------------------------------------------------------------------------- 5: offline since the import


def test_offline_since_the_import_is_not_said_to_be_a_connection_problem(offline):
    """huggingface_hub imported with HF_HUB_OFFLINE=1 stays offline (its own constant) when the environment says 0
    later: the message said "the Hub cannot be reached ... check the connection"."""
    script = ("import os, huggingface_hub.constants, lorafuse\n"
              "os.environ['HF_HUB_OFFLINE'] = '0'\n"
              "try:\n"
              "    lorafuse.load('org/missing')\n"
              "except lorafuse.FormatError as e:\n"
              "    print(e)\n")
    env = {**os.environ, "HF_HOME": str(offline), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert message.startswith("adapter org/missing: no such file or directory"), message
    assert "stays offline whatever HF_HUB_OFFLINE says now" in message and "check the connection" not in message

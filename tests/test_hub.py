"""Hugging Face Hub ids (`org/name`, `org/name@revision`) wherever lorafuse takes an input path (io.hub).

Every test resolves offline from a Hugging Face cache it builds itself, laid out as huggingface_hub lays it
out (`hub/models--org--name/blobs/<sha256>`, `snapshots/<commit>/<file>` as relative links to the blobs,
`refs/<branch or tag>` holding the commit), with HF_HOME naming it and HF_HUB_OFFLINE=1 set for each call:
no test can reach the network. huggingface_hub itself is already imported (conftest imports transformers)
with other settings, so every call here also shows that lorafuse reads the environment at call time.
References: the files themselves (the safetensors package, raw bytes) and numpy float64.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
from hub_fixtures import cache_repo, folder_files, offline_hub
from peft_fixtures import Case, another_adapter, llama_case
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import FormatError, UnsupportedError
from lorafuse.io import hub

PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
BASE_COMMIT = "b" * 39 + "1"
FT_COMMIT = "f" * 39 + "1"
LORA_V1 = "1" * 40  # org/lora's first commit (tag v1): the second adapter
LORA_MAIN = "2" * 40  # org/lora's main: the case's adapter
KOHYA_COMMIT = "c" * 40
KOHYA_MODULES = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8),
                 "lora_te_text_model_encoder_layers_0_mlp_fc1": (16, 8)}


def second_adapter(case: Case, folder: Path) -> Path:
    """Another adapter for the case's base: same modules, rank 2, lora_alpha 6 (scale 3), new random factors."""
    return another_adapter(case, folder, rank=2, alpha=6, seed=12)


def kohya_file(path: Path, seed: int) -> Path:
    """A kohya LoRA file: rank 2, alpha 1 (scale 0.5) per module."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, (out, fan_in) in KOHYA_MODULES.items():
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal((2, fan_in)).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = rng.standard_normal((out, 2)).astype(np.float32)
        tensors[f"{name}.alpha"] = np.array(1.0, dtype=np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The local inputs: a tiny Llama base with a tokenizer file, two PEFT adapters, a fine-tune (the base
    with the first adapter merged) and a kohya file."""
    root = tmp_path_factory.mktemp("local")
    case = llama_case(root / "llama", seed=11)
    (case.base_dir / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    finetuned = root / "finetuned"
    lorafuse.apply(case.base_dir, [case.adapter_dir], out=finetuned, progress=False)
    return SimpleNamespace(case=case, base=case.base_dir, lora=case.adapter_dir,
                           lora_v1=second_adapter(case, root / "adapter2"), finetuned=finetuned,
                           kohya=kohya_file(root / "style.safetensors", seed=3))


@pytest.fixture(scope="module")
def home(local: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME of a cache holding org/base, org/finetuned, org/lora (main; tag v1: the second adapter),
    org/kohya (one kohya file and a model card) and org/two-files (two kohya files)."""
    home = tmp_path_factory.mktemp("hf_home")
    cache_repo(home, "org/base", folder_files(local.base), BASE_COMMIT)
    cache_repo(home, "org/finetuned", {k: v for k, v in folder_files(local.finetuned).items()
                                       if k != "lorafuse_manifest.json"}, FT_COMMIT)
    cache_repo(home, "org/lora", folder_files(local.lora_v1), LORA_V1, refs=("v1",))
    cache_repo(home, "org/lora", folder_files(local.lora), LORA_MAIN, refs=("main",))
    cache_repo(home, "org/kohya", {"style.safetensors": local.kohya.read_bytes(), "README.md": b"# style\n"},
               KOHYA_COMMIT)
    cache_repo(home, "org/two-files", {"a.safetensors": local.kohya.read_bytes(),
                                       "b.safetensors": local.kohya.read_bytes()}, KOHYA_COMMIT)
    return home


@pytest.fixture
def env(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HOME = the test's cache, offline; the current folder an empty one (no local org/...). The cache."""
    work = tmp_path / "work"
    offline_hub(monkeypatch, home, work)
    return home / "hub"


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def factors(adapter: lorafuse.Adapter) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    return {n: (u.A.f32(), u.B.f32(), float(u.scale)) for n, u in adapter.updates.items()}


def raw_safetensors(path: Path) -> tuple[dict[str, object], bytes]:
    """A safetensors file's tensor entries (dtype, shape, offsets; not its __metadata__) and its data bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return header, data[8 + n:]


def assert_same_output(a: Path, b: Path) -> None:
    """Two outputs hold the same files with the same bytes: every tensor (header entry and data) and every
    other file. Left out: the safetensors __metadata__, the model card README.md and lorafuse's manifest
    (which lists the files' sha256), which may name the inputs (provenance): those differ by design."""
    names_a, names_b = sorted(folder_files(a)) if a.is_dir() else [""], sorted(folder_files(b)) if b.is_dir() else [""]
    assert names_a == names_b
    for name in names_a:
        fa, fb = (a / name, b / name) if name else (a, b)
        if not name or fa.name.endswith(".safetensors"):  # a one-file output: safetensors whatever its name
            assert raw_safetensors(fa) == raw_safetensors(fb), name
        elif fa.name not in ("README.md", "lorafuse_manifest.json"):
            assert fa.read_bytes() == fb.read_bytes(), name


# ----------------------------------------------------------------------------- what is a Hub id


@pytest.mark.parametrize("spec, parsed", [
    ("org/name", ("org/name", None)),
    ("org/name@main", ("org/name", "main")),
    ("Org_1/my.model-v2@v1.0", ("Org_1/my.model-v2", "v1.0")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    (f"org/name@{LORA_MAIN}", ("org/name", LORA_MAIN)),
])
def test_hub_id_forms(spec, parsed):
    assert hub.parse(spec) == parsed and hub.is_hub_id(spec)


@pytest.mark.parametrize("spec", [
    "name", "./org/name", "/org/name", "~/name", "org/name/sub", "org/name.safetensors", "org/name.SafeTensors",
    "org/na--me", "org/na..me", "org/-name", "org/name-", ".org/name", "org/name.git", "org/name@", "org/name@a..b",
    "org/name@-x", "org/name@x/", "org/name@a b", "C:/name", "org\\name", "or g/name", "o/" + "n" * 97,
])
def test_what_is_not_a_hub_id(spec):
    assert hub.parse(spec) is None and not hub.is_hub_id(spec)


def test_paths_never_ask_huggingface_hub(env, local, monkeypatch):
    """A spec not shaped like an id, or one that exists on disk, is a path: the Hub is never asked."""
    def no(*a, **kw):
        raise AssertionError("snapshot_download called")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no)
    for spec in ("./org/lora", "org/lora.safetensors", "org/lora/sub", str(local.lora)):
        r = hub.resolve(spec, what="adapter")
        # (the path itself: `./org/lora`, missing, absolute, so that no reader takes what Path leaves for the id)
        assert r.path.absolute() == Path(spec).absolute() and r.repo_id is None
        assert r.origin is None and hub.spec_origin(spec) is None
    with pytest.raises(FormatError, match=r"org/lora\.safetensors: no such file or directory"):
        lorafuse.load("org/lora.safetensors")


# ----------------------------------------------------------------------------- adapters


def test_peft_adapter_from_the_hub_equals_the_folder(env, local):
    ours = lorafuse.load("org/lora")
    snapshot = env / "models--org--lora" / "snapshots" / LORA_MAIN
    assert ours.path == snapshot and ours.format == "peft"
    direct = factors(lorafuse.load(local.lora))
    got = factors(ours)
    assert got.keys() == direct.keys() and len(got) == 14
    cfg = json.loads((local.lora / "adapter_config.json").read_text())
    raw = load_file(str(local.lora / ADAPTER_FILE))  # the reference: the file as the safetensors package reads it
    for name, (a, b, scale) in got.items():
        assert np.array_equal(a, direct[name][0]) and np.array_equal(b, direct[name][1])
        assert np.array_equal(a, raw[f"{PREFIX}{name}.lora_A.weight"])
        assert np.array_equal(b, raw[f"{PREFIX}{name}.lora_B.weight"])
        assert scale == cfg["lora_alpha"] / cfg["r"] == direct[name][2]
    origin = hub.hub_origin(ours.path)
    assert origin == ("org/lora", None, LORA_MAIN) and hub.hub_origin(ours.path / ADAPTER_FILE) == origin
    assert hub.spec_origin("org/lora") == origin
    assert hub.hub_origin(local.lora) is None and hub.hub_origin(env) is None


@pytest.mark.parametrize("revision, commit, which", [
    ("main", LORA_MAIN, "lora"), (LORA_MAIN, LORA_MAIN, "lora"), ("v1", LORA_V1, "lora_v1"),
    (LORA_V1, LORA_V1, "lora_v1"),
])
def test_revisions(env, local, revision, commit, which):
    ours = lorafuse.load(f"org/lora@{revision}")
    assert ours.path == env / "models--org--lora" / "snapshots" / commit
    assert hub.hub_origin(ours.path) == ("org/lora", revision, commit)
    raw = load_file(str(getattr(local, which) / ADAPTER_FILE))
    for name, (a, b, _) in factors(ours).items():
        assert np.array_equal(a, raw[f"{PREFIX}{name}.lora_A.weight"])
        assert np.array_equal(b, raw[f"{PREFIX}{name}.lora_B.weight"])


def test_a_kohya_repository_is_its_one_file(env, local):
    ours = lorafuse.load("org/kohya")
    assert ours.format == "kohya" and ours.path == env / "models--org--kohya" / "snapshots" / KOHYA_COMMIT / \
        "style.safetensors"
    assert hub.hub_origin(ours.path) == ("org/kohya", None, KOHYA_COMMIT)
    assert lorafuse.detect_format("org/kohya") == "kohya"
    raw = load_file(str(local.kohya))
    for name, u in ours.updates.items():
        down = raw[f"{name}.lora_down.weight"].astype(np.float64)
        up = raw[f"{name}.lora_up.weight"].astype(np.float64)
        expected = raw[f"{name}.alpha"] / 2 * up @ down  # alpha / r * up @ down, in float64
        got = float(u.scale) * u.B.f32().astype(np.float64) @ u.A.f32().astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_a_repository_of_several_files_says_which(env):
    with pytest.raises(FormatError, match=r"adapter org/two-files: the repository holds several \.safetensors "
                                          r"files \(a\.safetensors, b\.safetensors\) and no adapter_config\.json"):
        lorafuse.load("org/two-files")


def test_a_local_folder_named_like_an_id_wins(env, local):
    (Path("org")).mkdir()
    second = load_file(str(local.lora_v1 / ADAPTER_FILE))
    os.symlink(local.lora_v1, "org/lora")  # a local org/lora: the second adapter, not the Hub's main
    ours = lorafuse.load("org/lora")
    assert ours.path == Path("org/lora") and hub.hub_origin(ours.path) is None
    for name, (a, _, _) in factors(ours).items():
        assert np.array_equal(a, second[f"{PREFIX}{name}.lora_A.weight"])


# ----------------------------------------------------------------------------- errors


def test_an_uncached_id_offline_names_the_id_and_what_to_do(env, capsys):
    with pytest.raises(FormatError) as info:
        lorafuse.load("org/missing")
    assert "adapter org/missing: no such file or directory" in str(info.value)
    assert "HF_HUB_OFFLINE is set" in str(info.value) and str(env) in str(info.value)
    with pytest.raises(FormatError, match=r"org/lora@v9: .* org/lora \(revision v9\) is not in the Hugging Face "
                                          r"cache .*HF_HUB_OFFLINE"):
        lorafuse.load("org/lora@v9")
    code, out, err = run(capsys, "apply", "org/no-base", "org/lora", "-o", "out")
    assert code == 1 and out == "" and "base model org/no-base: no such file or directory" in err
    assert not Path("out").exists()


def test_without_huggingface_hub_the_install_message(env, local, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    with pytest.raises(UnsupportedError, match=r"adapter org/lora: .*needs the huggingface_hub package: "
                                               r"pip install 'lorafuse\[hub\]'"):
        lorafuse.load("org/lora")
    assert len(lorafuse.load(local.lora)) == 14  # local paths need no huggingface_hub
    with pytest.raises(FormatError, match="no such file or directory"):
        lorafuse.load("./nowhere")


def _http_error(cls: type[Exception], status: int) -> Exception:
    """An error of huggingface_hub's own class, as its HTTP layer raises it (a response with a status)."""
    response = SimpleNamespace(headers={}, request=None, status_code=status)
    return cls(f"{status} Client Error", response=response)


@pytest.mark.parametrize("error, expected", [
    (lambda: _http_error(huggingface_hub.errors.GatedRepoError, 403),
     r"adapter org/gated@v2: the Hub repository org/gated is gated: accept its conditions on "
     r"https://huggingface.co/org/gated, then log in with `hf auth login`"),
    (lambda: _http_error(huggingface_hub.errors.RepositoryNotFoundError, 404),
     r"adapter org/gated@v2: no such file or directory, and as a Hugging Face Hub id: the Hub has no model "
     r"repository org/gated \(or it is private: log in"),
    (lambda: _http_error(huggingface_hub.errors.RevisionNotFoundError, 404),
     r"adapter org/gated@v2: the Hub repository org/gated has no revision v2"),
    (lambda: _http_error(huggingface_hub.errors.HfHubHTTPError, 401),
     r"the Hub refused access to org/gated \(HTTP 401\): log in"),
    (lambda: OSError(28, "No space left on device"),
     r"cannot download org/gated \(revision v2\) into .*: No space left on device"),
])
def test_hub_errors_name_the_id_the_revision_and_what_to_do(env, monkeypatch, error, expected):
    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(FormatError, match=expected):
        lorafuse.load("org/gated@v2")
    assert calls[0][0] == "org/gated" and calls[0][1]["revision"] == "v2"


def test_other_errors_are_not_hidden(env, monkeypatch):
    def fake(repo_id, **kw):
        raise KeyError("a bug")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(KeyError, match="a bug"):
        lorafuse.load("org/lora")


# ----------------------------------------------------------------------------- huggingface_hub's settings


def test_the_environment_is_read_at_each_call(env, home, monkeypatch, tmp_path):
    """huggingface_hub read HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE when it was imported (before these
    tests set them); lorafuse hands it what the environment says at the call."""
    assert huggingface_hub.constants.HF_HUB_CACHE != str(home / "hub")  # the import-time value is stale
    real = huggingface_hub.snapshot_download
    calls: list[dict[str, object]] = []

    def spy(repo_id, **kw):
        calls.append(kw)
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    lorafuse.load("org/lora")
    assert calls[-1]["cache_dir"] == str(home / "hub") and calls[-1]["local_files_only"] is True
    assert calls[-1]["repo_type"] == "model" and calls[-1]["revision"] is None
    # two steps: the small files, then the weights they name (a PEFT adapter: its one weights file)
    first, weights = calls[-2]["allow_patterns"], calls[-1]["allow_patterns"]
    assert isinstance(first, list) and {"*.json", "README.md"} <= set(first) and "*.safetensors" not in first
    assert weights == ["adapter_model.safetensors"] and calls[-2]["cache_dir"] == str(home / "hub")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))  # HF_HUB_CACHE names the hub folder itself
    assert lorafuse.load("org/lora").path == home / "hub" / "models--org--lora" / "snapshots" / LORA_MAIN
    assert calls[-1]["cache_dir"] == str(home / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))  # another cache: not there
    with pytest.raises(FormatError, match=f"not in the Hugging Face cache {tmp_path / 'empty'}"):
        lorafuse.load("org/lora")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # huggingface_hub's other name for it
    monkeypatch.setenv("XDG_CACHE_HOME", str(home.parent))
    (home.parent / "huggingface").mkdir(exist_ok=True)
    if not (home.parent / "huggingface" / "hub").exists():
        os.symlink(home / "hub", home.parent / "huggingface" / "hub")
    assert lorafuse.load("org/lora").path.name == LORA_MAIN
    assert calls[-1]["local_files_only"] is True and calls[-1]["cache_dir"] == str(home.parent / "huggingface" / "hub")


def test_offline_snapshots_honour_the_file_patterns(env, home, local):
    """huggingface_hub (2.x) checks an offline snapshot against its cached tree listing, for the files the
    patterns ask for only: files lorafuse does not read (pickles, images) may be missing; one it reads may not."""
    files = folder_files(local.lora)
    listed = {**{n: len(b) for n, b in files.items()}, "adapter_model.bin": 10, "images/sample.png": 10}
    commit = "3" * 40
    cache_repo(home, "org/partial", files, commit, tree=listed)
    assert lorafuse.load("org/partial").path.name == commit
    # another weights file the adapter does not name is not read, so it may be missing too
    cache_repo(home, "org/extra", files, commit, tree={**listed, "extra/model.safetensors": 10})
    assert lorafuse.load("org/extra").path.name == commit
    broken = {n: b for n, b in files.items() if n != "adapter_model.safetensors"}
    cache_repo(home, "org/broken", broken, commit, tree=listed)
    with pytest.raises(FormatError, match=r"adapter org/broken: the cached snapshot of org/broken \(default branch "
                                          r"main\) in .* misses files lorafuse reads.*adapter_model\.safetensors"):
        lorafuse.load("org/broken")


# ----------------------------------------------------------------------------- every verb


def test_apply_with_a_hub_base_and_adapter_writes_the_same_bytes(env, local, capsys, tmp_path):
    code, out, err = run(capsys, "apply", "org/base", "org/lora", "-o", tmp_path / "hub", "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "apply", local.base, local.lora, "-o", tmp_path / "local", "--no-progress")
    assert code == 0, err
    assert_same_output(tmp_path / "hub", tmp_path / "local")
    assert (tmp_path / "hub" / "tokenizer.json").read_bytes() == (local.base / "tokenizer.json").read_bytes()
    merged = load_file(str(tmp_path / "hub" / "model.safetensors"))  # against PEFT's merge_and_unload
    for key, expected in local.case.merged_state.items():
        np.testing.assert_allclose(merged[key].astype(np.float32), expected, rtol=1e-5, atol=1e-6)
    api = lorafuse.apply("org/base@main", ["org/lora@v1"], out=tmp_path / "api", progress=False)
    lorafuse.apply(local.base, [local.lora_v1], out=tmp_path / "api_local", progress=False)
    assert api.out == tmp_path / "api"
    assert_same_output(tmp_path / "api", tmp_path / "api_local")


def test_combine_with_hub_ids_and_a_list_file(env, local, capsys, tmp_path):
    code, _, err = run(capsys, "combine", "org/lora", "org/lora@v1", "--weights", "0.5,-2", "--method", "cat",
                       "-o", tmp_path / "hub", "-q")
    assert code == 0, err
    code, _, err = run(capsys, "combine", local.lora, local.lora_v1, "--weights", "0.5,-2", "--method", "cat",
                       "-o", tmp_path / "local", "-q")
    assert code == 0, err
    assert_same_output(tmp_path / "hub", tmp_path / "local")
    # the reference: sum_i w_i s_i B_i A_i in float64 from the input files
    cfg = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 6 and not cfg.get("rank_pattern")
    out = load_file(str(tmp_path / "hub" / ADAPTER_FILE))
    inputs = [(0.5, local.lora), (-2.0, local.lora_v1)]
    for key in (k for k in out if k.endswith(".lora_A.weight")):
        expected = 0
        for w, folder in inputs:
            c = json.loads((folder / "adapter_config.json").read_text())
            raw = load_file(str(folder / ADAPTER_FILE))
            b, a = raw[key.replace("lora_A", "lora_B")].astype(np.float64), raw[key].astype(np.float64)
            expected = expected + w * c["lora_alpha"] / c["r"] * b @ a
        got = out[key.replace("lora_A", "lora_B")].astype(np.float64) @ out[key].astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    (tmp_path / "list.txt").write_text("# two adapters from the Hub\norg/lora 0.5\norg/lora@v1 -2\n")
    code, _, err = run(capsys, "combine", "--from-list", tmp_path / "list.txt", "--method", "cat",
                       "-o", tmp_path / "listed", "-q")
    assert code == 0, err
    assert_same_output(tmp_path / "listed", tmp_path / "local")
    (tmp_path / "bad.txt").write_text("org/lora\norg/missing 1\n")
    code, _, err = run(capsys, "combine", "--from-list", tmp_path / "bad.txt", "-o", tmp_path / "no", "-q")
    assert code == 1 and f"{tmp_path / 'bad.txt'} line 2: adapter org/missing: no such file or directory" in err
    got = lorafuse.combine(["org/lora", "org/lora@v1"], [0.5, -2], method="svd", engine="stream", rank=6)
    assert sorted(got.updates) == sorted(lorafuse.load(local.lora).updates)


def test_resize_info_similarity_convert_and_extract_with_hub_ids(env, local, capsys, tmp_path):
    for spec, path in (("org/lora", local.lora), ("org/kohya", local.kohya)):
        name = spec.split("/")[1]
        code, _, err = run(capsys, "resize", spec, "--rank", "1", "-o", tmp_path / f"{name}_hub", "-q")
        assert code == 0, err
        assert run(capsys, "resize", path, "--rank", "1", "-o", tmp_path / f"{name}_local", "-q")[0] == 0
        assert_same_output(tmp_path / f"{name}_hub", tmp_path / f"{name}_local")
    code, out, err = run(capsys, "info", "org/lora", "--json")
    assert code == 0, err
    hub_info = json.loads(out)
    local_info = json.loads(run(capsys, "info", local.lora, "--json")[1])
    assert hub_info.pop("path") == str(env / "models--org--lora" / "snapshots" / LORA_MAIN)
    local_info.pop("path")
    assert hub_info == local_info
    assert json.loads(run(capsys, "info", "org/base", "--json")[1])["tensors"] == 21
    code, out, err = run(capsys, "similarity", "org/lora", "org/lora@v1", local.lora, "--json")
    assert code == 0, err
    cos = np.array(json.loads(out)["cosine"])
    assert cos[0, 2] == pytest.approx(1.0, abs=1e-7) and cos[0, 1] == pytest.approx(cos[2, 1], abs=1e-12)
    code, _, err = run(capsys, "convert", "org/kohya", "--to", "peft", "-o", tmp_path / "conv_hub.safetensors", "-q")
    assert code == 0, err
    assert run(capsys, "convert", local.kohya, "--to", "peft", "-o", tmp_path / "conv_local.safetensors", "-q")[0] == 0
    assert_same_output(tmp_path / "conv_hub.safetensors", tmp_path / "conv_local.safetensors")
    code, _, err = run(capsys, "extract", "org/base", "org/finetuned@main", "--rank", "4", "-o", tmp_path / "ex_hub",
                       "-q")
    assert code == 0, err
    assert run(capsys, "extract", local.base, local.finetuned, "--rank", "4", "-o", tmp_path / "ex_local", "-q")[0] == 0
    a, b = raw_safetensors(tmp_path / "ex_hub" / ADAPTER_FILE), raw_safetensors(tmp_path / "ex_local" / ADAPTER_FILE)
    assert a == b
    cfg = json.loads((tmp_path / "ex_hub" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/base" and cfg["revision"] == BASE_COMMIT  # PEFT's fields
    cfg_local = json.loads((tmp_path / "ex_local" / "adapter_config.json").read_text())
    assert cfg_local["base_model_name_or_path"] == str(local.base) and "revision" not in cfg_local
    api = lorafuse.extract("org/base", "org/finetuned", tmp_path / "ex_api", rank=4, progress=False)
    assert raw_safetensors(api.out / ADAPTER_FILE) == b


def test_the_cli_in_a_subprocess(env, home):
    """`python -m lorafuse` with HF_HOME and HF_HUB_OFFLINE in its environment."""
    proc = subprocess.run([sys.executable, "-m", "lorafuse", "info", "org/kohya", "--json"], capture_output=True,
                          text=True, env={**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["format"] == "kohya" and d["path"].endswith(f"{KOHYA_COMMIT}/style.safetensors") and d["modules"] == 2


def test_offline_as_huggingface_hub_read_it_at_its_import(env, home):
    """HF_HUB_OFFLINE set when huggingface_hub was imported, gone from the environment at the call: offline still
    (huggingface_hub's own setting), not an attempt to reach the Hub. And importing lorafuse does not import
    huggingface_hub (only a Hub id does)."""
    script = (
        "import os, sys, lorafuse\n"
        "assert 'huggingface_hub' not in sys.modules\n"
        "import huggingface_hub.constants\n"
        "assert huggingface_hub.constants.HF_HUB_OFFLINE\n"
        "del os.environ['HF_HUB_OFFLINE']\n"
        "print(lorafuse.load('org/lora@v1').path)\n"
        "try:\n"
        "    lorafuse.load('org/missing')\n"
        "except lorafuse.FormatError as e:\n"
        "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    path, message = proc.stdout.splitlines()
    assert path == str(home / "hub" / "models--org--lora" / "snapshots" / LORA_V1)
    assert "adapter org/missing: no such file or directory" in message and "HF_HUB_OFFLINE is set" in message


def test_gguf_base_config_from_the_hub(env, local, capsys, tmp_path, monkeypatch):
    """convert --to gguf --base-config org/base: only config.json is asked for; the same file as with the folder.
    (The adapter is the local folder: gguf names a GGUF after its adapter's folder, which for a Hub snapshot is
    the commit sha.)"""
    real = huggingface_hub.snapshot_download
    asked: list[object] = []

    def spy(repo_id, **kw):
        asked.append((repo_id, kw["allow_patterns"]))
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    code, _, err = run(capsys, "convert", local.lora, "--to", "gguf", "--base-config", "org/base", "-o",
                       tmp_path / "hub.gguf", "-q")
    assert code == 0, err
    assert ("org/base", ["config.json"]) in asked
    code, _, err = run(capsys, "convert", local.lora, "--to", "gguf", "--base-config", local.base, "-o",
                       tmp_path / "local.gguf", "-q")
    assert code == 0, err
    assert (tmp_path / "hub.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


# ----------------------------------------------------------------------------- which weights are fetched

SNAP = "5" * 40


def _remote(monkeypatch, tmp_path: Path, files: dict[str, bytes]) -> list[str]:
    """A stand-in for huggingface_hub.snapshot_download over a repository of `files`: it copies the files the
    patterns match (fnmatch, `*` matching `/` too, as huggingface_hub's) into one snapshot folder and records
    every file it fetched."""
    fetched: list[str] = []
    snapshot = tmp_path / "models--org--repo" / "snapshots" / SNAP

    def fake(repo_id, **kw):
        for name, data in files.items():
            if any(fnmatch.fnmatch(name, p) for p in kw["allow_patterns"]) and not (snapshot / name).exists():
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / name).write_bytes(data)
                fetched.append(name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fetched


def _pipeline_index(**components: list[str | None]) -> bytes:
    return json.dumps({"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
                       **components}).encode()


def _weights(fetched: list[str]) -> set[str]:
    return {f for f in fetched if f.endswith(".safetensors")}


def test_a_pipeline_fetches_each_components_weights_not_variants_or_single_files(env, monkeypatch, tmp_path):
    """SDXL's layout: fp16 variants beside every component's weights and two single-file checkpoints at the
    top; a pipeline base reads the components' weights only (the rest is 3x the bytes)."""
    files = {
        "model_index.json": _pipeline_index(unet=["diffusers", "UNet2DConditionModel"],
                                            vae=["diffusers", "AutoencoderKL"],
                                            text_encoder=["transformers", "CLIPTextModel"],
                                            scheduler=["diffusers", "EulerDiscreteScheduler"],
                                            tokenizer=["transformers", "CLIPTokenizer"], safety_checker=[None, None]),
        "unet/config.json": b"{}", "unet/diffusion_pytorch_model.safetensors": b"u",
        "unet/diffusion_pytorch_model.fp16.safetensors": b"u16",
        "vae/config.json": b"{}", "vae/diffusion_pytorch_model.safetensors": b"v",
        "vae/diffusion_pytorch_model.fp16.safetensors": b"v16",
        "text_encoder/config.json": b"{}", "text_encoder/model.safetensors": b"t",
        "text_encoder/model.fp16.safetensors": b"t16",
        "scheduler/scheduler_config.json": b"{}", "tokenizer/vocab.json": b"{}", "tokenizer/merges.txt": b"",
        "sd_xl_base_1.0.safetensors": b"single", "sd_xl_base_1.0_0.9vae.safetensors": b"single2",
        "README.md": b"# card\n",
    }
    fetched = _remote(monkeypatch, tmp_path, files)
    folder = hub.local_path("org/repo", what="base model")
    assert folder.name == SNAP
    assert _weights(fetched) == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                                 "text_encoder/model.safetensors"}
    assert {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "README.md"} <= set(fetched)


def test_a_sharded_model_fetches_its_index_shards_not_other_copies(env, monkeypatch, tmp_path):
    """Mistral's layout: the shards an index names, and consolidated.safetensors (the same weights again)."""
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors",
                                            "c": "model-00002-of-00002.safetensors"}}
    files = {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
             "model-00001-of-00002.safetensors": b"1", "model-00002-of-00002.safetensors": b"2",
             "consolidated.safetensors": b"all", "tokenizer.json": b"{}"}
    fetched = _remote(monkeypatch, tmp_path, files)
    hub.local_path("org/repo", what="base model")
    assert _weights(fetched) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


@pytest.mark.parametrize("layout, want", [
    # one weights file by its transformers name, another copy beside it
    ({"config.json": b"{}", "model.safetensors": b"m", "consolidated.safetensors": b"c"}, {"model.safetensors"}),
    # a config.json and weights named otherwise: every top-level file, as before
    ({"config.json": b"{}", "weights.safetensors": b"w"}, {"weights.safetensors"}),
    # a kohya LoRA repository: its file
    ({"style.safetensors": b"s", "README.md": b"#"}, {"style.safetensors"}),
    # a PEFT adapter: its weights, not an extra file beside them
    ({"adapter_config.json": b"{}", "adapter_model.safetensors": b"a", "old/adapter_model.safetensors": b"o"},
     {"adapter_model.safetensors"}),
    # a shard index that is not JSON: not trusted; the weights are found as if it were not there
    ({"config.json": b"{}", "model.safetensors.index.json": b"{not json", "model-1.safetensors": b"1",
      "model-2.safetensors": b"2"}, {"model-1.safetensors", "model-2.safetensors"}),
    # (an index naming files outside the folder is refused before the weights are fetched:
    # test_redteam_round4_files.py::test_a_hub_index_naming_a_path_is_refused_not_dropped)
    # a pipeline component with fp16 variants only: those, since there is nothing else
    ({"model_index.json": _pipeline_index(unet=["diffusers", "UNet2DConditionModel"]), "unet/config.json": b"{}",
      "unet/diffusion_pytorch_model.fp16.safetensors": b"u16", "single.safetensors": b"s"},
     {"unet/diffusion_pytorch_model.fp16.safetensors"}),
    # a sharded pipeline component: its index's shards
    ({"model_index.json": _pipeline_index(transformer=["diffusers", "FluxTransformer2DModel"]),
      "transformer/config.json": b"{}",
      "transformer/diffusion_pytorch_model.safetensors.index.json": json.dumps(
          {"weight_map": {"x": "diffusion_pytorch_model-00001-of-00002.safetensors",
                          "y": "diffusion_pytorch_model-00002-of-00002.safetensors"}}).encode(),
      "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": b"1",
      "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": b"2",
      "flux1-dev.safetensors": b"single"},
     {"transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
      "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"}),
    # transformers' layout after a re-save of a model saved sharded before: model.safetensors beside the old
    # index (and shards); transformers loads model.safetensors, so only it is fetched
    ({"config.json": b"{}", "model.safetensors": b"m",
      "model.safetensors.index.json": json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors",
                                                                 "y": "model-00002-of-00002.safetensors"}}).encode(),
      "model-00001-of-00002.safetensors": b"1", "model-00002-of-00002.safetensors": b"2"},
     {"model.safetensors"}),
    # the same in a pipeline: the transformers component takes its single file, the diffusers one its index
    ({"model_index.json": _pipeline_index(text_encoder=["transformers", "T5EncoderModel"],
                                          transformer=["diffusers", "FluxTransformer2DModel"]),
      "text_encoder/config.json": b"{}", "text_encoder/model.safetensors": b"t",
      "text_encoder/model.safetensors.index.json": json.dumps({"weight_map": {"x": "model-1.safetensors"}}).encode(),
      "text_encoder/model-1.safetensors": b"t1",
      "transformer/config.json": b"{}", "transformer/diffusion_pytorch_model.safetensors": b"stale",
      "transformer/diffusion_pytorch_model.safetensors.index.json": json.dumps(
          {"weight_map": {"x": "diffusion_pytorch_model-1.safetensors"}}).encode(),
      "transformer/diffusion_pytorch_model-1.safetensors": b"d1"},
     {"text_encoder/model.safetensors", "transformer/diffusion_pytorch_model-1.safetensors"}),
    # a config.json naming its weights file (transformers_weights): that file, which transformers loads
    ({"config.json": json.dumps({"transformers_weights": "consolidated.safetensors"}).encode(),
      "model.safetensors": b"m", "consolidated.safetensors": b"c",
      "model.safetensors.index.json": json.dumps({"weight_map": {"x": "model-1.safetensors"}}).encode(),
      "model-1.safetensors": b"1"},
     {"consolidated.safetensors"}),
    # ... and nothing else where the repository lacks it (the reader refuses the folder)
    ({"config.json": json.dumps({"transformers_weights": "nope.safetensors"}).encode(),
      "model.safetensors": b"m", "consolidated.safetensors": b"c"},
     set()),
    # ... or the shards of the index it names
    ({"config.json": json.dumps({"transformers_weights": "w.safetensors.index.json"}).encode(),
      "w.safetensors.index.json": json.dumps({"weight_map": {"x": "w-1.safetensors", "y": "w-2.safetensors"}}).encode(),
      "w-1.safetensors": b"1", "w-2.safetensors": b"2", "model.safetensors": b"m"},
     {"w-1.safetensors", "w-2.safetensors"}),
])
def test_the_weights_fetched_are_the_ones_read(env, monkeypatch, tmp_path, layout, want):
    fetched = _remote(monkeypatch, tmp_path, layout)
    hub.local_path("org/repo", what="input")
    assert _weights(fetched) == want



def test_a_hub_folder_with_a_stale_index_is_read_as_transformers_reads_it(env, monkeypatch, tmp_path):
    """The files fetched are the ones the checkpoint reader takes: model.safetensors, not the index's shards, with
    the reader's note that the index beside it was left alone."""
    from safetensors.numpy import save as st_save

    index = {"weight_map": {"w": "model-00001-of-00001.safetensors"}}
    files = {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
             "model.safetensors": st_save({"w": np.ones((2, 2), np.float32)}),
             "model-00001-of-00001.safetensors": st_save({"w": np.zeros((2, 2), np.float32)})}
    fetched = _remote(monkeypatch, tmp_path, files)
    from lorafuse.io.checkpoint import Checkpoint

    ckpt = Checkpoint("org/repo")
    assert _weights(fetched) == {"model.safetensors"}
    assert ckpt.shards == ["model.safetensors"]
    assert any("model.safetensors.index.json" in n for n in ckpt.notes)

"""Round 8 red team: Hugging Face Hub inputs (io.hub) and what lorafuse writes about them (io.provenance, the model
card). No network: every Hub call resolves from a cache the test builds (tests/hub_fixtures.py), or is a fake that
records what lorafuse handed huggingface_hub.

References: huggingface_hub's own rules (get_token: HF_TOKEN, then the token file HF_TOKEN_PATH or $HF_HOME/token,
read where the environment names it; hf_raise_for_status for a real HTTP error), the Hub's rule for a model card's
`base_model` (a model id: a local path makes the Hub refuse the card, transformers#33922, transformers PR #28482),
PyYAML for the front matter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from hub_fixtures import cache_repo, folder_files
from peft_fixtures import llama_case
from safetensors import safe_open

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import FormatError

BASE_COMMIT = "b" * 40
LORA_COMMIT = "a" * 40
SECRET = "hf_" + "Q" * 34  # a Hub token's shape
OLD = "hf_" + "O" * 34  # the token of the home huggingface_hub read at its import


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("local")
    case = llama_case(root / "llama", seed=5)
    home = root / "hf"
    cache_repo(home, "org/base", folder_files(case.base_dir), BASE_COMMIT, refs=("main", "v1"))
    cache_repo(home, "org/lora", folder_files(case.adapter_dir), LORA_COMMIT, refs=("main", "v2"))
    return SimpleNamespace(case=case, home=home)


@pytest.fixture
def env(local: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HOME the test's cache, offline, in an empty folder; huggingface_hub's import-time token file an 'old' one
    holding OLD. The cache's home."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME",
                 "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE",
                 "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    old = tmp_path / "old_home"
    old.mkdir()
    (old / "token").write_text(OLD + "\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(old / "token"))
    monkeypatch.setenv("HF_HOME", str(local.home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return local.home


def spy_online(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """lorafuse online (HF_HUB_OFFLINE=0), huggingface_hub's snapshot_download a fake that records its arguments
    and answers from the cache (never the network)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    real = huggingface_hub.snapshot_download
    calls: list[dict[str, object]] = []

    def fake(repo_id: str, **kw: object) -> str:
        calls.append(kw)
        return real(repo_id, **{**kw, "local_files_only": True, "token": False})

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def token_sent(kw: dict[str, object]) -> str | None:
    """The token huggingface_hub sends for a call with these arguments (its get_token_to_send rule: a str as it
    is, False none, None: get_token(), which reads HF_TOKEN now and the token file at its import-time path)."""
    from huggingface_hub.utils._headers import get_token_to_send

    return get_token_to_send(kw.get("token"))  # type: ignore[arg-type]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


# ----------------------------------------------------------------------------- the token, where the environment says


def test_a_token_file_in_an_hf_home_named_after_the_import_is_the_one_sent(env, monkeypatch, tmp_path):
    """README: `HF_TOKEN` or `hf auth login` (the token file in HF_HOME) is read at each call, also when set after
    huggingface_hub was imported. huggingface_hub reads HF_TOKEN at each call but the token file at the path it
    computed at its import: lorafuse sent the old home's token."""
    calls = spy_online(monkeypatch)
    new_home = tmp_path / "new_home"
    (new_home / "hub").mkdir(parents=True)
    os.symlink(env / "hub" / "models--org--lora", new_home / "hub" / "models--org--lora")
    (new_home / "token").write_text(f"  {SECRET}\n")
    monkeypatch.setenv("HF_HOME", str(new_home))
    lorafuse.load("org/lora")
    assert calls and {token_sent(kw) for kw in calls} == {SECRET}


def test_hf_token_path_named_after_the_import_is_the_one_sent(env, monkeypatch, tmp_path):
    calls = spy_online(monkeypatch)
    (tmp_path / "tok").write_text(SECRET)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "tok"))
    lorafuse.load("org/lora")
    assert calls and {token_sent(kw) for kw in calls} == {SECRET}


def test_a_new_home_without_a_token_does_not_send_the_old_homes(env, monkeypatch):
    """HF_HOME now names a home nobody logged in to (env's): a new process would send no token; the old home's
    token must not go to the Hub (nor to an HF_ENDPOINT named since)."""
    calls = spy_online(monkeypatch)
    lorafuse.load("org/lora")
    assert calls and {token_sent(kw) for kw in calls} == {None}


def test_hf_token_in_the_environment_still_wins(env, monkeypatch, tmp_path):
    calls = spy_online(monkeypatch)
    (env / "token").unlink(missing_ok=True)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "elsewhere"))
    lorafuse.load("org/lora")
    assert calls and {token_sent(kw) for kw in calls} == {SECRET}


def test_the_import_time_token_file_is_left_to_huggingface_hub(env, monkeypatch):
    """Where the environment names the very file huggingface_hub read the path of, nothing changes: its own
    get_token (with its OAuth refresh) decides."""
    calls = spy_online(monkeypatch)
    monkeypatch.setenv("HF_TOKEN_PATH", huggingface_hub.constants.HF_TOKEN_PATH)
    lorafuse.load("org/lora")
    assert calls and all(kw.get("token") is None for kw in calls) and {token_sent(kw) for kw in calls} == {OLD}


# ----------------------------------------------------------------------------- secrets in messages and outputs


def _http_error(url: str, status: int, body: str) -> Exception:
    """The error huggingface_hub raises for an HTTP answer `status` to a request of `url` (its own
    hf_raise_for_status, on its own HTTP client's response)."""
    from huggingface_hub.utils import hf_raise_for_status

    http = pytest.importorskip(type(huggingface_hub.get_session()).__module__.split(".")[0])
    request = http.Request("GET", url, headers={"authorization": f"Bearer {SECRET}"})
    try:
        hf_raise_for_status(http.Response(status, request=request, text=body))
    except Exception as e:  # noqa: BLE001 - whatever it raises is what lorafuse gets
        return e
    raise AssertionError("hf_raise_for_status raised nothing")


@pytest.mark.parametrize("status", [500, 502])
def test_a_password_in_hf_endpoint_never_reaches_the_message(env, monkeypatch, capsys, status):
    """HF_ENDPOINT naming a mirror with `user:password@` (a proxy's credentials): huggingface_hub's HTTP error
    quotes the URL, and lorafuse's message quoted the error whole: the password on stderr (a CI log), on several
    lines (the promise: one line)."""
    url = f"https://mirror-user:{SECRET}@mirror.example/api/models/org/missing/revision/main"
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror-user:" + SECRET + "@mirror.example")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    error = _http_error(url, status, f"upstream said {SECRET}\n\nretry later")
    assert SECRET in str(error)  # the reference: huggingface_hub's own message holds it

    def fake(repo_id: str, **kw: object) -> str:
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(FormatError) as got:
        lorafuse.load("org/missing")
    message = str(got.value)
    assert SECRET not in message and "mirror-user" not in message and "\n" not in message
    assert "org/missing" in message and str(status) in message
    code = main(["resize", "org/missing", "--rank", "1", "-o", "out", "-q"])
    err = capsys.readouterr().err
    assert code != 0 and SECRET not in err and len(err.strip().splitlines()) == 1


def test_no_token_in_any_output_or_message(env, monkeypatch, capsys, tmp_path):
    """A run with HF_TOKEN set and a token file: the token is in no file written, nor in what is printed."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    (env / "token").write_text(SECRET)
    try:
        outs = [tmp_path / "merged", tmp_path / "small", tmp_path / "one.safetensors"]
        assert main(["apply", "org/base@v1", "org/lora@v2", "-o", str(outs[0]), "--no-progress", "--verbose"]) == 0
        assert main(["resize", "org/lora", "--rank", "2", "-o", str(outs[1]), "--no-progress", "--verbose"]) == 0
        assert main(["apply", "org/base", "org/lora", "-o", str(outs[2]), "--no-progress"]) == 0
        assert main(["info", str(outs[0]), "--json"]) == 0
    finally:
        (env / "token").unlink()
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err
    for out in outs:
        for f in [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()]:
            assert SECRET.encode() not in f.read_bytes(), f


# ----------------------------------------------------------------------------- the model card's base_model


def test_a_hub_base_is_the_cards_base_model_without_its_revision(env, tmp_path):
    """apply / extract from `org/base@v1`: base_model is the repository id (the Hub reads a model id there; the
    revision is in the provenance record, and in extract's adapter_config.json as PEFT's `revision`)."""
    lorafuse.apply("org/base@v1", ["org/lora@v2"], out=tmp_path / "m", progress=False)
    card = (tmp_path / "m" / "README.md").read_text()
    assert front_matter(card)["base_model"] == "org/base"
    shard = sorted((tmp_path / "m").glob("*.safetensors"))[0]
    with safe_open(str(shard), framework="np") as f:
        meta = f.metadata()
    base, lora = json.loads(meta["lorafuse.inputs"])
    assert base["hub"] == {"repo_id": "org/base", "revision": "v1", "commit": BASE_COMMIT}
    assert lora["hub"] == {"repo_id": "org/lora", "revision": "v2", "commit": LORA_COMMIT}


def test_a_local_base_path_is_not_the_cards_base_model(local, tmp_path, monkeypatch):
    """The Hub refuses a card whose base_model is not a model id (a local path: `hf upload` of the output fails,
    transformers#33922; transformers leaves it out, PR #28482), and the path tells where the base lay on the
    author's disk. The card's front matter leaves a local base out; its text and the metadata keep the name as given
    (the provenance), and adapter_config.json keeps PEFT's base_model_name_or_path (PEFT loads the base from it)."""
    monkeypatch.chdir(local.case.base_dir.parent)
    base = local.case.base_dir.name  # a relative path: `base`, which also has the shape of a legacy Hub id
    lorafuse.apply(base, [local.case.adapter_dir], out=tmp_path / "m", progress=False)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "base_model" not in front_matter(card) and "Base model: `base`." in card
    res = lorafuse.extract(local.case.base_dir, tmp_path / "m", rank=2, out=tmp_path / "x", progress=False)
    fm = front_matter((res.out / "README.md").read_text())
    assert "base_model" not in fm and fm["library_name"] == "peft"
    config = json.loads((res.out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(local.case.base_dir)


def test_an_adapters_hub_base_stays_the_cards_base_model(local, tmp_path):
    """An adapter whose config names a Hub base (`org/base`, what PEFT writes for a base from the Hub): a resize
    of it keeps that id in the card's front matter and in adapter_config.json."""
    folder = tmp_path / "lora"
    folder.mkdir()
    config = json.loads((local.case.adapter_dir / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta/llama-tiny"}))
    (folder / "adapter_model.safetensors").write_bytes(
        (local.case.adapter_dir / "adapter_model.safetensors").read_bytes())
    res = lorafuse.resize(folder, rank=2, out=tmp_path / "small")
    assert front_matter((res.out / "README.md").read_text())["base_model"] == "meta/llama-tiny"
    assert json.loads((res.out / "adapter_config.json").read_text())["base_model_name_or_path"] == "meta/llama-tiny"


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {})


def test_a_password_in_a_recipe_or_a_command_is_not_written_into_the_output(local, tmp_path):
    """The recipe and the command line are recorded verbatim in the output's metadata and card, which are published
    with it: a `user:password@` URL in them (a mirror in a recipe's comment, a Ray address with credentials) and a
    Hub token must not be."""
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"# weights from https://bob:{SECRET}@mirror.example/models, token {SECRET}\n"
                      f"merge_method: resize\nmodels: [{{model: {local.case.adapter_dir}}}]\nparameters: {{rank: 2}}\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "r"), "-q"]) == 0
    from lorafuse.io.provenance import invoked

    command = f"lorafuse combine a b --engine ray --ray-address ray://bob:{SECRET}@head:10001 -o OUT"
    with invoked(command, "command"):
        lorafuse.resize(local.case.adapter_dir, rank=2, out=tmp_path / "c")
    for out, key in ((tmp_path / "r", "lorafuse.recipe"), (tmp_path / "c", "lorafuse.command")):
        meta = _metadata(out / "adapter_model.safetensors")
        card = (out / "README.md").read_text()
        for text in (meta[key], card):
            assert SECRET not in text and "bob:" not in text
        assert "***@" in meta[key] and ("mirror.example/models" in meta[key] or "head:10001" in meta[key])


def test_a_local_folder_read_after_the_same_id_came_from_the_hub_is_not_recorded_as_the_hub(env, local, tmp_path):
    """extract from the Hub id `org/base`, then (same process: a notebook) from a local folder `org/base` made since
    (`hf download org/base --local-dir org/base`, then edited): the second adapter_config.json named the Hub commit
    of the first run as its `revision`, though its base was the local folder (PEFT would load another base)."""
    import shutil

    fine = tmp_path / "fine"
    lorafuse.apply(local.case.base_dir, [local.case.adapter_dir], out=fine, progress=False)
    first = lorafuse.extract("org/base", fine, rank=2, out=tmp_path / "x1", progress=False)
    config = json.loads((first.out / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/base", BASE_COMMIT)
    shutil.copytree(local.case.base_dir, Path("org") / "base")  # the current folder: the env fixture's empty one
    second = lorafuse.extract("org/base", fine, rank=2, out=tmp_path / "x2", progress=False)
    config = json.loads((second.out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base" and config.get("revision") is None
    (base_input, _) = json.loads(_metadata(second.out / "adapter_model.safetensors")["lorafuse.inputs"])
    assert "hub" not in base_input


@pytest.mark.parametrize(("argv", "said"), [
    (["apply", "org/base", "org/lora", "--revision", "v2", "-o", "m"], "org/name@REVISION"),
    (["resize", "org/lora", "--rank", "2", f"--token={SECRET}", "-o", "s"], "HF_TOKEN"),
    (["resize", "org/lora", "--rank", "2", "--token", SECRET, "-o", "s"], "HF_TOKEN"),
    (["combine", "org/lora", "--use_auth_token", SECRET, "-o", "s"], "HF_TOKEN"),
    (["apply", "org/base", "org/lora", "--cache-dir", "/tmp/c", "-o", "m"], "HF_HUB_CACHE"),
    (["resize", "org/lora", "--rank", "2", "--local-files-only", "-o", "s"], "HF_HUB_OFFLINE=1"),
])
def test_huggingface_hubs_options_say_what_lorafuse_takes_instead(env, capsys, argv, said):
    """What users of `hf download` / from_pretrained type (--revision, --token, --cache-dir, --local-files-only):
    a bare "unrecognized arguments" that echoed the token back into the terminal's log; now what to give instead,
    the token never echoed, nothing written."""
    with pytest.raises(SystemExit) as code:
        main(argv)
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert said in err and SECRET not in err and "unrecognized argument" in err
    assert not any(Path(p).exists() for p in ("m", "s"))


def test_a_short_commit_sha_offline_names_the_full_one(env, capsys):
    """`org/lora@aaaaaaa` offline: huggingface_hub resolves no short sha without the Hub, and the message said the
    repository was not in the cache, which holds that very commit."""
    with pytest.raises(FormatError) as got:
        lorafuse.load("org/lora@aaaaaaa")
    message = str(got.value)
    assert f"org/lora@{LORA_COMMIT}" in message and "short commit sha" in message
    assert "is not in the Hugging Face cache" not in message
    assert lorafuse.load(f"org/lora@{LORA_COMMIT}").path.name == LORA_COMMIT  # what it says to give works


def test_an_uncached_revision_offline_names_the_revisions_the_cache_holds(env, tmp_path, monkeypatch, local):
    """`hf download org/x --revision v1` then `lorafuse ... org/x` offline: the default branch is not cached, and the
    message said only that org/x was not in the cache, which holds it at v1."""
    home = tmp_path / "home"
    cache_repo(home, "org/x", folder_files(local.case.adapter_dir), "7" * 40, refs=("v1",))
    cache_repo(home, "org/x", folder_files(local.case.adapter_dir), "8" * 40, refs=())
    monkeypatch.setenv("HF_HOME", str(home))
    with pytest.raises(FormatError) as got:
        lorafuse.load("org/x")
    message = str(got.value)
    assert "org/x (default branch main) is not in the Hugging Face cache" in message
    assert "the cache holds org/x at v1, " + "8" * 40 in message
    assert lorafuse.load("org/x@v1").path.name == "7" * 40


def test_hf_hub_disable_implicit_token_set_after_the_import_sends_none(env, monkeypatch):
    """HF_HUB_DISABLE_IMPLICIT_TOKEN (no stored token unless asked for) counts when set after the import too."""
    calls = spy_online(monkeypatch)
    (env / "token").write_text(SECRET)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    try:
        lorafuse.load("org/lora")
    finally:
        (env / "token").unlink()
    assert calls and {token_sent(kw) for kw in calls} == {None}

"""Provenance in every output (issue #16): what each operation records of how it was made, checked against
independent readers: the real `safetensors` package for the metadata, `hashlib` on the input files for every
sha256, PyYAML for the model card's front matter, the real `peft` for loading the adapter beside its card;
reruns to other paths give identical bytes; `lorafuse info` shows the record."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import struct
import threading
from pathlib import Path

import numpy as np
import peft_fixtures as pf
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file

import lorafuse
import lorafuse.io.provenance as prov
from lorafuse.cli import main
from lorafuse.io.manifest import file_is_ours, inspect_folder
from lorafuse.io.provenance import PLACEHOLDER, Provenance, Recording, invoked, model_card
from lorafuse.ops.combine import CombineOptions, combine_to

RECIPE = ("merge_method: svd\nmodels:\n  - model: a\n    parameters: {weight: 0.6}\n  - model: b\n"
          "parameters: {rank: 4}\n")


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {})


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def peft_files(folder: Path) -> dict[str, str]:
    return {n: sha(folder / n) for n in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[pf.Case, Path]:
    """A tiny Llama saved by transformers in two shards, a README.md of its own, its PEFT adapter and a second one."""
    root = tmp_path_factory.mktemp("llama")
    case = pf.llama_case(root, max_shard_size="150KB")
    (case.base_dir / "README.md").write_text("---\nlicense: mit\n---\n# The base model's card\n", encoding="utf-8")
    other = pf.extra_adapter(case, root / "other", seed=5)
    return case, other


def kohya_file(path: Path, seed: int, meta: dict[str, str] | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, o, i in (("lora_unet_down_blocks_0_attentions_0_proj_in", 32, 16),
                       ("lora_te_text_model_encoder_layers_0_mlp_fc1", 24, 16)):
        tensors[f"{name}.lora_down.weight"] = torch.randn((4, i), generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn((o, 4), generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path), metadata=meta)
    return path


# ----------------------------------------------------------------------------- combine


def test_combine_peft_records_inputs_and_writes_a_card_peft_loads(llama, tmp_path):
    case, other = llama
    combined = lorafuse.combine([case.adapter_dir, other], [0.6, 0.4], method="svd", rank=4, seed=7)
    out = combined.save(tmp_path / "out")
    meta = metadata(out / "adapter_model.safetensors")
    assert meta["format"] == "pt"
    assert meta["lorafuse.version"] == lorafuse.__version__
    assert meta["lorafuse.operation"] == "combine" and meta["lorafuse.method"] == "svd"
    params = json.loads(meta["lorafuse.parameters"])
    assert params["rank"] == 4 and params["seed"] == 7 and "threads" not in params and "method" not in params
    inputs = json.loads(meta["lorafuse.inputs"])
    assert [i["name"] for i in inputs] == [str(case.adapter_dir), str(other)]
    assert [i["weight"] for i in inputs] == [0.6, 0.4] and {i["role"] for i in inputs} == {"adapter"}
    assert inputs[0]["files"] == peft_files(case.adapter_dir) and inputs[1]["files"] == peft_files(other)
    # no time stamp, no output path anywhere in the output
    for name, data in tree(out).items():
        assert str(tmp_path).encode() not in data, name
    # an API call with no invocation: the equivalent Python call
    call = meta["lorafuse.python"]
    assert call.startswith("import lorafuse\n") and "lorafuse.combine([" in call and "rank=4" in call
    assert "method='svd'" in call and "[0.6, 0.4]" in call

    card = (out / "README.md").read_text(encoding="utf-8")
    fm = front_matter(card)
    config = json.loads((out / "adapter_config.json").read_text())
    # a local base: PEFT's base_model_name_or_path, not the card's base_model (the Hub takes a model id only)
    assert "base_model" not in fm and config["base_model_name_or_path"] == str(case.base_dir)
    assert fm["library_name"] == "peft" and fm["tags"] == ["lorafuse", "lora", "merge", "combine"]
    assert call in card
    for digest in (*peft_files(case.adapter_dir).values(), *peft_files(other).values()):
        assert digest in card

    # PEFT loads the adapter beside the card, and reads the factors lorafuse wrote
    model = PeftModel.from_pretrained(case.model_cls.from_pretrained(str(case.base_dir)), str(out))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(),
                                  combined["model.layers.0.self_attn.q_proj"].A.f32())
    # the manifest lists the card: the folder is lorafuse's and is replaced silently
    assert inspect_folder(out).ours
    assert combined.save(out) == out


def test_combine_reruns_to_other_paths_are_identical(llama, tmp_path):
    case, other = llama
    for i in (1, 2):
        lorafuse.combine([case.adapter_dir, other], [0.6, 0.4], rank=4).save(tmp_path / f"api{i}")
    assert tree(tmp_path / "api1") == tree(tmp_path / "api2")
    # the same through combine_to (the CLI's streamed writer) inside a recipe: the recipe, verbatim
    options = CombineOptions(rank=4)
    with invoked(RECIPE, "recipe"):
        for i in (1, 2):
            combine_to([case.adapter_dir, other], [0.6, 0.4], options, tmp_path / f"recipe{i}")
    first = tree(tmp_path / "recipe1")
    assert first == tree(tmp_path / "recipe2")
    assert first["adapter_model.safetensors"] != tree(tmp_path / "api1")["adapter_model.safetensors"]
    meta = metadata(tmp_path / "recipe1" / "adapter_model.safetensors")
    assert meta["lorafuse.recipe"] == RECIPE and "lorafuse.python" not in meta and "lorafuse.command" not in meta
    card = first["README.md"].decode()
    assert "```yaml\n" + RECIPE + "```" in card
    # the tensors are those of the API's run: only the record differs
    with safe_open(str(tmp_path / "recipe1" / "adapter_model.safetensors"), "np") as f1, \
            safe_open(str(tmp_path / "api1" / "adapter_model.safetensors"), "np") as f2:
        assert list(f1.keys()) == list(f2.keys())
        for k in f1.keys():
            np.testing.assert_array_equal(f1.get_tensor(k), f2.get_tensor(k))


def test_the_inner_invocation_wins_and_threads_do_not_share_it():
    assert prov.current_invocation() is None
    with invoked("lorafuse run r.yml -o x", "command"):
        with invoked(RECIPE, "recipe"):
            assert prov.current_invocation() == prov.Invocation("recipe", RECIPE)
            seen = []
            t = threading.Thread(target=lambda: seen.append(prov.current_invocation()))
            t.start()
            t.join()
            assert seen == [None]
        assert prov.current_invocation().kind == "command"
    assert prov.current_invocation() is None
    with pytest.raises(lorafuse.LorafuseValueError):
        with invoked("x", "shell"):  # type: ignore[arg-type]
            pass


def test_combine_kohya_keeps_ss_keys_and_writes_sd_scripts_hashes(tmp_path):
    ss = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
          "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors", "ss_training_comment": "héllo",
          "lorafuse.operation": "combine", "lorafuse.inputs": "[]"}  # a stale record: replaced
    a = kohya_file(tmp_path / "a.safetensors", 0, ss)
    b = kohya_file(tmp_path / "b.safetensors", 1)
    cmd = ["combine", str(a), str(b), "-o", str(tmp_path / "out.safetensors"), "--rank", "2", "-q"]
    assert main(cmd) == 0
    out = tmp_path / "out.safetensors"
    meta = metadata(out)
    for key in ("ss_network_module", "ss_sd_model_name", "ss_training_comment"):
        assert meta[key] == ss[key]
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"  # rank 2, scale 1
    data = out.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    # the command line verbatim, but for the output's path: a rerun elsewhere writes the same bytes
    assert meta["lorafuse.command"] == shlex.join(["lorafuse", *cmd[:4], "OUT", *cmd[5:]])
    assert meta["lorafuse.command"] == prov.command_text(cmd, str(tmp_path / "out.safetensors"))
    assert main([*cmd[:4], str(tmp_path / "elsewhere.safetensors"), *cmd[5:], "--threads", "1"]) == 0
    assert (tmp_path / "elsewhere.safetensors").read_bytes() != out.read_bytes()  # --threads 1 is recorded
    assert main([*cmd[:4], str(tmp_path / "again.safetensors"), *cmd[5:]]) == 0
    assert (tmp_path / "again.safetensors").read_bytes() == out.read_bytes()
    inputs = json.loads(meta["lorafuse.inputs"])
    assert [(i["name"], i["sha256"], i["weight"]) for i in inputs] == [(str(a), sha(a), 1.0), (str(b), sha(b), 1.0)]
    assert file_is_ours(out) and not (tmp_path / "README.md").exists()  # one file: metadata only
    # the combined file used as an input: its record is its own, the new one names it
    assert main(["resize", str(out), "-o", str(tmp_path / "r.safetensors"), "--rank", "1", "-q"]) == 0
    again = metadata(tmp_path / "r.safetensors")
    assert again["lorafuse.operation"] == "resize"
    assert json.loads(again["lorafuse.inputs"]) == [{"name": str(out), "role": "adapter", "sha256": sha(out)}]
    assert again["ss_training_comment"] == "héllo"


# ----------------------------------------------------------------------------- resize, convert, extract


def test_resize_records_the_rule_and_the_input(llama, tmp_path):
    case, _ = llama
    res = lorafuse.resize(case.adapter_dir, rank=2, out=tmp_path / "small")
    meta = metadata(res.out / "adapter_model.safetensors")
    assert meta["lorafuse.operation"] == "resize" and "lorafuse.method" not in meta
    assert json.loads(meta["lorafuse.parameters"]) == {"rank": 2, "split": "B", "device": "cpu"}
    assert json.loads(meta["lorafuse.inputs"]) == [{"name": str(case.adapter_dir), "role": "adapter",
                                                    "files": peft_files(case.adapter_dir)}]
    fm = front_matter((res.out / "README.md").read_text())
    assert fm["tags"] == ["lorafuse", "lora", "merge", "resize"] and fm["library_name"] == "peft"
    assert lorafuse.load(res.out).provenance == res.adapter.provenance  # read back whole


def test_convert_records_the_input_and_keeps_kohya_metadata(tmp_path):
    src = kohya_file(tmp_path / "k.safetensors", 3, {"ss_sd_model_name": "sd15", "ss_network_dim": "4"})
    rep = lorafuse.convert(src, tmp_path / "d.safetensors", to="peft", family="sd1")
    meta = metadata(rep.out)
    assert meta["lorafuse.operation"] == "convert" and meta["ss_sd_model_name"] == "sd15"
    assert json.loads(meta["lorafuse.parameters"]) == {"to": "peft", "family": "sd1"}
    assert json.loads(meta["lorafuse.inputs"]) == [{"name": str(src), "role": "adapter", "sha256": sha(src)}]
    back = lorafuse.convert(rep.out, tmp_path / "k2.safetensors", to="kohya")
    meta2 = metadata(back.out)
    assert json.loads(meta2["lorafuse.inputs"])[0]["sha256"] == sha(rep.out)
    assert meta2["ss_sd_model_name"] == "sd15" and meta2["ss_network_dim"] == "4"
    # the tensors come back byte for byte: only the record is new
    with safe_open(str(src), "np") as f1, safe_open(str(back.out), "np") as f2:
        assert sorted(f1.keys()) == sorted(f2.keys())
        for k in f1.keys():
            np.testing.assert_array_equal(f1.get_tensor(k), f2.get_tensor(k))


def test_extract_records_both_checkpoints(llama, tmp_path):
    case, _ = llama
    tuned = tmp_path / "tuned"
    lorafuse.apply(case.base_dir, [case.adapter_dir], out=tuned)
    res = lorafuse.extract(case.base_dir, tuned, tmp_path / "x", rank=4, seed=3)
    meta = metadata(res.out / "adapter_model.safetensors")
    assert meta["lorafuse.operation"] == "extract"
    params = json.loads(meta["lorafuse.parameters"])
    assert params["rank"] == 4 and params["seed"] == 3 and params["embeddings"] == "skip"
    base, ft = json.loads(meta["lorafuse.inputs"])
    assert (base["role"], ft["role"]) == ("base", "fine-tuned")
    shards = sorted(p.name for p in case.base_dir.glob("*.safetensors"))
    assert len(shards) > 1
    assert base["files"] == {n: sha(case.base_dir / n) for n in
                             [*shards, "model.safetensors.index.json", "config.json"]}
    assert ft["files"] == {n: sha(tuned / n) for n in [*shards, "model.safetensors.index.json", "config.json"]}
    assert meta["lorafuse.base_model"] == str(case.base_dir)
    assert "base_model" not in front_matter((res.out / "README.md").read_text())  # a local base: no model id
    PeftModel.from_pretrained(case.model_cls.from_pretrained(str(case.base_dir)), str(res.out))


# ----------------------------------------------------------------------------- apply


def test_apply_folder_records_every_shard_and_keeps_the_base_card(llama, tmp_path):
    case, other = llama
    outs = [tmp_path / "m1", tmp_path / "m2"]
    for out in outs:
        lorafuse.apply(case.base_dir, [case.adapter_dir, other], [1.0, -0.5], out, dtype="bf16")
    assert tree(outs[0]) == tree(outs[1])  # reruns: identical bytes, whatever the output's path
    out = outs[0]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1
    # the base's weights, index and config, and the side files copied into the output (README.md as BASE_README.md)
    base_files = {n: sha(case.base_dir / n) for n in [*shards, "model.safetensors.index.json", "config.json",
                                                      "generation_config.json", "README.md"]}
    records = [metadata(out / s) for s in shards]
    for meta in records:  # every shard holds the same record, the final hashes in place of the placeholders
        assert {k: v for k, v in meta.items() if k.startswith("lorafuse.")} == \
            {k: v for k, v in records[0].items() if k.startswith("lorafuse.")}
        assert PLACEHOLDER not in meta["lorafuse.inputs"]
    inputs = json.loads(records[0]["lorafuse.inputs"])
    assert inputs == [{"name": str(case.base_dir), "role": "base", "files": base_files},
                      {"name": str(case.adapter_dir), "role": "adapter", "weight": 1.0,
                       "files": peft_files(case.adapter_dir)},
                      {"name": str(other), "role": "adapter", "weight": -0.5, "files": peft_files(other)}]
    assert json.loads(records[0]["lorafuse.parameters"]) == {"dtype": "bf16", "allow_nonfinite": False,
                                                             "skip_missing": False, "device": "cpu"}
    card = (out / "README.md").read_text()
    fm = front_matter(card)
    assert fm == {"library_name": "transformers", "tags": ["lorafuse", "lora", "merge", "apply"]}  # a local base
    assert (out / "BASE_README.md").read_bytes() == (case.base_dir / "README.md").read_bytes()
    assert "[BASE_README.md](BASE_README.md)" in card
    assert inspect_folder(out).ours  # the manifest lists the card and the kept base card
    # transformers loads the merged model beside the card
    case.model_cls.from_pretrained(str(out))
    # applied again onto the merged model: the base card is kept, and the first card beside it
    lorafuse.apply(out, [other], out=tmp_path / "m3")
    assert (tmp_path / "m3" / "BASE_README.md").read_bytes() == (case.base_dir / "README.md").read_bytes()
    assert (tmp_path / "m3" / "BASE_README.2.md").read_bytes() == card.encode()


def test_apply_single_file_has_the_record_in_its_metadata_only(llama, tmp_path):
    case, _ = llama
    single = tmp_path / "base.safetensors"
    merged = {}
    for shard in sorted(case.base_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            merged.update({k: f.get_tensor(k) for k in f.keys()})
    save_file(merged, str(single))
    out = tmp_path / "outdir" / "merged.safetensors"
    out.parent.mkdir()
    lorafuse.apply(single, [case.adapter_dir], out=out)
    meta = metadata(out)
    assert json.loads(meta["lorafuse.inputs"])[0] == {"name": str(single), "role": "base", "sha256": sha(single)}
    assert meta["lorafuse_version"] == lorafuse.__version__ and file_is_ours(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.safetensors"]


# ----------------------------------------------------------------------------- info, the CLI


def test_info_shows_the_record(llama, tmp_path, capsys):
    case, other = llama
    out = tmp_path / "c"
    cmd = ["combine", str(case.adapter_dir), str(other), "-o", str(out), "--weights", "0.6,0.4", "-q"]
    assert main(cmd) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["provenance"] == Provenance.from_metadata(metadata(out / "adapter_model.safetensors")).as_dict()
    assert d["provenance"]["command"] == prov.command_text(cmd, str(out))
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "made by     lorafuse" in text and "combine (method svd)" in text
    assert sha(other / "adapter_model.safetensors") in text and prov.command_text(cmd, str(out)) in text
    merged = tmp_path / "m"
    lorafuse.apply(case.base_dir, [case.adapter_dir], out=merged)
    assert main(["info", str(merged), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["type"] == "checkpoint" and d["provenance"]["operation"] == "apply"
    assert d["provenance"]["inputs"][0]["files"]["config.json"] == sha(case.base_dir / "config.json")
    assert main(["info", str(case.base_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"] is None


# ----------------------------------------------------------------------------- the record itself


def test_metadata_round_trip_and_malformed_records():
    p = Provenance("combine", (prov.InputRecord("a", "adapter", 0.5, "0" * 64),
                               prov.InputRecord("b", "adapter", files=(("x.json", "1" * 64),))),
                   prov.Invocation("command", "lorafuse combine a b -o o"), {"rank": 4}, "svd")
    meta = p.metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert Provenance.from_metadata(meta) == p
    assert Provenance.from_metadata({"ss_x": "1"}) is None
    for broken in ({**meta, "lorafuse.inputs": "{"}, {**meta, "lorafuse.inputs": "[1]"},
                   {k: v for k, v in meta.items() if k != "lorafuse.version"},
                   {k: v for k, v in meta.items() if k != "lorafuse.command"}):
        assert Provenance.from_metadata(broken) is None
    assert prov.stamp({"format": "pt", "lorafuse.method": "old"}, None) == {"format": "pt"}


@pytest.mark.parametrize("base", ["org/model", 'a "quoted": path', "ünïcode \t tab", "line\nbreak", "\x07bell\x7f"])
def test_card_front_matter_parses_whatever_the_names(base):
    p = Provenance("apply", (prov.InputRecord("x|y`z", "base", sha256="2" * 64),),
                   prov.Invocation("command", "lorafuse apply 'x|y`z' a -o o  # ```"), {}, None)
    card = model_card(p, base_model=base, library_name="transformers")
    hub = {"base_model": base} if base == "org/model" else {}  # a name that is no Hub id is no base_model
    assert front_matter(card) == {**hub, "library_name": "transformers", "tags": ["lorafuse", "lora", "merge", "apply"]}
    assert "````sh\nlorafuse apply 'x|y`z' a -o o  # ```\n````" in card
    assert "| 1 | ``x\\|y`z`` | base |  | `" + "2" * 64 + "` |" in card


def test_hub_blobs_are_not_read_and_large_files_are_cached(tmp_path, monkeypatch):
    data = os.urandom(4096)
    digest = hashlib.sha256(data).hexdigest()
    blobs = tmp_path / "models--org--m" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / digest).write_bytes(data)
    snap = tmp_path / "models--org--m" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blobs / digest)
    (snap / "config.json").write_bytes(b"{}")
    calls: list[Path] = []
    real = prov.sha256_file
    monkeypatch.setattr(prov, "sha256_file", lambda p, stop=None: calls.append(Path(p)) or real(p, stop))
    made = prov.record("extract", [prov.folder_input("org/m", snap, "base",
                                                     [snap / "model.safetensors", snap / "config.json"])], {})
    assert dict(made.inputs[0].files) == {"model.safetensors": digest, "config.json": sha(snap / "config.json")}
    assert calls == [snap / "config.json"]  # the blob's name is its sha256: not read

    cache = tmp_path / "cache"
    monkeypatch.setenv(prov.CACHE_ENV, str(cache))
    monkeypatch.setattr(prov, "CACHE_MIN_BYTES", 1000)
    big0 = tmp_path / "fresh.bin"
    big0.write_bytes(data)
    assert prov.cached_sha256(big0) == digest and not cache.exists()  # just written: not cached
    monkeypatch.setattr(prov, "CACHE_SETTLED_NS", -1)
    big = tmp_path / "big.bin"
    big.write_bytes(data)
    calls.clear()
    assert prov.cached_sha256(big) == digest and calls == [big]
    assert [p.read_text().strip() for p in cache.iterdir()] == [digest]
    assert prov.cached_sha256(big) == digest and calls == [big]  # from the cache
    big.write_bytes(data[::-1])  # a new version: hashed again
    assert prov.cached_sha256(big) == hashlib.sha256(data[::-1]).hexdigest() and calls == [big, big]
    monkeypatch.setenv(prov.CACHE_ENV, "0")
    assert prov.hash_cache_dir() is None


def test_a_recording_stopped_early_and_one_that_cannot_read(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 10)
    with Recording("resize", [prov.adapter_input(f)], {}) as rec:
        draft = rec.draft()
        final = rec.result()
    assert len(json.dumps(draft.as_dict())) == len(json.dumps(final.as_dict()))
    assert final.inputs[0].sha256 == sha(f)
    missing = prov.InputSpec("gone", "adapter", path=tmp_path / "gone.bin")
    with pytest.raises(lorafuse.FormatError, match="gone.bin"):
        prov.record("resize", [missing], {})
    with pytest.raises(lorafuse.LorafuseValueError):
        Recording("fold", [], {})


def test_a_hub_input_is_named_as_given_with_its_repository_and_commit(llama, tmp_path, monkeypatch):
    """A PEFT adapter in a Hugging Face cache laid out as huggingface_hub does (blobs named by their sha256,
    snapshots of links, refs/main), resolved offline."""
    pytest.importorskip("huggingface_hub")
    case, _ = llama
    commit = "c" * 40
    root = tmp_path / "hf" / "hub" / "models--org--lora"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (case.adapter_dir / name).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    res = lorafuse.resize("org/lora", rank=2, out=tmp_path / "small")
    (record,) = json.loads(metadata(res.out / "adapter_model.safetensors")["lorafuse.inputs"])
    assert record == {"name": "org/lora", "role": "adapter", "files": peft_files(case.adapter_dir),
                      "hub": {"repo_id": "org/lora", "revision": None, "commit": commit}}
    assert f"(Hub `org/lora` at `{commit}`)" in (res.out / "README.md").read_text()


# ----------------------------------------------------------------------------- hashes while the modules are computed


@pytest.mark.parametrize("engine", ["memory", "stream"])
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_combine_to_hashes_while_it_computes_and_writes_the_hashes_at_the_commit(llama, tmp_path, monkeypatch,
                                                                                   engine, fmt):
    """combine_to's header and card are written before any module with placeholders for the inputs' sha256;
    the hashing runs meanwhile and the commit writes the real values (header in place, card again). Each
    hash here waits until the first module is written: a combine that waited for the hashes before
    computing would never write one (the hash then gives up and the combine fails)."""
    case, other = llama
    started = threading.Event()
    real_put = lorafuse.formats.streaming.StreamWriter.put

    def put(self, name, update):
        started.set()
        return real_put(self, name, update)

    real_hash = prov.cached_sha256

    def slow_hash(p, stop=None):
        if not started.wait(timeout=20):
            raise TimeoutError("no module was written while the inputs were hashed")
        return real_hash(p, stop)

    monkeypatch.setattr(lorafuse.formats.streaming.StreamWriter, "put", put)
    monkeypatch.setattr(prov, "cached_sha256", slow_hash)
    monkeypatch.setenv(prov.CACHE_ENV, str(tmp_path / "no-cache"))
    if fmt == "peft":
        adapters, out = [case.adapter_dir, other], tmp_path / "out"
    else:
        (tmp_path / "in").mkdir()
        adapters = [kohya_file(tmp_path / "in" / f"k{i}.safetensors", i) for i in (1, 2)]
        out = tmp_path / "out.safetensors"
    combine_to(adapters, [0.6, 0.4], CombineOptions(method="svd", rank=4, engine=engine), out, fmt)
    weights = out / "adapter_model.safetensors" if fmt == "peft" else out
    meta = metadata(weights)
    inputs = json.loads(meta["lorafuse.inputs"])
    if fmt == "peft":
        assert [i["files"] for i in inputs] == [peft_files(case.adapter_dir), peft_files(other)]
    else:
        assert [i["sha256"] for i in inputs] == [sha(a) for a in adapters]
    assert PLACEHOLDER not in json.dumps(meta)
    if fmt == "peft":
        card = (out / "README.md").read_text(encoding="utf-8")
        assert PLACEHOLDER not in card
        for digest in (*peft_files(case.adapter_dir).values(), *peft_files(other).values()):
            assert digest in card
    else:  # sd-scripts' hashes cover the data: computed at the commit, after the header's rewrite
        assert meta["sshs_model_hash"] != "0" * len(meta["sshs_model_hash"])


@pytest.mark.parametrize("engine", ["memory", "stream"])
def test_combine_to_leaves_nothing_when_an_input_cannot_be_hashed(llama, tmp_path, monkeypatch, engine):
    case, other = llama

    def unreadable(p, stop=None):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(prov, "cached_sha256", unreadable)
    monkeypatch.setenv(prov.CACHE_ENV, str(tmp_path / "no-cache"))
    out = tmp_path / "out"
    with pytest.raises(PermissionError):
        combine_to([case.adapter_dir, other], None, CombineOptions(method="svd", rank=4, engine=engine), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []

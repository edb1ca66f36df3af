"""Third red-team round: each test is a finding that was wrong before, checked against an independent
reference (numpy float64, the real packages, the file system)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorafuse.cli import main

H, R = 16, 2
PREFIX = "base_model.model."


def _peft(folder: Path, shapes: dict[str, tuple[int, int]], seed: int, rank: int = R, alpha: float = R) -> Path:
    """A PEFT adapter folder: module -> (out, in), float32 factors from `seed`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    data = {}
    for module, (o, i) in shapes.items():
        data[f"{PREFIX}{module}.lora_A.weight"] = rng.standard_normal((rank, i)).astype(np.float32)
        data[f"{PREFIX}{module}.lora_B.weight"] = rng.standard_normal((o, rank)).astype(np.float32)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(data, str(folder / "adapter_model.safetensors"))
    return folder


LLM = {"model.layers.0.self_attn.q_proj": (H, H), "model.layers.0.mlp.up_proj": (2 * H, H)}


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv", [["-o", "{a}", "-o", "{b}"], ["--out={a}", "-o", "{b}"],
                                  ["-o", "{a}", "--rank", "1", "--rank", "2"]])
def test_a_single_valued_option_given_twice_is_refused(tmp_path: Path, argv: list[str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`-o a -o b` wrote b alone (argparse keeps the last); the user may have meant a. Refused, exit 2,
    nothing written."""
    ad = _peft(tmp_path / "ad", LLM, 1)
    a, b = tmp_path / "a", tmp_path / "b"
    words = [w.format(a=a, b=b) for w in argv]
    if "--rank" not in words:
        words += ["--rank", "1"]
    with pytest.raises(SystemExit) as e:
        main(["resize", str(ad), *words])
    assert e.value.code == 2
    assert "given twice" in capsys.readouterr().err
    assert not a.exists() and not b.exists()


def test_the_same_value_twice_is_taken(tmp_path: Path) -> None:
    """A repeated option with the same value is harmless (a shell alias plus the same flag typed again)."""
    ad = _peft(tmp_path / "ad", LLM, 1)
    out = tmp_path / "r1"
    assert main(["resize", str(ad), "-o", str(out), "-o", str(out), "--rank", "1", "-q"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- recipes


def test_a_recipe_key_yaml_reads_as_a_number_is_reported_at_its_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`7: 3` in a model's parameters was reported at the parameters' line (the validator's path holds the
    number 7, the line table the key's text '7')."""
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n"
                      "  - model: b\n    parameters:\n      weight: 0.5\n      7: 3\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "r.yml line 9, models[1].parameters" in err, err


def test_a_full_disk_in_an_intermediate_stage_says_what_the_temporary_folder_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An intermediate stage's write error named `.lorafuse-run-PID-XXXX/pooled`, a folder the user never
    asked for; the message now says it is the run's temporary folder beside -o."""
    import errno
    import os

    import lorafuse.io.safetensors as st_mod

    ad = _peft(tmp_path / "ad", LLM, 1)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"name: pooled\nmerge_method: linear\nmodels:\n  - model: {ad}\n---\nname: small\n"
                      "merge_method: resize\nmodels:\n  - model: pooled\nparameters:\n  rank: 1\n")

    def full(self: object, view: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(st_mod.SafetensorsWriter, "_write_all", full)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "stage 'pooled'" in err and "temporary folder beside" in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lorafuse-run-")]


# ----------------------------------------------------------------------------- the Python API, as a careless caller


def _base(folder: Path, shapes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(99)
    save_file({f"{m}.weight": rng.standard_normal(s).astype(np.float32) for m, s in shapes.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def _users_folder(p: Path) -> Path:
    p.mkdir()
    (p / "thesis.txt").write_text("years of work")
    return p


@pytest.mark.parametrize("value", ["no", 1, "False"])
def test_overwrite_that_is_not_a_bool_is_refused_by_every_writer(tmp_path: Path, value: object) -> None:
    """overwrite='no' counted as True in extract, convert, run and combine_to: a user's folder was replaced."""
    import lorafuse
    from lorafuse.errors import LorafuseValueError
    from lorafuse.ops.combine import CombineOptions, combine_to

    ad = _peft(tmp_path / "ad", LLM, 1)
    base = _base(tmp_path / "base", LLM)
    ft = _base(tmp_path / "ft", LLM)
    calls = {
        "extract": lambda o: lorafuse.extract(str(base), str(ft), o, rank=1, overwrite=value),
        "run": lambda o: lorafuse.run({"merge_method": "linear", "models": [{"model": str(ad)}]}, o,
                                      overwrite=value),
        "combine_to": lambda o: combine_to([ad], None, CombineOptions(method="linear"), o, overwrite=value),
        "save": lambda o: lorafuse.load(ad).save(o, overwrite=value),
        "apply": lambda o: lorafuse.apply(str(base), [ad], out=o, overwrite=value),
    }
    for name, call in calls.items():
        users = _users_folder(tmp_path / f"users_{name}")
        with pytest.raises(LorafuseValueError, match="overwrite must be True or False"):
            call(str(users))
        assert (users / "thesis.txt").read_text() == "years of work", name
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"my precious bytes")
    with pytest.raises(LorafuseValueError, match="overwrite must be True or False"):
        lorafuse.convert(str(ad), str(mine), to="kohya", overwrite=value)
    assert mine.read_bytes() == b"my precious bytes"


def test_a_mapping_of_adapters_to_weights_is_refused(tmp_path: Path) -> None:
    """{path: weight} was iterated by its keys: the weights were silently dropped (apply merged at 1.0)."""
    import lorafuse
    from lorafuse.errors import LorafuseValueError

    ad = _peft(tmp_path / "ad", LLM, 1)
    base = _base(tmp_path / "base", LLM)
    for call in (lambda: lorafuse.apply(str(base), {str(ad): 0.25}, out=str(tmp_path / "m")),
                 lambda: lorafuse.combine({str(ad): 0.25}),
                 lambda: lorafuse.similarity({str(ad): 1})):
        with pytest.raises(LorafuseValueError, match="not a dict"):
            call()
    assert not (tmp_path / "m").exists()


def test_a_scaled_adapter_states_its_own_rank_and_alpha(tmp_path: Path) -> None:
    """0.25 * a kept a's config (r 2, alpha 2): from_state_dict(x.state_dict(), x.config) gave a delta 4x too
    large, and -a lost its sign. Checked against the float64 delta of the factors."""
    import lorafuse
    from lorafuse import Adapter

    a = lorafuse.load(_peft(tmp_path / "ad", LLM, 1, rank=2, alpha=4))
    name = next(iter(LLM))
    f = a.state_dict()
    want = (f[f"{PREFIX}{name}.lora_B.weight"].astype(np.float64) @ f[f"{PREFIX}{name}.lora_A.weight"]) * 2.0
    for c in (0.25, -1.0, 3.0):
        x = c * a
        y = Adapter.from_state_dict(x.state_dict(), x.config)
        np.testing.assert_allclose(y.updates[name].delta(), c * want, rtol=1e-5, atol=1e-6)
    r1 = lorafuse.resize(a, rank=1).adapter
    assert r1.config["r"] == 1 and {u.rank for u in r1.updates.values()} == {1}


def test_a_file_truncated_after_load_is_not_read_as_zeros(tmp_path: Path) -> None:
    """state_dict() / delta() of an adapter whose file was truncated after load returned zeros (the mapping's
    missing pages); they raise InputChangedError, as the writers do."""
    import os

    import lorafuse
    from lorafuse.errors import InputChangedError

    ad = _peft(tmp_path / "ad", LLM, 1)
    a = lorafuse.load(ad)
    name = next(iter(LLM))
    f = ad / "adapter_model.safetensors"
    os.truncate(f, 200)
    with pytest.raises(InputChangedError):
        a.state_dict()
    with pytest.raises(InputChangedError):
        a.updates[name].delta()


@pytest.mark.parametrize("kw", [{"threads": -1}, {"threads": 1.5}, {"threads": True}, {"device": "tpu"},
                                {"device": 0}, {"dry_run": "no"}, {"quiet": 0}])
def test_run_refuses_bad_arguments_with_a_lorafuse_error(tmp_path: Path, kw: dict[str, object]) -> None:
    """lorafuse.run(threads=-1) or device='tpu' raised SystemExit(2) (argparse's usage on stderr): a caller
    catching Exception was killed."""
    import lorafuse
    from lorafuse.errors import LorafuseValueError

    ad = _peft(tmp_path / "ad", LLM, 1)
    with pytest.raises(LorafuseValueError):
        lorafuse.run({"merge_method": "linear", "models": [{"model": str(ad)}]}, str(tmp_path / "o"), **kw)
    assert not (tmp_path / "o").exists()


def test_wrong_typed_arguments_raise_lorafuse_errors(tmp_path: Path) -> None:
    """Each raised a raw AttributeError / TypeError from deep inside (pathlib, re, dict)."""
    import lorafuse
    from lorafuse import Adapter
    from lorafuse.errors import LorafuseValueError
    from lorafuse.ops.combine import CombineOptions, combine_to

    ad = _peft(tmp_path / "ad", LLM, 1)
    base = _base(tmp_path / "base", LLM)
    ft = _base(tmp_path / "ft", LLM)
    a = lorafuse.load(ad)
    sd = a.state_dict()
    calls = [
        lambda: Adapter.from_state_dict(None),  # type: ignore[arg-type]
        lambda: Adapter.from_state_dict(list(sd.items())),  # type: ignore[arg-type]
        lambda: Adapter.from_state_dict({1: next(iter(sd.values()))}),  # type: ignore[dict-item]
        lambda: Adapter.from_state_dict(sd, "cfg"),
        lambda: combine_to([ad], None, None, str(tmp_path / "c")),  # type: ignore[arg-type]
        lambda: lorafuse.apply(str(base), [ad], out=123),  # type: ignore[arg-type]
        lambda: lorafuse.extract(None, str(ft), rank=1),  # type: ignore[arg-type]
        lambda: lorafuse.extract(str(base), str(ft), rank=1, include=["q_proj"]),  # type: ignore[arg-type]
        lambda: lorafuse.convert(str(ad), None, to="kohya"),  # type: ignore[arg-type]
        lambda: a.save(None),  # type: ignore[arg-type]
        lambda: combine_to([ad], None, CombineOptions(), None),  # type: ignore[arg-type]
    ]
    for i, call in enumerate(calls):
        with pytest.raises(LorafuseValueError):
            call()
    assert lorafuse.load(str(ad).encode()).updates.keys() == a.updates.keys()  # a bytes path is a path


def test_resize_progress_that_is_not_a_switch_is_refused(tmp_path: Path) -> None:
    import lorafuse
    from lorafuse.errors import LorafuseValueError

    with pytest.raises(LorafuseValueError, match="progress must be True, False or None"):
        lorafuse.resize(str(_peft(tmp_path / "ad", LLM, 1)), rank=1, progress="no")  # type: ignore[arg-type]


def test_similarity_of_adapters_sharing_no_module_warns(tmp_path: Path) -> None:
    """A 0 that measures nothing was returned silently in Python (the CLI said so in a note)."""
    import lorafuse

    a = _peft(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (H, H)}, 1)
    b = _peft(tmp_path / "b", {"model.layers.0.mlp.up_proj": (2 * H, H)}, 2)
    with pytest.warns(UserWarning, match="share no module"):
        cos = lorafuse.similarity([str(a), str(b)])
    np.testing.assert_allclose(cos, [[1.0, 0.0], [0.0, 1.0]], rtol=1e-12, atol=0)

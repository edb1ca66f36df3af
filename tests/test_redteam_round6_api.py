"""Red-team round 6, lorafuse as a Python library (the API's findings, fixed).

1. A pickled or deep-copied adapter whose file was truncated or rewritten in place since `load` raises
   InputChangedError, as reading its tensors does; it never travels (to a spawned process, a cache) as the zeros
   or the new bytes the mapping now reads: the copy would have no file left to check.
2. `Adapter.from_state_dict`'s config is taken as adapter_config.json holds it: numpy scalars (r, lora_alpha,
   lora_dropout), a tuple target_modules (a peft LoraConfig keeps a tuple as given) and paths are read as their
   JSON values, so the adapter saves; a value JSON cannot hold (bytes, an object, a cycle, a non-str field name) is
   refused naming the field, not a bare TypeError / ValueError from `save`.
3. The float rank rules (`sv_ratio`, `sv_fro`, `sv_cumulative`) and combine's `density` take a 0-d numpy array /
   torch tensor, as the integer options and the weights do.
4. A `device` that is not a str (a torch.device) is refused saying what was given.
5. Warnings lorafuse gives deep inside an operation (OverwriteWarning at an output's commit, AdapterNote of combine,
   convert, dtype notes) name the caller's file and line (errors.warn), not contextlib's or lorafuse's.
6. The streamed combine no longer silences its re-reads' notes with warnings.catch_warnings (process-wide, not
   thread-safe: another thread's warnings lost, its filters undone): it reads them without notes (formats.read).
7. Committing an output leaves alone a signal whose handler Python did not install (None: an embedding app's),
   instead of a TypeError after the commit with SIGINT left swallowed.
8. A path too long for the system (ENAMETOOLONG) is a LorafuseError for apply's base, extract, describe, run's out,
   convert's base_config and the streamed combine, not a bare OSError from Path.exists() / is_dir().
9. A PeftModel's own state_dict() (`lora_A.default.weight`) is refused saying to use get_peft_model_state_dict.
10. progress=None with a closed stderr draws no bar instead of raising ValueError.

Independent references: deltas in numpy float64 from the factors written here, PEFT's own LoraConfig.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import peft_deltas as reference_deltas
from redteam_fixtures import peft_folder

import lorafuse
from lorafuse import Adapter, InputChangedError, LorafuseValueError

PREFIX = "base_model.model."
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
LLM = {Q: (12, 10), V: (12, 10)}


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return peft_folder(tmp_path / "a", LLM, 1, rank=4, alpha=8)


def _loaded(folder: Path) -> Adapter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lorafuse.load(folder)


# ----------------------------------------------------------------------------- 1. pickling a changed file

def _pickled(a: Adapter) -> Adapter:
    return pickle.loads(pickle.dumps(a))


@pytest.mark.parametrize("how", [_pickled, copy.deepcopy], ids=["pickle", "deepcopy"])
def test_an_intact_adapter_pickles_and_copies_to_its_deltas(folder: Path, how) -> None:  # type: ignore[no-untyped-def]
    want = reference_deltas(folder)
    got = how(_loaded(folder))
    assert set(got) == set(want)
    for name, d in want.items():
        np.testing.assert_allclose(got[name].delta(), d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("how", [_pickled, copy.deepcopy], ids=["pickle", "deepcopy"])
@pytest.mark.parametrize("change", ["truncated", "rewritten"])
def test_a_changed_file_is_not_pickled_or_copied_as_zeros(folder: Path, how, change: str) -> None:  # type: ignore[no-untyped-def]
    a = _loaded(folder)
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    with open(weights, "r+b") as f:
        if change == "truncated":  # the mapping's pages past the new end read as zeros
            f.truncate(len(data) // 2)
        else:  # same size, other values: the last factor's elements zeroed in place
            data[-16:] = bytes(16)
            f.write(data)
    with pytest.raises(InputChangedError, match="adapter_model.safetensors"):
        how(a)


def test_a_pickled_changed_adapter_cannot_carry_zeros_to_another_process(folder: Path) -> None:
    """In this process a save checks every mapped file before it commits; a copy unpickled elsewhere (a spawned
    worker) has no mapping to check, so the pickling itself must refuse."""
    a = _loaded(folder)
    weights = folder / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(InputChangedError):
        a.state_dict()
    with pytest.raises(InputChangedError):
        pickle.dumps(a * 1.0)  # arithmetic's result holds views of the same mapping


# ----------------------------------------------------------------------------- 2. from_state_dict's config

def _state() -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((4, 10)).astype(np.float32)
    b = rng.standard_normal((12, 4)).astype(np.float32)
    return {f"{PREFIX}{Q}.lora_A.weight": a, f"{PREFIX}{Q}.lora_B.weight": b}, b.astype(np.float64) @ a.astype(
        np.float64)


@pytest.mark.parametrize("config, scale", [
    ({"r": np.int64(4), "lora_alpha": np.float32(8)}, 2.0),
    ({"r": 4, "lora_alpha": 8, "lora_dropout": np.float32(0.1), "rank_pattern": {"q_proj": np.int32(4)}}, 2.0),
    ({"r": 4, "lora_alpha": 2, "target_modules": ("q_proj",)}, 0.5),
    ({"r": 4, "lora_alpha": 4, "base_model_name_or_path": Path("/models/llama")}, 1.0),
], ids=["numpy-r-alpha", "numpy-fields", "tuple-targets", "path-field"])
def test_config_values_of_python_types_are_taken_and_saved(tmp_path: Path, config: dict, scale: float) -> None:
    sd, ref = _state()
    x = Adapter.from_state_dict(sd, config)
    np.testing.assert_allclose(x[Q].delta(), scale * ref, rtol=1e-6, atol=1e-6)
    out = x.save(tmp_path / "out")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and isinstance(saved["r"], int)
    np.testing.assert_allclose(_loaded(out)[Q].delta(), scale * ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reference_deltas(out)[Q], scale * ref, rtol=1e-6, atol=1e-6)


def test_a_lora_config_with_a_tuple_of_targets_is_taken(tmp_path: Path) -> None:
    from peft import LoraConfig

    sd, ref = _state()
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=("q_proj",))  # PEFT keeps a tuple as it is given
    x = Adapter.from_state_dict(sd, cfg)
    np.testing.assert_allclose(x[Q].delta(), 3.0 * ref, rtol=1e-6, atol=1e-6)
    assert x.config["target_modules"] == ["q_proj"]
    np.testing.assert_allclose(_loaded(x.save(tmp_path / "out"))[Q].delta(), 3.0 * ref, rtol=1e-6, atol=1e-6)


def _cycle() -> dict[str, object]:
    d: dict[str, object] = {"r": 4, "lora_alpha": 8}
    d["loop"] = d
    return d


@pytest.mark.parametrize("config, field", [
    ({"r": 4, "lora_alpha": 8, "base_model_name_or_path": b"/models/llama"}, "base_model_name_or_path"),
    ({"r": 4, "lora_alpha": 8, "extra": object()}, "extra"),
    (_cycle(), "loop"),
    ({"r": 4, "lora_alpha": 8, 5: "x"}, "field names must be strings"),
    ({"r": 4, "lora_alpha": 8, "extra": 10**5000}, "extra"),
], ids=["bytes", "object", "cycle", "int-key", "huge-int"])
def test_a_config_json_cannot_hold_is_refused_naming_the_field(tmp_path: Path, config: dict, field: str) -> None:
    sd, _ = _state()
    with pytest.raises(LorafuseValueError, match=field):
        Adapter.from_state_dict(sd, config).save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 3. 0-d arrays as float options

@pytest.mark.parametrize("rule", ["sv_fro", "sv_cumulative", "sv_ratio"])
@pytest.mark.parametrize("wrap", [np.array, torch.tensor], ids=["numpy", "torch"])
def test_float_rules_take_a_0d_array_as_integers_do(folder: Path, rule: str, wrap) -> None:  # type: ignore[no-untyped-def]
    value = 4.0 if rule == "sv_ratio" else 0.9
    want = lorafuse.resize(folder, **{rule: value})
    got = lorafuse.resize(folder, **{rule: wrap(value)})
    assert got.ranks == want.ranks
    for name in want.ranks:
        np.testing.assert_array_equal(got.adapter[name].delta(), want.adapter[name].delta())


def test_density_takes_a_0d_array(folder: Path, tmp_path: Path) -> None:
    other = peft_folder(tmp_path / "b", LLM, 2, rank=4, alpha=2)
    want = lorafuse.combine([folder, other], method="ties", density=0.5)
    got = lorafuse.combine([folder, other], method="ties", density=np.array(0.5))
    for name in want:
        np.testing.assert_array_equal(got[name].delta(), want[name].delta())


@pytest.mark.parametrize("value", [np.array(True), np.array([0.5]), "0.5"], ids=["0-d-bool", "1-d", "str"])
def test_float_rules_still_refuse_what_is_not_one_real_number(folder: Path, value: object) -> None:
    with pytest.raises(LorafuseValueError, match="sv_fro must be a finite number"):
        lorafuse.resize(folder, sv_fro=value)


# ----------------------------------------------------------------------------- 4. device of another type

def test_a_torch_device_is_refused_saying_what_was_given(folder: Path) -> None:
    with pytest.raises(LorafuseValueError, match=r"device must be 'cpu' or 'cuda' \(a str\), got device\(type='cpu'\)"):
        lorafuse.resize(folder, 2, device=torch.device("cpu"))


# ----------------------------------------------------------------------------- 5. warnings at the caller's line

def _warned_here(call) -> list[warnings.WarningMessage]:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return caught


def _user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("the user's")
    return path


def test_overwrite_warnings_point_at_the_callers_line(folder: Path, tmp_path: Path) -> None:
    """An OverwriteWarning is the user's business: it names this file and line (as `load`'s AdapterNote does),
    not contextlib's or lorafuse's, however deep the output was committed; a `warnings.filterwarnings(module=...)`
    of the user's then reaches it."""
    a = _loaded(folder)
    calls = {
        "save": lambda: a.save(_user_folder(tmp_path / "s"), overwrite=True),
        "resize": lambda: lorafuse.resize(folder, 2, out=_user_folder(tmp_path / "r"), overwrite=True),
        "combine-save": lambda: (a * 0.5).save(_user_folder(tmp_path / "c"), overwrite=True),
    }
    for what, call in calls.items():
        caught = [w for w in _warned_here(call) if issubclass(w.category, lorafuse.OverwriteWarning)]
        assert len(caught) == 1, what
        assert caught[0].filename == __file__, (what, caught[0].filename, caught[0].lineno)


def test_a_combine_note_points_at_the_callers_line(folder: Path) -> None:
    caught = [w for w in _warned_here(lambda: lorafuse.combine([folder], rank=2))
              if issubclass(w.category, lorafuse.AdapterNote)]
    assert caught and {w.filename for w in caught} == {__file__}, [(w.filename, w.lineno) for w in caught]


# ----------------------------------------------------------------------------- 6. the process's warning filters

def _with_nan(folder: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    t = load_file(str(weights))
    t[f"{PREFIX}{Q}.lora_A.weight"][0, 0] = np.nan
    save_file(t, str(weights))
    return folder


@pytest.mark.parametrize("nan", [False, True], ids=["result", "nan-error"])
def test_the_streamed_combine_leaves_the_warning_filters_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                nan: bool) -> None:
    """warnings.catch_warnings swaps the filters of the whole process: a streamed combine that silenced its own
    notes that way while another thread of the user's ran would lose that thread's warnings, or undo a filter
    it set. An adapter read again (a later pass, the NaN error's search) is read without its notes instead."""
    folders = [peft_folder(tmp_path / f"n{i}", LLM, i, rank=4, alpha=8, extra={"target_modules": ["q_proj"]})
               for i in range(3)]  # v_proj's tensors: PEFT leaves them out, an AdapterNote says so
    if nan:
        _with_nan(folders[1])
    swapped: list[str] = []

    class Recording(warnings.catch_warnings):
        def __enter__(self):  # type: ignore[no-untyped-def]
            swapped.append("catch_warnings")
            return super().__enter__()

    monkeypatch.setattr(warnings, "catch_warnings", Recording)
    with warnings.catch_warnings(record=True) as caught:  # the test's own, before the patch applies to it
        warnings.simplefilter("always")
        swapped.clear()
        if nan:
            with pytest.raises(lorafuse.NonFiniteError, match="n1"):
                lorafuse.combine(folders, engine="stream", passes=3, rank=2)
        else:
            mix = lorafuse.combine(folders, engine="stream", passes=3, rank=2)
    assert swapped == []
    notes = [w for w in caught if issubclass(w.category, lorafuse.AdapterNote) and "v_proj" in str(w.message)]
    assert len(notes) == 3, [str(w.message) for w in notes]  # once per adapter, not once per pass
    if not nan:
        want = sum(reference_deltas(f)[Q] for f in folders)
        u, s, vt = np.linalg.svd(want)
        np.testing.assert_allclose(mix[Q].delta(), (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- 7. a signal handler not Python's

def test_an_embedding_applications_signal_handler_is_left_alone(folder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An application embedding Python may have installed its own SIGTERM handler in C: Python reads it as None
    (signal.getsignal), and signal.signal(SIGTERM, None) is a TypeError. The commit of an output holds the
    signals it can put back and leaves that one alone: the save succeeds and the handler is never replaced."""
    import signal

    real_signal, real_getsignal = signal.signal, signal.getsignal
    replaced: list[object] = []

    def fake_getsignal(s):  # type: ignore[no-untyped-def]
        return None if s == signal.SIGTERM else real_getsignal(s)

    def fake_signal(s, handler):  # type: ignore[no-untyped-def]
        if s != signal.SIGTERM:
            return real_signal(s, handler)
        if handler is None:
            raise TypeError("signal handler must be signal.SIG_IGN, signal.SIG_DFL, or a callable object")
        replaced.append(handler)
        return None  # what Python returns for a handler it did not install

    monkeypatch.setattr(signal, "getsignal", fake_getsignal)
    monkeypatch.setattr(signal, "signal", fake_signal)
    before = real_getsignal(signal.SIGINT)
    out = _loaded(folder).save(tmp_path / "out")
    assert replaced == []
    assert real_getsignal(signal.SIGINT) is before
    np.testing.assert_allclose(_loaded(out)[Q].delta(), reference_deltas(folder)[Q], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 8. a name the system refuses

LONG = "z" * 300  # beyond NAME_MAX (255): os.stat raises ENAMETOOLONG, which Path.exists() raised on Python < 3.13


def test_a_name_too_long_is_a_lorafuse_error_everywhere(folder: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    from redteam_fixtures import llm_base

    llm_base(base, LLM)
    long = str(tmp_path / LONG)
    recipe = {"merge_method": "svd", "models": [{"model": str(folder)}], "parameters": {"rank": 2}}
    calls = {
        "apply base": lambda: lorafuse.apply(long, [folder], out=tmp_path / "o1", progress=False),
        "extract base": lambda: lorafuse.extract(long, base, rank=2),
        "extract finetuned": lambda: lorafuse.extract(base, long, rank=2),
        "describe": lambda: lorafuse.describe(long),
        "run out": lambda: lorafuse.run(recipe, long),
        "gguf base_config": lambda: lorafuse.convert(folder, tmp_path / "x.gguf", to="gguf", base_config=long),
        "load": lambda: lorafuse.load(long),
        "combine stream": lambda: lorafuse.combine([folder, long], rank=2, engine="stream"),
        "save": lambda: _loaded(folder).save(long),
    }
    for what, call in calls.items():
        with pytest.raises(lorafuse.LorafuseError) as e:
            call()
        assert LONG[:50] in str(e.value), (what, str(e.value)[:200])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]


# ----------------------------------------------------------------------------- 9. a PeftModel's own state_dict()

def test_a_peft_models_own_state_dict_is_refused_saying_what_to_give() -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(10, 12, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q_proj(x)

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(Tiny(), cfg)
    with pytest.raises(lorafuse.FormatError, match=r"adapter's name \('default'\).*get_peft_model_state_dict"):
        Adapter.from_state_dict(model.state_dict(), cfg)
    x = Adapter.from_state_dict(get_peft_model_state_dict(model), cfg)
    lora = model.base_model.model.q_proj
    want = 2.0 * (lora.lora_B["default"].weight.detach().double() @ lora.lora_A["default"].weight.detach().double())
    np.testing.assert_allclose(x["q_proj"].delta(), want.numpy(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 10. a closed stderr

def test_apply_with_a_closed_stderr_draws_no_bar_and_merges(folder: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """progress=None draws a bar when stderr is a terminal: a closed stderr (a daemon's, a test runner's) is not
    one, and asking it is not an error (ValueError: I/O operation on closed file)."""
    import io

    from redteam_fixtures import llm_base
    from safetensors.numpy import load_file

    base = llm_base(tmp_path / "base", LLM)
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr("sys.stderr", closed)
    report = lorafuse.apply(base, [folder], out=tmp_path / "merged")
    monkeypatch.undo()
    got = load_file(str(report.out / "model.safetensors"))
    want = load_file(str(base / "model.safetensors"))[f"{Q}.weight"].astype(np.float64) + reference_deltas(folder)[Q]
    np.testing.assert_allclose(got[f"{Q}.weight"], want, rtol=1e-6, atol=1e-5)

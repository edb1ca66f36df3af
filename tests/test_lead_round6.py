"""Lead's round-6 mends: a transformers config.json naming its weights file (`transformers_weights`) is read, merged
and fetched as transformers loads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.errors import FormatError
from lorafuse.io.checkpoint import Checkpoint


def _tiny_llama(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def _adapter(base: Path, folder: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(folder)


@pytest.fixture()
def named_base(tmp_path: Path) -> Path:
    """A folder whose config.json names consolidated.safetensors, beside a decoy model.safetensors of zeros."""
    base = tmp_path / "base"
    _tiny_llama(base)
    (base / "model.safetensors").rename(base / "consolidated.safetensors")
    real = load_file(base / "consolidated.safetensors")
    save_file({k: np.zeros_like(v) for k, v in real.items()}, base / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["transformers_weights"] = "consolidated.safetensors"
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_the_checkpoint_reads_the_file_the_config_names(named_base: Path) -> None:
    ckpt = Checkpoint(named_base)
    assert ckpt.shards == ["consolidated.safetensors"]
    assert any("transformers_weights" in n for n in ckpt.notes)


def test_apply_merges_the_named_file_and_transformers_loads_the_merge(named_base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _adapter(named_base, tmp_path / "lora")
    out = tmp_path / "out"
    lorafuse.apply(named_base, [tmp_path / "lora"], out=out)
    # the reference: what transformers loads (the named file) merged by PEFT
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(named_base), tmp_path / "lora").merge_and_unload()
    want = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    got = LlamaForCausalLM.from_pretrained(out).state_dict()
    assert (out / "consolidated.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["transformers_weights"] == "consolidated.safetensors"
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        np.testing.assert_allclose(got[name].float().numpy(), want[name], rtol=1e-6, atol=1e-6)
    assert np.abs(got["model.layers.0.self_attn.q_proj.weight"].float().numpy()).max() > 0  # not the decoy


@pytest.mark.parametrize("value, said", [
    ("../other.safetensors", "is a path"),
    ("pytorch_model.bin", "is not a FILE.safetensors"),
    ("missing.safetensors", "is not a file in"),
    (7, "is not a file name"),
])
def test_a_named_file_lorafuse_cannot_read_as_transformers_does_is_refused(named_base: Path, value: object,
                                                                           said: str) -> None:
    cfg = json.loads((named_base / "config.json").read_text())
    cfg["transformers_weights"] = value
    (named_base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="transformers_weights") as e:
        Checkpoint(named_base)
    assert said in str(e.value)


def test_a_named_index_is_read_with_its_shards(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    save_file({"a": np.ones((2, 2), np.float32)}, base / "part-1.safetensors")
    save_file({"b": np.ones((2, 2), np.float32)}, base / "part-2.safetensors")
    save_file({"a": np.zeros((2, 2), np.float32)}, base / "model.safetensors")
    (base / "weights.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}))
    (base / "config.json").write_text(json.dumps({"transformers_weights": "weights.safetensors.index.json"}))
    ckpt = Checkpoint(base)
    assert ckpt.shards == ["part-1.safetensors", "part-2.safetensors"]
    assert ckpt.index_name == "weights.safetensors.index.json"



def test_the_cli_leaves_a_signal_handler_set_outside_python_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An embedding application's own C handler (getsignal: None) could not be put back by Python: the CLI leaves
    that signal alone instead of failing (TypeError) after the command; the others it sets and puts back."""
    import signal

    from redteam_fixtures import peft_folder

    from lorafuse import cli

    peft_folder(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (8, 6)}, 1)
    real_getsignal, real_signal = signal.getsignal, signal.signal
    hup_before = real_getsignal(signal.SIGHUP)
    set_calls: list[int] = []

    def getsignal(s: int) -> object:
        return None if s == signal.SIGTERM else real_getsignal(s)

    def set_signal(s: int, h: object) -> object:
        set_calls.append(s)
        return real_signal(s, h)  # type: ignore[arg-type]

    monkeypatch.setattr(signal, "getsignal", getsignal)
    monkeypatch.setattr(signal, "signal", set_signal)
    assert cli.main(["info", str(tmp_path / "a")]) == 0
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().out
    assert signal.SIGTERM not in set_calls
    if hup_before is signal.SIG_DFL:  # caught during the command, then put back
        assert set_calls.count(signal.SIGHUP) == 2 and real_getsignal(signal.SIGHUP) is signal.SIG_DFL


def test_the_folder_suggested_for_a_one_file_name_is_one_lorafuse_writes(tmp_path: Path) -> None:
    """`resize ad -o ad/adapter_model.safetensors` (a PEFT adapter no one-file format holds) suggests a folder name;
    the suggestion is not inside the input (which is refused), and resize writes it."""
    import re

    from redteam_fixtures import peft_folder, run_cli

    ad = peft_folder(tmp_path / "ad", {"model.layers.0.self_attn.q_proj": (8, 6)}, 1)
    code, _, err = run_cli(["resize", str(ad), "--rank", "1", "-o", str(ad / "adapter_model.safetensors")])
    assert code == 2
    suggested = re.search(r"give a folder name, e\.g\. (\S+)$", err.strip())
    assert suggested is not None, err
    folder = Path(suggested.group(1))
    assert ad not in folder.parents and folder != ad
    code, _, err = run_cli(["resize", str(ad), "--rank", "1", "-o", str(folder)])
    assert code == 0, err
    assert (folder / "adapter_config.json").is_file()


def test_a_terminal_that_hangs_up_ends_the_command_with_129(tmp_path: Path) -> None:
    """A real hang-up: the terminal closes while a command runs, SIGHUP comes, and the line lorafuse says on its way
    out cannot be written (EIO): the command still ends as documented, exit status 129, not in an OSError."""
    import os
    import pty
    import sys
    import time

    pid, master = pty.fork()
    if pid == 0:  # the child: a command that takes a while, on the terminal's side
        status = 99
        try:
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the terminal, not pytest's capture)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            from lorafuse import cli

            def slow(args: object) -> int:
                time.sleep(10)
                return 0

            cli._commands = lambda: {"info": slow}  # type: ignore[attr-defined]
            status = cli.main(["info", str(tmp_path)])
        except BaseException as e:  # noqa: BLE001 (reported through the status)
            (tmp_path / "raised").write_text(repr(e))
        finally:
            os._exit(status)
    time.sleep(3)  # the child has imported lorafuse and is sleeping in the command
    os.close(master)  # the terminal goes away: the kernel hangs up the session
    _, status = os.waitpid(pid, 0)
    assert not (tmp_path / "raised").exists(), (tmp_path / "raised").read_text()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 129, status


def test_a_python_caller_without_stdout_can_run_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sys.stdout = None` (a caller that silences output so; pythonw): the CLI runs, printing nothing, as before."""
    import sys

    from redteam_fixtures import peft_folder

    from lorafuse import cli

    ad = peft_folder(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (8, 6)}, 1)
    monkeypatch.setattr(sys, "stdout", None)
    assert cli.main(["info", str(ad)]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0


def test_a_text_encoder_name_never_reaches_a_denoiser_weight() -> None:
    """The underscore matcher reads a path inside a single file's `model.diffusion_model.` only for the denoiser's
    names (lora_unet_, lycoris_): `lora_te_blocks_0_attn_q` is no name of `model.diffusion_model.blocks.0.attn.q`."""
    from lorafuse.ops.match import UnderscoreNames

    shapes = {"model.diffusion_model.blocks.0.attn.q.weight": (4, 4), "text_encoders.t5.blocks.0.attn.q.weight": (4, 4)}
    found, left = UnderscoreNames().match({"lora_te_blocks_0_attn_q": (4, 4), "lora_unet_blocks_0_attn_q": (4, 4)},
                                          shapes)
    assert left == ["lora_te_blocks_0_attn_q"]
    assert [t.key for t in found["lora_unet_blocks_0_attn_q"]] == ["model.diffusion_model.blocks.0.attn.q.weight"]


@pytest.mark.parametrize("config", [{"r": 2, "lora_alpha": 2, "rank_pattern": {1: 4}},
                                    {"r": 2, "lora_alpha": 2, "alpha_pattern": {None: 4}},
                                    {"r": 2, "lora_alpha": 2, "layers_to_transform": [{2.5: 1}]}])
def test_a_state_dict_config_with_keys_that_are_not_text_is_refused(config: dict) -> None:
    """json.dumps would turn a key 1 into "1" silently: a rank_pattern no PEFT writes, refused naming it."""
    from lorafuse.errors import LorafuseValueError

    rng = np.random.default_rng(0)
    sd = {"base_model.model.q.lora_A.weight": rng.standard_normal((2, 4)).astype(np.float32),
          "base_model.model.q.lora_B.weight": rng.standard_normal((3, 2)).astype(np.float32)}
    with pytest.raises(LorafuseValueError, match="keys are strings"):
        lorafuse.Adapter.from_state_dict(sd, config)
    assert list(lorafuse.Adapter.from_state_dict(sd, {"r": 2, "lora_alpha": 4, "rank_pattern": {"q": 2}})) == ["q"]


@pytest.mark.parametrize("verb", ["apply", "resize", "convert"])
def test_json_output_names_an_undecodable_path_as_text_strict_readers_take(tmp_path: Path, verb: str) -> None:
    """A --json output holds no lone surrogate (json.dumps writes the file name's byte 0xff as \\udcff, which strict
    JSON readers refuse): the byte is written as \\xff, as info shows it."""
    import os

    from redteam_fixtures import kohya_file, llm_base, peft_folder, run_cli

    shapes = {"model.layers.0.self_attn.q_proj": (8, 6)}
    base = llm_base(tmp_path / "base", shapes)
    ad = peft_folder(tmp_path / "ad", shapes, 1)
    kohya = kohya_file(tmp_path / "k.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 2)
    out = tmp_path / os.fsdecode(b"out\xff")
    argv = {"apply": ["apply", str(base), str(ad)], "resize": ["resize", str(ad), "--rank", "1"],
            "convert": ["convert", str(kohya), "--to", "peft"]}[verb]
    if verb == "convert":  # one diffusers LoRA file
        out = out.with_name(out.name + ".safetensors")
    code, stdout, err = run_cli([*argv, "-o", str(out), "--json"])
    assert code == 0, err
    assert "\\udc" not in stdout
    assert "out\\\\xff" in stdout  # the JSON text of the name's \\xff
    json.loads(stdout)


@pytest.mark.parametrize("signum, status", [(2, 130), (15, 143)])
def test_a_ctrl_c_that_an_extension_module_turns_into_an_import_error_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signum: int, status: int) -> None:
    """numpy's C core stopped by a Ctrl-C while it imports `datetime` raises "ImportError: PyCapsule_Import could
    not import module datetime" with no KeyboardInterrupt in its chain (seen in a CI run): the console script, which
    saw the signal, still says one line and exits 130 (143 for SIGTERM), not a traceback."""
    import signal

    from redteam_fixtures import stop_import

    import lorafuse_entry

    def lost() -> BaseException:
        lorafuse_entry.SEEN.append(signum)  # what the script's handler records when the signal comes
        return ImportError("PyCapsule_Import could not import module \"datetime\"")

    stop_import(monkeypatch, "lorafuse.cli", lost)
    assert lorafuse_entry.main() == status
    assert capsys.readouterr().err == "lorafuse: interrupted; no output was written\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_an_import_error_without_a_signal_is_not_called_an_interruption(monkeypatch: pytest.MonkeyPatch) -> None:
    from redteam_fixtures import stop_import

    import lorafuse_entry

    stop_import(monkeypatch, "lorafuse.cli", ImportError("a damaged install"))
    with pytest.raises(ImportError, match="a damaged install"):
        lorafuse_entry.main()

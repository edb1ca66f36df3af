"""One apply path: a checkpoint is a pipeline of one component.

- the same UNet merged as a bare checkpoint folder, as a single file and as a component of a
  diffusers pipeline gives the same bytes, equal to numpy float64 W + sum w s B A rounded once;
- the progress callback sees every output tensor exactly once (counts and bytes add up);
- the CLI draws a bar only on a terminal or with --progress;
- the key matchers are tried in their order, and the diffusion chain finds what resolve finds.
"""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sd_fixtures as sdk
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file

import lorafuse
import lorafuse.ops.apply as apply_mod
from lorafuse._progress import ProgressEvent
from lorafuse.cli import main
from lorafuse.errors import MissingModuleError
from lorafuse.formats.targets import Target
from lorafuse.ops.match import ModuleChain, checkpoint_keys, module_chain

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def unet() -> dict[str, torch.Tensor]:
    model = sdk._randomized(sdk._unet("sd1"), 0)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def linear_layers() -> dict[str, tuple[int, ...]]:
    layers = sdk._layers(sdk._unet("sd1"))
    return {p: s for p, s in layers.items() if len(s) == 2}


def _kohya(layers: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA (rank 2, random alphas, float32) on every Linear of the UNet."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for path, (out, inp) in layers.items():
        name = sdk._kohya_unet_name(path, "sd1", "diffusers")
        sd[name + ".lora_down.weight"] = torch.randn((2, inp), generator=g) * 0.3
        sd[name + ".lora_up.weight"] = torch.randn((out, 2), generator=g) * 0.3
        sd[name + ".alpha"] = torch.tensor(float(torch.randint(1, 5, (1,), generator=g)))
    return sd


def _reference(base: dict[str, torch.Tensor], adapters: list[dict[str, torch.Tensor]], weights: list[float],
               layers: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """W + sum_i w_i s_i B_i A_i in float64, rounded once to float16."""
    out = {k: v.numpy() for k, v in base.items()}
    for path in layers:
        key = path + ".weight"
        acc = base[key].double().numpy()
        name = sdk._kohya_unet_name(path, "sd1", "diffusers")
        for sd, w in zip(adapters, weights):
            down, up = sd[name + ".lora_down.weight"].double().numpy(), sd[name + ".lora_up.weight"].double().numpy()
            acc = acc + w * float(sd[name + ".alpha"]) / down.shape[0] * (up @ down)
        out[key] = acc.astype(np.float16)
    return out


def _inputs(tmp_path: Path, unet: dict[str, torch.Tensor], layers) -> tuple[Path, Path, Path, list[Path]]:  # type: ignore[no-untyped-def]
    folder = tmp_path / "unet_ckpt"
    folder.mkdir()
    save_file(unet, str(folder / WEIGHTS))
    (folder / "config.json").write_text('{"marker": "unet"}')
    single = tmp_path / "unet.safetensors"
    save_file(unet, str(single))
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    save_file(unet, str(pipe / "unet" / WEIGHTS))
    (pipe / "unet" / "config.json").write_text('{"marker": "unet"}')
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"beta_start": 0.00085}')
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    adapters = []
    for seed in (1, 2):
        path = tmp_path / f"lora{seed}.safetensors"
        save_file(_kohya(layers, seed), str(path))
        adapters.append(path)
    return folder, single, pipe, adapters


def _assert_rounded_once(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Every tensor equal to the float64 reference rounded to float16, up to one ulp where float32
    arithmetic lands on the other side of a rounding boundary (and such cases are rare)."""
    assert set(got) == set(want)
    for key, ref in want.items():
        g = got[key]
        assert g.dtype == ref.dtype and g.shape == ref.shape, key
        ulp = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(g.astype(np.float64) - ref.astype(np.float64)) <= ulp), key
        assert np.mean(g == ref) > 0.99, key


def test_checkpoint_file_and_pipeline_give_the_same_bytes(unet, linear_layers, tmp_path: Path) -> None:
    folder, single, pipe, adapters = _inputs(tmp_path, unet, linear_layers)
    weights = [0.7, -0.4]
    want = _reference(unet, [_kohya(linear_layers, 1), _kohya(linear_layers, 2)], weights, linear_layers)

    r_dir = lorafuse.apply(folder, adapters, weights, out=tmp_path / "out_dir", progress=False)
    r_file = lorafuse.apply(single, adapters, weights, out=tmp_path / "out.safetensors", progress=False)
    r_pipe = lorafuse.apply(pipe, adapters, weights, out=tmp_path / "out_pipe", progress=False)

    got_dir = load_np(str(tmp_path / "out_dir" / WEIGHTS))
    got_file = load_np(str(tmp_path / "out.safetensors"))
    got_pipe = load_np(str(tmp_path / "out_pipe" / "unet" / WEIGHTS))
    _assert_rounded_once(got_dir, want)
    for key in want:
        assert np.array_equal(got_dir[key], got_file[key]) and np.array_equal(got_dir[key], got_pipe[key]), key

    merged = sorted(p + ".weight" for p in linear_layers)
    assert sorted(r_dir.merged) == sorted(r_file.merged) == merged
    assert sorted(r_pipe.merged) == [f"unet/{k}" for k in merged]
    assert r_dir.tensors == r_file.tensors == r_pipe.tensors == len(unet)
    assert r_dir.bytes_written == r_pipe.bytes_written == sum(v.nbytes for v in got_dir.values())
    # the rest of each folder: side files copied as they are
    assert (tmp_path / "out_dir" / "config.json").read_text() == '{"marker": "unet"}'
    assert (tmp_path / "out_pipe" / "scheduler" / "scheduler_config.json").read_text() == '{"beta_start": 0.00085}'
    assert (tmp_path / "out_pipe" / "model_index.json").read_bytes() == (pipe / "model_index.json").read_bytes()


@pytest.mark.parametrize("layout", ["folder", "file", "pipeline"])
@pytest.mark.parametrize("chunk", [None, 256])
def test_progress_events_cover_every_tensor_once(unet, linear_layers, tmp_path: Path, layout: str,
                                                 chunk: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if chunk is not None:  # large tensors in row blocks: several events each, one of them finishes it
        monkeypatch.setattr(apply_mod, "CHUNK_BYTES", chunk)
    folder, single, pipe, adapters = _inputs(tmp_path, unet, linear_layers)
    base = {"folder": folder, "file": single, "pipeline": pipe}[layout]
    out = tmp_path / ("out.safetensors" if layout == "file" else "out")
    events: list[ProgressEvent] = []
    report = lorafuse.apply(base, adapters[:1], out=out, progress=events.append)

    prefix = "unet/" if layout == "pipeline" else ""
    sizes = {prefix + k: v.numel() * v.element_size() for k, v in unet.items()}
    done = Counter(e.name for e in events if e.tensor_done)
    assert done == Counter(sizes.keys())  # every tensor finished exactly once
    per_tensor = Counter()
    for e in events:
        per_tensor[e.name] += e.nbytes
    assert dict(per_tensor) == {k: v for k, v in sizes.items() if v} | {k: 0 for k, v in sizes.items() if not v}
    assert [e.done_bytes for e in events] == list(np.cumsum([e.nbytes for e in events]))
    last = events[-1]
    assert last.done_bytes == last.total_bytes == report.bytes_written == sum(sizes.values())
    assert last.done_tensors == last.total_tensors == report.tensors == len(unet)
    assert all(e.op == "apply" for e in events)
    if chunk is not None:
        assert max(Counter(e.name for e in events).values()) > 1, "the test needs tensors split into row blocks"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("flag, terminal, drawn", [
    ((), False, False), ((), True, True), (("--progress",), False, True), (("--no-progress",), True, False)])
def test_the_cli_draws_a_bar_only_on_a_terminal_or_when_asked(unet, linear_layers, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str], flag: tuple[str, ...],
                                                             terminal: bool, drawn: bool) -> None:
    folder, _, _, adapters = _inputs(tmp_path, unet, linear_layers)
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["apply", str(folder), str(adapters[0]), "-o", str(tmp_path / "out"), *flag]) == 0
    text = err.getvalue()
    assert f"merged {len(linear_layers)} weights" in capsys.readouterr().out  # the report either way
    bar = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("apply:")]
    assert bool(bar) == drawn, text
    if drawn:
        assert "100%" in bar[-1]


def test_key_chain_order() -> None:
    keys = ["a.b.weight", "model.a.b.weight", "layers.0.q.weight", "x.c.weight", "y.c.weight", "embed.weight"]
    chain = checkpoint_keys(keys, ["lm_head.weight"])
    assert chain.names == ["exact", "hf-prefix", "hf-shorter", "virtual"]
    assert chain.find("a.b.weight") == "a.b.weight"  # exact, before the prefixed key
    assert chain.find("q.weight") == "layers.0.q.weight"  # hf-prefix
    assert chain.find("model.layers.0.q.weight") == "layers.0.q.weight"  # hf-shorter
    assert chain.find("lm_head.weight") == "lm_head.weight"  # virtual, last
    assert chain.find("nothing.weight") is None
    with pytest.raises(MissingModuleError, match="several base keys"):
        chain.find("c.weight")
    # a stored lm_head under a prefix wins over the virtual one
    assert checkpoint_keys(["model.lm_head.weight"], ["lm_head.weight"]).find("lm_head.weight") == \
        "model.lm_head.weight"


def test_module_chain_order() -> None:
    chain = ["flux", "sd", "component", "underscore", "original", "original-weights"]  # original: ops.match
    assert module_chain("kohya", lambda k: None).names == chain
    assert module_chain("diffusers", lambda k: None).names == chain
    assert module_chain("peft", lambda k: None).names == ["keys", "fused"]  # fused: q/k/v into qkv_proj, experts

    seen: list[tuple[str, list[str]]] = []

    class Takes:
        def __init__(self, name: str, takes: set[str]) -> None:
            self.name, self.takes = name, takes

        def match(self, modules, shapes):  # type: ignore[no-untyped-def]
            seen.append((self.name, list(modules)))
            found = {m: [Target(f"{self.name}:{m}")] for m in modules if m in self.takes}
            return found, [m for m in modules if m not in found]

    chain = ModuleChain([Takes("first", {"b", "c"}), Takes("second", {"a", "c", "d"}), Takes("third", set())])
    found, missing = chain.match({n: (1, 1) for n in "abcde"}, {})
    assert {m: t[0].key for m, t in found.items()} == {"a": "second:a", "b": "first:b", "c": "first:c",
                                                        "d": "second:d"}
    assert missing == ["e"]
    assert seen == [("first", list("abcde")), ("second", ["a", "d", "e"]), ("third", ["e"])]


def test_the_diffusion_chain_finds_what_resolve_finds(unet, linear_layers, tmp_path: Path) -> None:
    from lorafuse.formats import load
    from lorafuse.ops import resolve

    path = tmp_path / "lora.safetensors"
    sd = _kohya(linear_layers, 3)
    sd["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 2)
    save_file(sd, str(path))
    adapter = load(path)
    for prefix in ("", "unet/"):
        shapes = {prefix + k: tuple(v.shape) for k, v in unet.items()}
        modules = {n: tuple(u.delta_shape) for n, u in adapter.updates.items()}
        found, missing = module_chain(adapter.format, lambda k: None).match(modules, shapes)
        ref_found, ref_missing = resolve._targets(adapter, adapter.updates, shapes, lambda k: None, None)
        assert found == ref_found and sorted(missing) == sorted(ref_missing) == ["lora_unet_not_a_layer"]
        assert len(found) == len(linear_layers)


def test_dtype_on_a_pipeline_converts_the_merged_components_and_says_which_are_copied(
        unet, linear_layers, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """docs/cli.md promised every float tensor converted; in a pipeline the untouched components (the VAE, whose
    float16 overflows in SDXL) are copied as they are, and now a note names them."""
    from lorafuse.cli import main

    _, _, pipe, adapters = _inputs(tmp_path, unet, linear_layers)
    vae = {"decoder.conv_in.weight": torch.ones(4, 4, 3, 3)}
    (pipe / "vae").mkdir()
    save_file(vae, str(pipe / "vae" / WEIGHTS))
    (pipe / "vae" / "config.json").write_text('{"marker": "vae"}')
    index = json.loads((pipe / "model_index.json").read_text())
    (pipe / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    out = tmp_path / "out"
    assert main(["apply", str(pipe), str(adapters[0]), "-o", str(out), "--dtype", "fp16"]) == 0
    shown = capsys.readouterr()
    assert "dtype F16 applies to the merged unet; vae copied as it is" in shown.out + shown.err
    with safe_open(str(out / "unet" / WEIGHTS), "np") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype(np.float16)}
    assert (out / "vae" / WEIGHTS).read_bytes() == (pipe / "vae" / WEIGHTS).read_bytes()

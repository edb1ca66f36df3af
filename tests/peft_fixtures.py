"""Tiny real-PEFT reference cases for the lorafuse tests.

Every builder makes a tiny random model, saves it like a user would, wraps a
reloaded copy with real PEFT LoRA, gives all adapter tensors non-trivial random
values, saves the adapter with ``PeftModel.save_pretrained`` and records what
``merge_and_unload`` produces. Plain helpers; conftest wraps them in fixtures.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.utils import ModulesToSaveWrapper
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


@dataclass
class Case:
    base_dir: Path  # config.json + model.safetensors (or shards + index)
    adapter_dir: Path  # adapter_config.json + adapter_model.safetensors
    merged_state: dict[str, np.ndarray]  # float32, keys as in the base checkpoint
    peft_model: PeftModel  # unmerged, eval mode
    input_ids: torch.Tensor | None  # (2, 8) int64, for LMs
    model_cls: Any  # has .from_pretrained(directory) -> nn.Module
    example_input: torch.Tensor | None = None  # for non-LM models
    # config of the merged transformers model (None otherwise); merge_and_unload
    # flips tie_word_embeddings to False when it unties lm_head (modules_to_save)
    merged_config: dict[str, Any] | None = None
    # False when PEFT's own merged model does not reproduce the unmerged
    # forward, i.e. tied embeddings with lm_head/embed_tokens targeted: the
    # merge writes the delta into the one shared tensor, the forward does not.
    merge_matches_forward: bool = True


class ConvNet(nn.Module):
    """Custom (non-transformers) model: 1x1 conv, kxk conv, linear head."""

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=1)
        self.conv2 = nn.Conv2d(8, 8, kernel_size=kernel_size, padding=kernel_size // 2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ConvNet:
        state = load_file(str(Path(directory) / "model.safetensors"))
        model = cls(kernel_size=state["conv2.weight"].shape[-1])
        model.load_state_dict(state)
        return model.eval()


def another_adapter(case: Case, folder: Path, *, rank: int = 2, alpha: float = 6, seed: int = 12) -> Path:
    """Another adapter for the case's base at `folder` (created): the same modules and config, new random
    factors of `rank` (N(0, 0.01)), lora_alpha `alpha`."""
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    folder.mkdir()
    cfg = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    cfg.update(r=rank, lora_alpha=alpha)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, t in load_np(str(case.adapter_dir / "adapter_model.safetensors")).items():
        shape = (rank, t.shape[1]) if ".lora_A." in key else (t.shape[0], rank)
        tensors[key] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    save_np(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def saved_keys(directory: Path) -> set[str]:
    """Tensor names stored in a (possibly sharded) safetensors checkpoint."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _input_ids(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 8), generator=gen)


@torch.no_grad()
def _randomize_adapter(peft_model: PeftModel) -> None:
    """Overwrite adapter tensors with small random values (uses the global RNG).

    ``init_lora_weights=False`` already leaves B random (nn.Linear/Conv default
    init; randn for embeddings), but the scale varies by layer type, so every
    factor is reset to ``randn * 0.1`` for comparable, well-conditioned deltas.
    """
    for name, param in peft_model.named_parameters():
        if any(f".{p}." in name for p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
            param.copy_(torch.randn(param.shape) * 0.1)  # includes lora_B bias
        elif ".lora_magnitude_vector." in name:
            # DoRA: move the magnitude away from ||W + dW|| so the rescale matters.
            param.mul_(1 + 0.1 * torch.randn(param.shape))
        elif ".modules_to_save." in name:
            param.add_(torch.randn(param.shape) * 0.05)


def _finish(
    trained: PeftModel,
    base_dir: Path,
    adapter_dir: Path,
    load_base: Callable[[], nn.Module],
    model_cls: Any,
    input_ids: torch.Tensor | None = None,
    example_input: torch.Tensor | None = None,
) -> Case:
    _randomize_adapter(trained)
    trained.save_pretrained(str(adapter_dir))

    # The reference is what a user gets from the files alone: PEFT re-resolves
    # rank/alpha patterns from adapter_config.json (keys sorted there) on load.
    peft_model = PeftModel.from_pretrained(load_base(), str(adapter_dir)).eval()
    expected = get_peft_model_state_dict(trained)
    loaded = get_peft_model_state_dict(peft_model)
    assert expected.keys() == loaded.keys(), "adapter did not round-trip"
    for key, value in expected.items():
        assert torch.equal(value, loaded[key]), f"adapter tensor {key} did not round-trip"

    tuner = peft_model.base_model
    targeted = list(tuner.targeted_module_names)
    assert targeted, "no module was targeted"
    before: dict[str, torch.Tensor] = {}
    for name in targeted:
        layer = tuner.model.get_submodule(name).get_base_layer()
        before[f"{name}.weight"] = layer.weight.detach().float().clone()
        if peft_model.peft_config["default"].lora_bias:
            before[f"{name}.bias"] = layer.bias.detach().float().clone()
    saved_modules = [(n, m) for n, m in tuner.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    merged = copy.deepcopy(peft_model).merge_and_unload()
    sd = merged.state_dict()

    # Every targeted weight (and lora bias) and every modules_to_save copy must differ from the base.
    for key, old in before.items():
        assert not torch.allclose(sd[key].float(), old), f"merge left {key} unchanged"
    for name, wrapper in saved_modules:
        for pname, orig in wrapper.original_module.named_parameters():
            new = merged.get_submodule(name).get_parameter(pname)
            assert not torch.equal(new.float(), orig.float()), f"modules_to_save {name}.{pname} equals base"

    # Keys as in the saved base checkpoint; drop only tied aliases that
    # transformers does not store (e.g. lm_head.weight when tied).
    on_disk = saved_keys(base_dir)
    missing = on_disk - sd.keys()
    assert not missing, f"merged model lacks base keys {sorted(missing)}"
    kept_ptrs = {sd[k].data_ptr() for k in on_disk}
    merged_state: dict[str, np.ndarray] = {}
    for key, tensor in sd.items():
        if key not in on_disk and tensor.data_ptr() in kept_ptrs:
            continue
        merged_state[key] = tensor.detach().float().numpy().copy()

    config = getattr(merged, "config", None)
    merged_config = config.to_dict() if hasattr(config, "to_dict") else None
    with torch.no_grad():
        x = input_ids if input_ids is not None else example_input
        ref, out = peft_model(x), merged.eval()(x)
        if input_ids is not None:
            ref, out = ref.logits, out.logits
        atol = 1e-4 if out.dtype == torch.float32 else 5e-2
        matches = torch.allclose(out.float(), ref.float(), rtol=0, atol=atol)
    return Case(
        base_dir,
        adapter_dir,
        merged_state,
        peft_model,
        input_ids,
        model_cls,
        example_input=example_input,
        merged_config=merged_config,
        merge_matches_forward=matches,
    )


def _dirs(tmp: Path) -> tuple[Path, Path]:
    base_dir, adapter_dir = Path(tmp) / "base", Path(tmp) / "adapter"
    base_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    return base_dir, adapter_dir


def llama_case(
    tmp: Path,
    *,
    seed: int = 0,
    target_modules: Sequence[str] = LLAMA_TARGETS,
    r: int = 4,
    lora_alpha: int = 8,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    use_dora: bool = False,
    lora_bias: bool = False,
    modules_to_save: Sequence[str] | None = None,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> Case:
    torch.manual_seed(seed)
    base_dir, adapter_dir = _dirs(tmp)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
        # lora_bias needs a base bias to merge into
        attention_bias=lora_bias,
        mlp_bias=lora_bias,
    )
    model = LlamaForCausalLM(config).to(dtype)
    if lora_bias:  # HF zero-inits biases; make them non-trivial
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape) * 0.02)
    # transformers 5 always writes safetensors (no safe_serialization arg).
    shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(base_dir), **shard)

    def load_base() -> nn.Module:
        return LlamaForCausalLM.from_pretrained(str(base_dir), dtype=dtype)

    lora = LoraConfig(
        task_type="CAUSAL_LM",
        target_modules=list(target_modules),
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_dora=use_dora,
        lora_bias=lora_bias,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        init_lora_weights=False,
    )
    # A loaded base makes adapter_config.json record base_model_name_or_path.
    trained = get_peft_model(load_base(), lora)
    return _finish(trained, base_dir, adapter_dir, load_base, LlamaForCausalLM, input_ids=_input_ids(seed))


def gpt2_case(
    tmp: Path,
    *,
    seed: int = 0,
    target_modules: Sequence[str] = GPT2_TARGETS,
    r: int = 4,
    lora_alpha: int = 8,
    use_rslora: bool = False,
    use_dora: bool = False,
    lora_bias: bool = False,
    modules_to_save: Sequence[str] | None = None,
) -> Case:
    torch.manual_seed(seed)
    base_dir, adapter_dir = _dirs(tmp)
    config = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    GPT2LMHeadModel(config).save_pretrained(str(base_dir))  # tied: lm_head.weight not stored

    def load_base() -> nn.Module:
        return GPT2LMHeadModel.from_pretrained(str(base_dir), dtype=torch.float32)

    lora = LoraConfig(
        task_type="CAUSAL_LM",
        target_modules=list(target_modules),
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        use_dora=use_dora,
        lora_bias=lora_bias,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        fan_in_fan_out=True,  # Conv1D stores weight as (in, out)
        init_lora_weights=False,
    )
    trained = get_peft_model(load_base(), lora)
    return _finish(trained, base_dir, adapter_dir, load_base, GPT2LMHeadModel, input_ids=_input_ids(seed))


def conv_case(
    tmp: Path,
    *,
    seed: int = 0,
    use_dora: bool = False,
    kernel_size: int = 3,
    r: int = 4,
    lora_alpha: int = 8,
    lora_bias: bool = False,
) -> Case:
    torch.manual_seed(seed)
    base_dir, adapter_dir = _dirs(tmp)
    model = ConvNet(kernel_size).eval()
    save_file(model.state_dict(), str(base_dir / "model.safetensors"))
    (base_dir / "config.json").write_text("{}")

    def load_base() -> nn.Module:
        return ConvNet.from_pretrained(base_dir)

    lora = LoraConfig(
        target_modules=["conv1", "conv2", "fc"],
        r=r,
        lora_alpha=lora_alpha,
        use_dora=use_dora,
        lora_bias=lora_bias,
        init_lora_weights=False,
    )
    trained = get_peft_model(load_base(), lora)
    example = torch.randn((2, 3, 6, 6), generator=torch.Generator().manual_seed(seed))
    return _finish(trained, base_dir, adapter_dir, load_base, ConvNet, example_input=example)


def extra_adapter(
    case: Case,
    tmp: Path,
    *,
    seed: int,
    target_modules: Sequence[str] = LLAMA_TARGETS,
    r: int = 4,
    lora_alpha: int = 8,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    fan_in_fan_out: bool = False,
) -> Path:
    """Another real-PEFT adapter on `case`'s saved base (same model class), saved to `tmp`."""
    torch.manual_seed(seed)
    model = case.model_cls.from_pretrained(str(case.base_dir))
    lora = LoraConfig(
        task_type="CAUSAL_LM" if case.input_ids is not None else None,
        target_modules=list(target_modules),
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lora)
    _randomize_adapter(peft_model)
    tmp.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(tmp))
    return tmp


def peft_weighted_deltas(
    base_dir: Path,
    model_cls: Any,
    adapter_dirs: Sequence[Path],
    weights: Sequence[float],
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Run the real `add_weighted_adapter` and return the combined adapter's dense delta per module
    (float64, in the base weight's layout), keyed by module name."""
    model = model_cls.from_pretrained(str(base_dir))
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    peft_model = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], adapter_dirs[1:]):
        peft_model.load_adapter(str(d), adapter_name=name)
    peft_model.add_weighted_adapter(names, list(weights), "combined", **kwargs)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for module_name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and "combined" in getattr(module, "scaling", {}):
                out[module_name] = module.get_delta_weight("combined").double().numpy()
    return out


def peft_folder_delta(folder: Path, module: str) -> np.ndarray:
    """(lora_alpha / r) B A of one module of a PEFT folder lorafuse wrote, float64 (its rank_pattern /
    alpha_pattern read as their exact-name keys)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = load_file(str(folder / "adapter_model.safetensors"))
    a = t[f"base_model.model.{module}.lora_A.weight"].double().numpy()
    b = t[f"base_model.model.{module}.lora_B.weight"].double().numpy()
    key = "^" + module.replace(".", "\\.")
    r = cfg.get("rank_pattern", {}).get(key, cfg["r"])
    alpha = cfg.get("alpha_pattern", {}).get(key, cfg["lora_alpha"])
    return alpha / r * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))


def peft_saved_adapter(tmp: Path, load: Callable[[], nn.Module], config: LoraConfig, name: str = "adapter") -> Path:
    """A real PEFT adapter of the model `load()` makes, its factors random and non-zero (seed 1), saved by PEFT."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load(), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape) * 0.2)
    out = tmp / name
    model.save_pretrained(str(out))
    return out


def peft_merged_state(load: Callable[[], nn.Module], adapter: Path,
                      dtype: torch.dtype = torch.float64) -> dict[str, np.ndarray]:
    """The state dict of PeftModel.from_pretrained(load(), adapter).merge_and_unload(), as numpy arrays of `dtype`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(load(), str(adapter)).merge_and_unload()
    return {k: v.detach().to(dtype).numpy().copy() for k, v in merged.state_dict().items()}


class TinyAttention(nn.Module):
    """A torch.nn.MultiheadAttention (embed 8, 2 heads) and a Linear, for PEFT's LoRA on MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 4)


def tiny_attention_base(tmp: Path) -> tuple[Path, Callable[[], TinyAttention]]:
    """A TinyAttention (seed 0) saved as tmp/base (model.safetensors, an empty config.json), and a loader of it."""
    torch.manual_seed(0)
    base = tmp / "base"
    base.mkdir()
    save_file(TinyAttention().state_dict(), str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")

    def load() -> TinyAttention:
        model = TinyAttention()
        model.load_state_dict(load_file(str(base / "model.safetensors")))
        return model

    return base, load

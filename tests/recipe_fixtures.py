"""Small PEFT adapters for recipe tests (test_recipes.py, test_new_features_hostile.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PREFIX = "base_model.model."
MODULES = {"model.layers.0.self_attn.q_proj": (48, 32), "model.layers.0.mlp.down_proj": (32, 64)}


def make_adapter(root: Path, name: str, rank: int, alpha: float, seed: int) -> Path:
    g = np.random.default_rng(seed)
    p = root / name
    p.mkdir(parents=True)
    tensors = {}
    for m, (o, i) in MODULES.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"] = g.standard_normal((rank, i)).astype(np.float32)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = g.standard_normal((o, rank)).astype(np.float32)
    save_file(tensors, str(p / "adapter_model.safetensors"))
    (p / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "down_proj"],
        "base_model_name_or_path": "tiny-base"}))
    return p

"""Mends the lead made in red-team round 5's session (each test failed before its mend)."""
from __future__ import annotations

import numpy as np

import lorafuse
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, LoraUpdate
from lorafuse.ops.plan import plan_resize


def _lora(name: str, rank: int, rng: np.random.Generator) -> LoraUpdate:
    return LoraUpdate(name, Tensor.from_array(rng.standard_normal((rank, 6)).astype(np.float32)),
                      Tensor.from_array(rng.standard_normal((8, rank)).astype(np.float32)), 1.0)


def test_plan_resize_gives_moe_experts_the_rank_resize_writes() -> None:
    """resize pads the experts PEFT stacks to one rank (the largest among them); its --dry-run plan said each
    expert's own (expert 0 at rank 1 where resize wrote 2)."""
    rng = np.random.default_rng(0)
    updates = {f"model.layers.0.block_sparse_moe.experts.{e}.{p}": _lora(
        f"model.layers.0.block_sparse_moe.experts.{e}.{p}", r, rng) for e, r in ((0, 1), (1, 3)) for p in ("w1", "w3")}
    updates["model.layers.0.self_attn.q_proj"] = _lora("model.layers.0.self_attn.q_proj", 4, rng)
    adapter = Adapter(updates, config={"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "w1", "w3"]})
    done = {m.name: m.rank_out for m in lorafuse.resize(adapter, rank=2).modules}
    planned = {m.name: m.rank for m in plan_resize(adapter, rank=2).modules}
    assert planned == done
    assert done["model.layers.0.block_sparse_moe.experts.0.w1"] == 2  # padded, as PEFT needs one expert rank

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


def test_plan_resize_pads_loha_experts_as_resize_does() -> None:
    """A LoHa expert becomes a LoRA in resize and is padded with the others; the plan gave it its own rank."""
    from lorafuse.model.lycoris import LycorisUpdate

    rng = np.random.default_rng(1)

    def loha(name: str, rank: int) -> LycorisUpdate:
        t = {k: Tensor.from_array(rng.standard_normal(s).astype(np.float32)) for k, s in
             (("hada_w1_a", (8, rank)), ("hada_w1_b", (rank, 6)), ("hada_w2_a", (8, rank)), ("hada_w2_b", (rank, 6)))}
        return LycorisUpdate(name, "loha", "linear", (8, 6), 1.0, t)

    owner = "model.layers.0.block_sparse_moe.experts"
    updates = {f"{owner}.0.w1": _lora(f"{owner}.0.w1", 4, rng), f"{owner}.1.w1": loha(f"{owner}.1.w1", 1)}
    adapter = Adapter(updates, config={"r": 4, "lora_alpha": 4, "target_modules": ["w1"]})
    done = {m.name: m.rank_out for m in lorafuse.resize(adapter, rank=3).modules}
    planned = {m.name: m.rank for m in plan_resize(adapter, rank=3).modules}
    assert planned == done == {f"{owner}.0.w1": 3, f"{owner}.1.w1": 3}

"""Share knowledge: N LoRAs trained apart on N tasks, pooled into one adapter with lorafuse.

    python examples/share_knowledge.py                       # 4 tasks, rank 4: ~15 s on 2 cores
    python examples/share_knowledge.py --tasks 8 --plot share.png

What it does
------------
1. A tiny Llama (hidden 128, 2 layers, 4 heads; random init from `--seed`) is saved as a base checkpoint
   and stays frozen.
2. N tasks, each its own piece of "knowledge": task k owns a block of the vocabulary and a fixed random
   permutation of it; its sequences walk the permutation (x[t+1] = perm_k(x[t])), so a model that has
   learnt the task predicts every next token exactly. The blocks are disjoint: the tasks read and write
   different tokens, so their updates live in (nearly) different directions of the weights.
3. One LoRA per task (real PEFT, rank `--rank` on every projection), trained for `--steps` steps, as if
   by N users or N federated clients that never see each other's data.
4. The N adapters are pooled with `lorafuse.combine`, several ways:
   * `exact`  -- method 'cat': the delta sum_i w_i B_i A_i itself, rank N*r (the ranks add up);
   * `svd r`, `svd 2r` -- method 'svd': the best rank-k approximation of that sum (k = r, 2r), i.e. a
     pooled adapter no bigger than one (or two) of the inputs (FlexLoRA, FedEx-LoRA: sum, then truncate);
   * `linear` -- PEFT's 'linear', factor averaging (FedIT / FedAvg on the factors): A = sum_i sqrt(c_i) A_i,
     B = sum_i sqrt(c_i) B_i with c_i = w_i s_i, rank r. Its product has the cross terms B_i A_j (i != j): noise that
     belongs to no task.
   Each pooled adapter is merged into the base with `lorafuse.apply` (the same merge that ships models)
   and the merged checkpoint is loaded back with transformers.
5. Every task's loss is measured on held-out sequences with the base, its own adapter and each pooled
   adapter. The table prints the losses and the share of the task's improvement the pooled model keeps,
   (base - pooled) / (base - own): 100% means the pooled model does the task as well as its own adapter.

Weights: sum or mean
--------------------
`--weights sum` pools with weight 1 per adapter: the pooled delta is the sum of the N deltas, so every
task's update arrives intact, plus the other tasks' updates; the tasks here touch (nearly) disjoint
directions, so those hardly disturb it, and the exact pool keeps nearly all of every improvement.
`--weights mean` (1/N each, what federated averaging does) shrinks each task's update N times: the
pooled model knows every task a little, and keeps a fraction of each improvement even when the pool is
exact. The default (`both`) prints the two one above the other. With the defaults (4 tasks, rank 4, 100
steps, seed 0) the exact sum keeps about 94-98% of each task's improvement, the exact mean 71-79%; svd at
rank 2r / r keeps about 91-95% / 71-90% with the sum; factor averaging (`linear`) keeps 60-67% with the mean
and 31-50% with the sum (torch's version moves these by a point or so), where its cross terms B_i A_j come at full strength. So: averaging is right when the
clients learn the same thing (the mean of N estimates of one update), the sum when they learn different
things; and the sum of N rank-r updates in different directions has rank N*r, so a pool cut to rank r
keeps roughly the directions of the tasks whose updates are largest.

Training 4x longer (`--steps 400`, own losses ~0.001) changes little: sum 96-98%, mean 75-80%.

The run prints its wall time; `--plot out.png` draws the kept shares (needs matplotlib: the `[plot]`
extra). Everything is written under `--out` (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import lorafuse

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = 16  # tokens per task
SEQ_LEN = 16
BATCH = 32
EVAL_SEQS = 256
LR = 3e-3
HIDDEN = 128  # with 16 tokens per task, the tasks' embeddings span nearly orthogonal subspaces
INIT_STD = 0.14  # lm_head rows of norm ~1.6: the frozen head can express confident predictions


@dataclass
class Result:
    """One model's loss on every task."""

    name: str
    losses: list[float]
    kept: list[float] = field(default_factory=list)  # (base - this) / (base - own), per task


def make_base(tasks: int, seed: int) -> LlamaForCausalLM:
    """The tiny frozen base: random init from `seed`, vocabulary wide enough for one block per task."""
    config = LlamaConfig(vocab_size=max(64, BLOCK * tasks), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, initializer_range=INIT_STD, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def permutations(tasks: int, seed: int) -> list[torch.Tensor]:
    """perm[k][v] is the token that follows token v in task k (v in task k's block)."""
    g = torch.Generator().manual_seed(seed + 1)
    vocab = max(64, BLOCK * tasks)
    perms = []
    for k in range(tasks):
        table = torch.arange(vocab)
        block = torch.arange(k * BLOCK, (k + 1) * BLOCK)
        table[block] = block[torch.randperm(BLOCK, generator=g)]
        perms.append(table)
    return perms


def sequences(perm: torch.Tensor, task: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n sequences of task `task`: a random start in its block, then the walk along the permutation."""
    x = torch.empty(n, SEQ_LEN, dtype=torch.long)
    x[:, 0] = task * BLOCK + torch.randint(0, BLOCK, (n,), generator=g)
    for t in range(1, SEQ_LEN):
        x[:, t] = perm[x[:, t - 1]]
    return x


@torch.no_grad()
def loss_of(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) over every position after the first."""
    return float(model(input_ids=batch, labels=batch).loss)


def train_adapter(base_dir: Path, perm: torch.Tensor, task: int, rank: int, steps: int, seed: int,
                  out: Path, held_out: torch.Tensor) -> float:
    """Train task `task`'s LoRA with PEFT on a fresh copy of the frozen base and save it under `out`.
    Returns its loss on the task's held-out batch, measured in PEFT (unmerged)."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed + 100 + task)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1000 + task)
    peft_model.train()
    for _ in range(steps):
        batch = sequences(perm, task, BATCH, g)
        loss = peft_model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(str(out))
    return loss_of(peft_model, held_out)


def merged_losses(base_dir: Path, adapter: str | Path | lorafuse.Adapter, work: Path,
                  evals: Sequence[torch.Tensor]) -> list[float]:
    """Merge `adapter` into the base with lorafuse.apply, load the result, measure every task."""
    if work.exists():
        shutil.rmtree(work)
    lorafuse.apply(base_dir, [adapter], out=work, progress=False)
    model = LlamaForCausalLM.from_pretrained(work)
    model.eval()
    losses = [loss_of(model, batch) for batch in evals]
    shutil.rmtree(work)
    return losses


def pools(tasks: int, rank: int, weighting: str) -> list[tuple[str, dict[str, object]]]:
    """(label, lorafuse.combine keyword arguments) of each pooled adapter."""
    ranks = [2 * rank, rank] if 2 < tasks else [rank]  # with 2 tasks, rank 2r is the exact pool itself
    cat: list[tuple[str, dict[str, object]]] = [(f"exact ({weighting}, rank {tasks * rank})", {"method": "cat"})]
    return (cat + [(f"svd r={k} ({weighting})", {"method": "svd", "rank": k, "exact": True}) for k in ranks]
                  + [(f"linear ({weighting}, rank {rank})", {"method": "linear"})])


def table(results: Sequence[Result], tasks: int) -> str:
    """The losses, then the mean kept share, one row per model."""
    width = max(len(r.name) for r in results) + 2
    head = "".join(f"{'task ' + str(k):>9}" for k in range(tasks))
    lines = [f"{'model':<{width}}{head}   {'kept (mean, min)':>16}"]
    for r in results:
        cells = "".join(f"{v:9.3f}" for v in r.losses)
        kept = f"{100 * np.mean(r.kept):6.1f}% {100 * np.min(r.kept):6.1f}%" if r.kept else ""
        lines.append(f"{r.name:<{width}}{cells}   {kept:>16}")
    return "\n".join(lines)


def plot(results: Sequence[Result], tasks: int, path: Path) -> None:
    """Grouped bars: the share of each task's improvement every pooled model keeps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'lorafuse[plot]'", file=sys.stderr)
        return
    pooled = [r for r in results if r.kept]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * tasks + 4), 4))
    width = 0.8 / len(pooled)
    for i, r in enumerate(pooled):
        xs = np.arange(tasks) + (i - (len(pooled) - 1) / 2) * width
        ax.bar(xs, [100 * v for v in r.kept], width, label=r.name)
    ax.axhline(100, color="black", lw=0.8)
    ax.set_xticks(np.arange(tasks), [f"task {k}" for k in range(tasks)])
    ax.set_ylabel("improvement kept (%)")
    ax.set_title("(base loss - pooled loss) / (base loss - own adapter's loss)")
    low = min(0.0, min(100 * min(r.kept) for r in pooled) - 5)
    ax.set_ylim(low, 100 + 12 * math.ceil(len(pooled) / 4) + 5)  # room for the legend above the bars
    ax.legend(fontsize=7, ncols=4, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def run(tasks: int = 4, rank: int = 4, steps: int = 100, seed: int = 0, out: Path | None = None,
        weights: str = "both", plot_path: Path | None = None, quiet: bool = False) -> list[Result]:
    """The whole demonstration under `out` (a temporary folder when None); returns the rows of the table:
    'base', 'own adapter', then one per pooled adapter (losses per task, kept shares)."""
    start = time.perf_counter()
    temp = out is None
    root = Path(tempfile.mkdtemp(prefix="share_knowledge_")) if out is None else Path(out)
    root.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else print
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # a model this small runs fastest on one thread (~15 ms a training step)
        base_dir = root / "base"
        make_base(tasks, seed).save_pretrained(base_dir)
        perms = permutations(tasks, seed)
        g = torch.Generator().manual_seed(seed + 7)
        evals = [sequences(perms[k], k, EVAL_SEQS, g) for k in range(tasks)]

        base = LlamaForCausalLM.from_pretrained(base_dir)
        results = [Result("base", [loss_of(base, b) for b in evals])]
        adapters: list[Path] = []
        peft_losses: list[float] = []
        for k in range(tasks):
            t0 = time.perf_counter()
            adapter_dir = root / f"task{k}"
            peft_loss = train_adapter(base_dir, perms[k], k, rank, steps, seed, adapter_dir, evals[k])
            adapters.append(adapter_dir)
            peft_losses.append(peft_loss)
            say(f"trained task {k}'s adapter ({steps} steps, {time.perf_counter() - t0:.1f} s)")
        own = [merged_losses(base_dir, adapters[k], root / "merged", evals)[k] for k in range(tasks)]
        results.append(Result("own adapter", own))
        # the merge lorafuse.apply made computes what PEFT computed with the adapter unmerged
        drift = max(abs(a - b) for a, b in zip(own, peft_losses))
        if drift > 1e-3:
            raise RuntimeError(f"merged adapters' losses {own} differ from PEFT's {peft_losses}")

        weightings = ["sum", "mean"] if weights == "both" else [weights]
        for weighting in weightings:
            w = [1.0] * tasks if weighting == "sum" else [1.0 / tasks] * tasks
            for label, kwargs in pools(tasks, rank, weighting):
                pooled = lorafuse.combine(adapters, w, **kwargs)  # type: ignore[arg-type]
                results.append(Result(label, merged_losses(base_dir, pooled, root / "merged", evals)))

        b = results[0].losses
        for r in results[2:]:
            r.kept = [(b[k] - r.losses[k]) / (b[k] - own[k]) for k in range(tasks)]
        say("")
        say(f"next-token loss (nats) of each model on each task's held-out sequences; {tasks} tasks, "
            f"LoRA rank {rank}, {steps} steps each; uniform guessing inside a task's block: {math.log(BLOCK):.3f}")
        say(table(results, tasks))
        if plot_path is not None:
            plot(results, tasks, plot_path)
        say(f"time: {time.perf_counter() - start:.1f} s")
        return results
    finally:
        torch.set_num_threads(threads)
        if temp:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=4, help="number of tasks / adapters (default 4)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of each adapter (default 4)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per adapter (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base, the tasks and the training")
    parser.add_argument("--weights", choices=["sum", "mean", "both"], default="both",
                        help="pool with weight 1 per adapter (sum), 1/N (mean) or show both (default)")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--plot", type=Path, default=None, help="draw the kept shares into this image")
    args = parser.parse_args(argv)
    if args.tasks < 2 or args.rank < 1 or args.steps < 1:
        parser.error("--tasks must be >= 2, --rank and --steps >= 1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return run(args.tasks, args.rank, args.steps, args.seed, args.out, args.weights, args.plot)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # transformers' own
    main()

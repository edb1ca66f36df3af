"""The `lorafuse` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lorafuse import __version__
from lorafuse._progress import human_bytes
from lorafuse.errors import LorafuseError, LorafuseValueError

_EPILOG_APPLY = """\
examples:
  lorafuse apply ./Llama-3.2-1B ./my-lora -o ./merged
  lorafuse apply ./base ./style ./subject --weights 1,0.5 --dtype bf16 -o ./merged
  lorafuse apply ./base ./lora --max-shard-size 2GB -o ./merged

Equals PEFT's merge_and_unload() + save_pretrained(): W' = W + sum_i w_i * s_i * B_i A_i,
s_i = lora_alpha / r (or / sqrt(r) with rslora), computed in float32 and rounded once.
DoRA adapters rescale each output row to the learned magnitude. Non-weight files
(config.json, tokenizer files, ...) are copied. The output appears only when
complete; an output path that is an input is refused.
"""


_EPILOG_COMBINE = """\
methods (c_i = w_i * s_i; every output has scale 1):
  svd (default)        best rank-k of sum_i c_i B_i A_i, exactly, from QR of the stacked factors
  cat                  exact: B' = [B_1 .. B_n], A' = [c_1 A_1; ..; c_n A_n] (rank = sum of ranks)
  linear               PEFT: A and B stacks merged separately with sqrt|c_i| weights (approximate)
  ties, dare_linear, dare_ties, magnitude_prune
                       PEFT's factor-wise versions (--density; equal ranks)
  ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                       PEFT's merge of the dense deltas, then rank k (--density)

examples:
  lorafuse combine style subject --weights 1,0.5 --rank 32 -o mixed
  lorafuse combine a b c --method ties_svd --density 0.3 --rank 16 -o merged
  lorafuse combine a b --method dare_linear --density 0.5 --seed 7 -o dare
"""


def _weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be comma-separated numbers, got {text!r}") from None


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threads must be an integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("threads must be >= 0 (0 means all cores)")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafuse",
        description="Compose LoRA adapters over safetensors files: exact, fast, streaming.",
    )
    p.add_argument("--version", action="version", version=f"lorafuse {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("apply", help="merge adapters into base weights", description="Merge LoRA adapters into a "
                       "base checkpoint and write a new checkpoint.", epilog=_EPILOG_APPLY,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("base", help="base checkpoint: a folder (model.safetensors or sharded with an index) or one "
                   ".safetensors file")
    a.add_argument("adapters", nargs="+", help="adapter folders (PEFT: adapter_config.json + adapter_model.safetensors)")
    a.add_argument("-o", "--out", required=True, help="output folder (a file when the base is a file)")
    a.add_argument("--weights", type=_weights, help="comma-separated weight per adapter (default 1 each)")
    a.add_argument("--dtype", help="output dtype of float tensors: bf16, fp16 or fp32 (default: as in the base)")
    a.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")
    a.add_argument("--max-shard-size", help="re-shard the output, e.g. 5GB or 2GiB (default: shards as the input)")
    a.add_argument("--allow-nonfinite", action="store_true", help="write NaN/Inf results instead of failing")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    c = sub.add_parser("combine", help="combine adapters into one adapter",
                       description="Combine LoRA adapters into one adapter (PEFT's add_weighted_adapter, method "
                       "for method; the svd method is exact and needs no dense matrix).",
                       epilog=_EPILOG_COMBINE, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("adapters", nargs="+", help="adapter folders (PEFT)")
    c.add_argument("-o", "--out", required=True, help="output adapter folder (PEFT format)")
    c.add_argument("--weights", type=_weights, help="comma-separated weight per adapter (default 1 each)")
    c.add_argument("--method", default="svd", help="combination method (default svd; see below)")
    c.add_argument("--rank", type=int, help="output rank of the svd methods (default: the largest input rank)")
    c.add_argument("--density", type=float, help="fraction of values kept by ties / dare / magnitude_prune")
    c.add_argument("--majority-sign", default="total", choices=("total", "frequency"),
                   help="ties: majority sign from the sum (total) or the count (frequency) of signs")
    c.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default 0)")
    c.add_argument("--split", default="B", choices=("B", "sqrt"),
                   help="where svd puts the singular values: on B like PEFT, or sqrt on both factors")
    c.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    s = sub.add_parser("similarity", help="cosine similarity of adapters' deltas",
                       description="Exact cosine similarity of the adapters' deltas (all modules together), "
                       "computed from the factors without forming any dense matrix.")
    s.add_argument("adapters", nargs="+", help="adapter folders (PEFT)")
    s.add_argument("--json", action="store_true", help="print JSON for machines")
    s.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")

    i = sub.add_parser("info", help="describe an adapter or a checkpoint",
                       description="Describe a PEFT adapter (modules, ranks, alphas, scales, dtypes, parameters, "
                       "exact ||delta||_F per module from the factors) or a safetensors checkpoint.")
    i.add_argument("path", help="adapter folder, checkpoint folder or .safetensors file")
    i.add_argument("--json", action="store_true", help="print JSON for machines")
    i.add_argument("--modules", action="store_true", help="list every module (default: a summary)")
    i.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")
    return p


def _cmd_apply(args: argparse.Namespace) -> int:
    from lorafuse.ops.apply import apply

    report = apply(args.base, args.adapters, args.weights, args.out, dtype=args.dtype, threads=args.threads,
                   max_shard_size=args.max_shard_size, progress=False if args.no_progress else None,
                   allow_nonfinite=args.allow_nonfinite)
    if not args.quiet:
        for note in report.notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"merged {len(report.merged)} weights"
              + (f", replaced {len(report.replaced)}" if report.replaced else "")
              + (f", updated {len(report.biases)} biases" if report.biases else "")
              + f"; wrote {report.tensors} tensors ({human_bytes(report.bytes_written)}) to {report.out} "
              f"in {report.seconds:.2f} s")
    return 0


def _cmd_combine(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from lorafuse.formats.peft import save_peft
    from lorafuse.ops.combine import combine

    start = time.monotonic()
    result = combine(args.adapters, args.weights, method=args.method, rank=args.rank, density=args.density,
                     majority_sign=args.majority_sign, seed=args.seed, split=args.split, threads=args.threads)
    save_peft(result, args.out, [Path(a) for a in args.adapters])
    if not args.quiet:
        ranks = sorted({u.rank for u in result.updates.values()})
        print(f"combined {len(args.adapters)} adapters with {args.method}: {len(result)} modules, "
              f"rank {'/'.join(map(str, ranks))}; wrote {args.out} in {time.monotonic() - start:.2f} s")
    return 0


def _cmd_similarity(args: argparse.Namespace) -> int:
    from lorafuse.ops.similarity import similarity

    cos = similarity(args.adapters, args.threads)
    if args.json:
        print(json.dumps({"adapters": args.adapters, "cosine": cos.round(8).tolist()}, indent=2))
        return 0
    labels = [str(a) for a in args.adapters]
    width = max(len(x) for x in labels)
    print(" " * width + "  " + " ".join(f"{i:>8d}" for i in range(len(labels))))
    for i, (label, row) in enumerate(zip(labels, cos)):
        print(f"{label:<{width}}  " + " ".join(f"{v:8.4f}" for v in row) + f"   [{i}]")
    return 0


def _print_info(d: dict[str, object], modules: bool) -> None:
    if d["type"] == "checkpoint":
        print(f"checkpoint  {d['path']}")
        print(f"  shards      {len(d['shards'])}{' (indexed)' if d['sharded'] else ''}")  # type: ignore[arg-type]
        print(f"  tensors     {d['tensors']}")
        print(f"  parameters  {d['parameters']:,}")
        print(f"  size        {human_bytes(d['bytes'])}")  # type: ignore[arg-type]
        print(f"  dtypes      {', '.join(f'{k}: {v}' for k, v in d['dtypes'].items())}")  # type: ignore[union-attr]
        return
    print(f"adapter     {d['path']}  ({d['format']})")
    print(f"  modules     {d['modules']}")
    print(f"  ranks       {', '.join(f'r={k}: {v}' for k, v in d['ranks'].items())}")  # type: ignore[union-attr]
    print(f"  lora_alpha  {d['lora_alpha']}{'  (rslora)' if d['use_rslora'] else ''}")
    print(f"  scales      {', '.join(f'{s:g}' for s in d['scales'])}")  # type: ignore[union-attr]
    print(f"  dtypes      {', '.join(f'{k}: {v}' for k, v in d['dtypes'].items())}")  # type: ignore[union-attr]
    print(f"  parameters  {d['parameters']:,}")
    if d["dora"]:
        print("  DoRA        yes")
    if d["full_tensors"]:
        print(f"  full tensors (modules_to_save): {', '.join(d['full_tensors'])}")  # type: ignore[arg-type]
    details: list[dict[str, object]] = d["module_details"]  # type: ignore[assignment]
    shown = details if modules else sorted(details, key=lambda m: -float(m["delta_norm"]))[:10]  # type: ignore[arg-type]
    print("  module" + ("s" if modules else "s with the largest ||delta||_F") + ":")
    width = max((len(str(m["name"])) for m in shown), default=10)
    for m in shown:
        print(f"    {str(m['name']):<{width}}  {m['kind']:<9} r={m['rank']:<4} scale={m['scale']:<8g} "
              f"shape={tuple(m['shape'])}  ||delta||_F={m['delta_norm']:.6g}")  # type: ignore[arg-type]
    if not modules and len(details) > len(shown):
        print(f"    ... {len(details) - len(shown)} more (--modules lists all)")


def _cmd_info(args: argparse.Namespace) -> int:
    from lorafuse.ops.info import describe

    d = describe(args.path, args.threads)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        _print_info(d, args.modules)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"apply": _cmd_apply, "combine": _cmd_combine, "similarity": _cmd_similarity, "info": _cmd_info}
        return commands[args.command](args)
    except LorafuseValueError as e:
        print(f"lorafuse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except LorafuseError as e:
        print(f"lorafuse {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorafuse {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

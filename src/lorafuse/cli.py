"""The `lorafuse` command line."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from statistics import fmean
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from lorafuse._progress import human_bytes
from lorafuse._terminal import plural, printable
from lorafuse._validate import (
    MAX_OVERSAMPLE,
    MAX_PASSES,
    MAX_POWER_ITERS,
    MAX_RANK,
    MAX_SEED,
    MAX_THREADS,
    decimal_number,
    rounds_to_zero,
    split_name,
)
from lorafuse._version import get_version
from lorafuse.errors import LorafuseError, LorafuseValueError, OutputError
from lorafuse_entry import OUT_OF_MEMORY, interrupted, out_of_memory  # the console script's tests, beside the package

if TYPE_CHECKING:
    from lorafuse.ops.rank import RankRule

_EPILOG_APPLY = """\
examples:
  lorafuse apply ./Llama-3.2-1B ./my-lora -o ./merged
  lorafuse apply ./base ./style ./subject --weights 1,0.5 --dtype bf16 -o ./merged
  lorafuse apply ./base ./lora --max-shard-size 2GB -o ./merged
  lorafuse apply sd_xl_base_1.0.safetensors style.safetensors --weights 0.8 -o sdxl_style.safetensors
  lorafuse apply ./stable-diffusion-v1-5 detail.safetensors loha.safetensors -o ./sd15-merged
  lorafuse apply flux1-dev.safetensors flux_lora.safetensors --dtype bf16 -o flux1-merged.safetensors

Equals PEFT's merge_and_unload() + save_pretrained(): W' = W + sum_i w_i * s_i * B_i A_i,
s_i = lora_alpha / r (or / sqrt(r) with rslora), computed in float32 and rounded once.
DoRA adapters rescale each output row to the learned magnitude (over the norm of
the base weight plus their own delta, as PEFT does after other adapters). Non-weight files
(config.json, tokenizer files, ...) are copied. The output appears only when
complete. The output may be a new path, an empty folder or an earlier lorafuse output
of the same kind (a folder holding lorafuse_manifest.json and only the files it lists); any other
folder or file, or a lorafuse output of another kind (an adapter), is refused
(--overwrite replaces it, naming what it held); the current folder, an input, a
folder holding an input or a path inside an input folder are always refused.

Diffusion adapters (kohya LoRA / LoCon, LyCORIS LoHa / LoKr / DoRA, diffusers LoRA
files) find their weights in single-file SD 1.x / 2.x / SDXL / Flux checkpoints and in
diffusers pipeline folders (model_index.json: the touched components are merged, the
others copied) through name tables; fused weights (OpenCLIP in_proj, Flux qkv) take
their rows. Every module that finds no target is listed and nothing is written,
unless --skip-missing.
"""


_EPILOG_COMBINE = """\
examples:
  lorafuse combine style subject --weights 1,0.5 --rank 32 -o mixed
  lorafuse combine a b c --method ties_svd --density 0.3 --rank 16 -o merged
  lorafuse combine a b --method dare_linear --density 0.5 --seed 7 -o dare
  lorafuse combine style.safetensors detail.safetensors loha.safetensors --rank 32 --conv-rank 8 -o mix.safetensors
  lorafuse combine --from-list clients.txt --rank 16 --passes 3 -o pooled

Output format (--format): as the first input by default: a PEFT folder for PEFT
adapters, one kohya .safetensors file for kohya / LyCORIS files (kohya's svd_merge_lora.py),
a diffusers LoRA file for diffusers LoRA files. LoHa / LoKr inputs enter through an
exact factorization of their delta, so svd gives the optimal rank-k LoRA of the sum.

Many adapters (more than 256, --passes or --engine stream; --from-list reads them from a
file): svd and linear stream, each adapter read once per pass, memory independent of n; --passes 3
(default) is a randomized SVD with one power iteration (near-optimal), 2 leaves it out (faster,
up to 1.5x the optimal error), 1 is a single-pass sketch; the summary estimates each module's error.
"""


_RANK_RULES = """\
rank rules (exactly one; per module, capped by --max-rank, at least 1):
  --rank K            K
  --sv-ratio T        keep singular values S_i > S_1 / T
  --sv-fro F          smallest k keeping a fraction F of the Frobenius norm: sqrt(sum S_1..k^2) / ||S|| >= F
  --sv-cumulative C   smallest k with sum S_1..k / sum S >= C
"""


_EPILOG_RESIZE = _RANK_RULES + """
examples:
  lorafuse resize my-lora --rank 16 -o my-lora-r16
  lorafuse resize style.safetensors --sv-fro 0.9 --max-rank 64 -o style-small.safetensors
  lorafuse resize pytorch_lora_weights.safetensors --sv-ratio 20 -o lora-small.safetensors
"""


_EPILOG_EXTRACT = _RANK_RULES + """
examples:
  lorafuse extract ./base ./finetuned --rank 32 -o ./extracted
  lorafuse extract ./base ./finetuned --sv-fro 0.5 --max-rank 128 --exclude 'lm_head' -o ./extracted
"""


_EPILOG_SIMILARITY = """\
examples:
  lorafuse similarity ./style ./subject ./detail
  lorafuse similarity style.safetensors loha.safetensors pytorch_lora_weights.safetensors --json
  lorafuse similarity ./a ./b --plot similarity.png

Adapters that share no module have similarity 0 by construction, and an adapter whose
delta is zero has 0 everywhere (an undefined cosine); lorafuse says so (a kohya file and a
diffusers LoRA file of one model: `lorafuse convert` one of them).
"""


_EPILOG_RUN = """\
a recipe (merge.yml):
  merge_method: ties_svd          # a combine method, or apply, resize, extract
  models:
    - model: ./lora-a             # a path (from the recipe's folder) or a Hub id
      parameters: {weight: 0.6}
    - model: org/lora-b@main
      parameters: {weight: 0.4}
  parameters: {rank: 64, density: 0.5, seed: 1234}
  dtype: bfloat16

two stages (combine three adapters, then bake the result into a base):
  name: pooled
  merge_method: svd
  models: [{model: ./a}, {model: ./b}, {model: ./c}]
  parameters: {rank: 32}
  ---
  name: merged
  merge_method: apply
  base_model: ./Llama-3.2-1B
  models: [{model: pooled}]

examples:
  lorafuse run merge.yml -o ./merged-lora
  lorafuse run merge.yml -o ./merged-lora --dry-run
  lorafuse run --print-schema

Per-model parameters (weight, density) override the stage's. apply takes weight,
max_shard_size, skip_missing, requantize, allow_nonfinite; resize and extract take one
of rank, sv_ratio, sv_fro, sv_cumulative (and max_rank); combine takes what its method
takes (lorafuse combine --help). Output dtype: dtype (bfloat16, float16, float32).
"""


_EPILOG_INFO = """\
examples:
  lorafuse info ./my-lora
  lorafuse info style.safetensors --modules
  lorafuse info ./lora-folder --json
  lorafuse info ./Llama-3.2-1B
  lorafuse info ./stable-diffusion-v1-5 --json
  lorafuse info ./my-lora --spectrum spectrum.png

--json prints numbers as JSON numbers: lora_alpha (PEFT: the config's; kohya / diffusers:
the most common module alpha; null for LoHa / LoKr only) and lora_alphas (every distinct
alpha of the LoRA modules; a LoHa / LoKr module's alpha, over its own dimension, is not
listed: its scale is, under scales); a non-finite norm is null.
"""


_EPILOG_CONVERT = """\
examples:
  lorafuse convert style.safetensors --to peft -o out/pytorch_lora_weights.safetensors
  lorafuse convert pytorch_lora_weights.safetensors --to kohya -o style_kohya.safetensors
  lorafuse convert loha.safetensors --to kohya --rank 16 --conv-rank 8 -o lora_r16.safetensors
  lorafuse convert flux_lora.safetensors --to peft --family flux -o flux_diffusers.safetensors
  lorafuse convert ./my-llama-lora --to gguf --base-config ./Llama-3.2-1B/config.json -o my-lora.gguf
  lorafuse convert ./my-qwen-lora --to gguf --arch qwen2 --gguf-type q8_0 -o my-lora-q8_0.gguf

--to peft writes the diffusers LoRA file that pipe.load_lora_weights() reads (keys
<component>.<module>.lora_A.weight / .lora_B.weight; each module's alpha kept in the
file's lora_adapter_metadata). --to kohya writes kohya names (lora_unet_..., lora_te1_...).
Renaming is lossless: fused kohya modules (Flux img_attn_qkv, linear1) split into the
diffusers modules they cover (rows of lora_up, lora_down shared) and fuse back exactly,
and kohya -> peft -> kohya gives back the same bytes (alpha dtypes, metadata included).
Separate diffusers LoRAs that kohya fuses (Flux to_q, to_k, to_v) become one block-diagonal
LoRA with one alpha: where their scales differ, lora_up takes the ratios, exactly when they
are binary fractions (lora_up F32 unless they are powers of two), else rounded to float32
(lora_up F32).
The family is guessed only from names one family alone has: a diffusers Flux LoRA
(transformer.transformer_blocks...), whose names SD3, QwenImage and HunyuanVideo share,
needs --family flux. Flux.2 LoRAs use Flux.1's kohya words: their MLP widths and
Flux.2's own layers tell them apart (--family flux2); where nothing does and a module
takes another diffusers name in each (time_in, guidance_in), the family must be given.

LoHa / LoKr modules have no exact LoRA form: --rank K (and --conv-rank K for kxk
convolutions, k > 1; default --rank) keeps their best rank-K approximation (SVD of the
delta), reporting the fraction of each delta's Frobenius norm kept; their factors are
rounded once to the input's factor dtype, as resize's (a LoRA that dtype cannot hold is
refused: lorafuse resize --rank K --dtype fp32 writes it as float32 first). Plain LoRA / LoCon
modules are copied as they are: --rank does not resize them (use lorafuse resize).

--to gguf writes an LLM LoRA (a PEFT adapter of a Llama, Mistral, Qwen2, Qwen3, Gemma,
Gemma 2 or Gemma 3 model; a kohya, LyCORIS or diffusers file is refused first) as the
GGUF LoRA adapter llama.cpp loads (llama-cli -m base.gguf --lora my-lora.gguf), with
the tensor names, layout and metadata of llama.cpp's convert_lora_to_gguf.py (needs:
pip install 'lorafuse[gguf]'). The
architecture comes from --base-config (the base model's config.json, which Llama and
Mistral q_proj / k_proj LoRAs need for their head counts) or --arch. Per-module scales
that one adapter.lora.alpha cannot express (rank_pattern, alpha_pattern, rsLoRA) are
folded into lora_b, exactly. DoRA, lora_B biases, modules_to_save, convolutions,
modules llama.cpp has no tensor for, and lm_head / embedding LoRAs of a base whose
output is its token embedding (Gemma, Gemma 2, tie_word_embeddings) are refused by name.
Vision-tower / projector modules of a multimodal model are left out with a note, as
llama.cpp's converter leaves them out (llama.cpp applies --lora to the text model only).
"""


def _paragraph(text: str) -> str:
    """A command's one-paragraph description, wrapped as the others are written (their help keeps its lines as
    written: RawDescriptionHelpFormatter), so that no line of --help runs hundreds of characters wide."""
    import textwrap

    return textwrap.fill(text, 92, break_long_words=False, break_on_hyphens=False)


def _gguf_archs() -> tuple[str, ...]:
    from lorafuse.formats.gguf import ARCHS

    return tuple(ARCHS)


def _one_of(text: str, choices: tuple[str, ...], what: str) -> str:
    """`text` when it is one of `choices` (read when an option is given, not when the parser is built: they
    cost imports), else argparse's error naming the nearest choice and all of them."""
    if text in choices:
        return text
    near = _close(text, choices)
    raise argparse.ArgumentTypeError(f"{what} {text!r}" + (f"; did you mean {near!r}?" if near else "")
                                     + f" (choose from {', '.join(choices)})")


def _arch(text: str) -> str:
    """--arch, any case, checked against the GGUF writer's table."""
    word = text.lower()
    return word if word in _gguf_archs() else _one_of(text, _gguf_archs(), "invalid choice:")


def _combine_methods() -> tuple[str, ...]:
    from lorafuse.ops.combine import METHODS

    return METHODS


def _combine_epilog() -> str:
    """The combine methods and their help from the method registry, then the examples and notes."""
    from lorafuse.ops.combine import methods_help

    return ("methods (c_i = w_i * s_i; every output has scale 1; default svd):\n" + methods_help() + "\n\n"
            + _EPILOG_COMBINE)


def _say(text: object = "", file: TextIO | None = None) -> None:
    """print() for everything the CLI shows: names from files reach the terminal escaped (see _terminal). A
    stdout that cannot be written (a full disk) is named in the error (`stdout: No space left on device`). What
    goes to stderr (notes, errors, the line said on a signal) is said where it can be: a terminal that hung up
    (EIO), a full disk or a closed stream never turns a finished command, or the exit status it has, into another
    failure."""
    stream = sys.stdout if file is None else file
    try:
        print(printable(text), file=stream)
    except (OSError, ValueError) as e:
        if stream is not sys.stdout:
            return
        if isinstance(e, OSError) and e.filename is None:
            e.filename = "stdout"
        raise


def _say_error(text: str, given: Sequence[str] = ()) -> None:
    """An error on stderr, every control character escaped but the line breaks of its own lines (a list of the
    modules that found no target, a recipe stage's errors: each line escaped where it was made). A line break
    inside a name the user gave (`given`: a path holding a newline) is escaped where the message shows it, so
    that no part of a name can pass for a line of its own."""
    for arg in sorted({a for a in given if "\n" in a or "\r" in a}, key=len, reverse=True):
        text = text.replace(arg, printable(arg, keep_newlines=False))
    _say(printable(text), file=sys.stderr)


def _json_text(obj: object, **kw: Any) -> str:
    """json.dumps of what a --json output holds, every string (keys too) as text UTF-8 can hold (io.provenance's
    path_text: a file name's undecodable byte as \\xNN, as info shows it): a lone surrogate, which json.dumps
    writes as \\udcff, is refused by strict JSON readers. A number that is not finite is null, as info's norms are:
    NaN and Infinity are no JSON (`python -m json.tool`, jq and JSON.parse refuse them)."""
    from lorafuse.io.provenance import path_text

    def utf8(x: object) -> object:
        if isinstance(x, str):
            return path_text(x)
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {utf8(k): utf8(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [utf8(v) for v in x]
        return x

    return json.dumps(utf8(obj), **{"allow_nan": False, **kw})


_SHOWN = "_lorafuse_notes"  # the namespace attribute keeping the notes shown on stderr (for --json's "notes")


def _note(args: argparse.Namespace, text: object, always: bool = False) -> None:
    """A note on stderr (`note: ...`) unless -q (`always`: said even then, as what --overwrite replaced), kept for
    --json's "notes" either way (_json_notes): `-q --json` prints the JSON with every note in it, and nothing else."""
    if always or not getattr(args, "quiet", False):
        _say(f"note: {text}", file=sys.stderr)
    args.__dict__.setdefault(_SHOWN, []).append(str(text))


def _json_notes(args: argparse.Namespace, *own: str) -> list[str]:
    """--json's "notes": the command's own, then every note shown on stderr (_note: the API's warnings, the
    CLI's notes), each once, in order."""
    return list(dict.fromkeys([*own, *args.__dict__.get(_SHOWN, [])]))


def _device(text: str) -> str:
    """--device: cpu or cuda (gpu is taken for cuda; any case)."""
    word = text.lower()
    return "cuda" if word in ("gpu", "cuda:0") else word


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device, choices=("cpu", "cuda"), default="cpu",
                   help="where the math runs: cpu (default) or cuda, one NVIDIA GPU (needs a lorafuse built with "
                   "CUDA: docs/building.md); files still stream through host memory")


def _progress_options(p: argparse.ArgumentParser, when: str = "") -> None:
    """--progress / --no-progress, as apply has them (default: a bar when stderr is a terminal); `when`: the
    verb's own limit on the bar (combine draws one only when it streams)."""
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", help="draw a progress bar even when stderr is not a terminal "
                     f"(never with -q or --json{when})")
    bar.add_argument("--no-progress", action="store_true", help="no progress bar (default: one when stderr is a "
                     "terminal)")


def _bars_drawn(args: argparse.Namespace) -> bool:
    """Whether the command may draw progress bars (a Hub download's too, io.hub.quiet_downloads): not with -q,
    --json or --no-progress, whichever of them the verb has."""
    return not any(getattr(args, name, False) for name in ("quiet", "json", "no_progress"))


def _progress_of(args: argparse.Namespace) -> bool | None:
    """True (draw), False (never: --no-progress, -q, --json) or None (when stderr is a terminal)."""
    if getattr(args, "quiet", False) or getattr(args, "json", False) or args.no_progress:
        return False
    return True if args.progress else None


def _rank_options(p: argparse.ArgumentParser, max_rank_default: str = "") -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=_rank, help="fixed output rank")
    g.add_argument("--sv-ratio", type=_sv_ratio, help="keep singular values above S_1 / T")
    g.add_argument("--sv-fro", type=_fraction, help="keep this fraction of the Frobenius norm (0..1)")
    g.add_argument("--sv-cumulative", type=_fraction, help="keep this fraction of the sum of singular values (0..1)")
    p.add_argument("--max-rank", type=_rank, help="upper bound on every module's rank" + max_rank_default)
    p.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")
    _device_option(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--verbose", action="store_true", help="one line per module")
    out.add_argument("--json", action="store_true", help="print the per-module report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)


def _rule(args: argparse.Namespace) -> RankRule:
    from lorafuse.ops.rank import RankRule

    return RankRule(rank=args.rank, sv_ratio=args.sv_ratio, sv_fro=args.sv_fro, sv_cumulative=args.sv_cumulative,
                    max_rank=args.max_rank)


def _print_rank_report(args: argparse.Namespace, rows: list[dict[str, Any]], summary: str, metric: str,
                       notes: Sequence[str] = (), out: object = None, seconds: float | None = None) -> None:
    """resize / extract's report; --json: with `out`, the path written (`-o DIR/` names a file inside it), as
    combine's and convert's --json say it, and the `seconds` it took, as every verb's --json says them."""
    if args.json:
        _say(_json_text({"summary": summary, "out": None if out is None else str(out), "modules": rows,
                         "seconds": seconds, "notes": _json_notes(args, *notes)}, indent=2))
        return
    if args.quiet:
        return
    if args.verbose:
        width = max((len(str(r["name"])) for r in rows), default=6)
        for r in rows:
            _say(f"{str(r['name']):<{width}}  rank {r['rank']:>4}  {metric} {float(r[metric]):.6f}")
    _say(summary)


# Numeric options are checked while parsing: argparse reports "argument --rank: must be ..." naming the
# option, the value and the allowed range (the API checks the same ranges: lorafuse._validate).

def _given(text: str, quoted: bool = True) -> str:
    """An option's value as its error shows it: repr'd (or as typed), cut to 200 characters with its length said
    (a value of 5,000 digits is not a 5,000-character message)."""
    shown = repr(text) if quoted else text
    return shown if len(shown) <= 200 else f"{shown[:190]}... ({len(text):,} characters)"


def _weights(text: str) -> list[float]:
    fields = text.split(",")
    if any(not f.strip() for f in fields):  # "1,,2" or "0.5,": a weight left out would shift the others
        raise argparse.ArgumentTypeError(f"weights must be comma-separated numbers, one per adapter, with none left "
                                         f"empty, got {_given(text)}")
    parsed = [decimal_number(x.strip()) for x in fields]  # plain decimals: not `1_5`, which float() reads as 15
    ws = [w for w in parsed if w is not None]
    if len(ws) < len(fields):
        raise argparse.ArgumentTypeError(f"weights must be comma-separated decimal numbers (0.5, -1, 2e-3), got "
                                         f"{_given(text)}")
    if not all(math.isfinite(w) for w in ws):
        raise argparse.ArgumentTypeError(f"weights must be comma-separated finite numbers, got {_given(text)}")
    small = [f.strip() for f, w in zip(fields, ws) if rounds_to_zero(f.strip(), w)]
    if small:
        raise argparse.ArgumentTypeError(f"weight {_given(small[0], False)} is too small for a float64: it would be 0 "
                                         "(write 0 for that)")
    return ws


_INTEGER = re.compile(r"[-+]?[0-9]+")  # an integer option's value, as typed (ASCII digits)


def _bounded_int(text: str, lo: int, hi: int, note: str = "") -> int:
    # plain decimal digits, as the numbers of a recipe and of --weights: not `1_6`, which int() reads as 16, nor
    # non-ASCII digits
    try:
        n = int(text.strip(), 10) if _INTEGER.fullmatch(text.strip()) else None
    except ValueError:  # more digits than int() reads (4,300)
        n = hi + 1
    if n is None:
        raise argparse.ArgumentTypeError(f"must be an integer from {lo}{note} to {hi}, got {_given(text)}")
    if not lo <= n <= hi:
        raise argparse.ArgumentTypeError(f"must be an integer from {lo}{note} to {hi}, got {_given(text, False)}")
    return n


def _bounded_float(text: str, lo: float, hi: float, lo_open: bool = False) -> float:
    allowed = f"a number {'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi < math.inf else "")
    x = decimal_number(text.strip())  # a plain decimal: not `1_5`, which float() reads as 15
    if x is None:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_given(text)}")
    if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {_given(text, False)}")
    return x


def _threads(text: str) -> int:
    """0 (all cores) .. 1024 (the core runs at most 4 workers per core whatever is asked)."""
    return _bounded_int(text, 0, MAX_THREADS, " (all cores)")


def _rank(text: str) -> int:
    """--rank, --conv-rank, --max-rank: 1 .. 2^20 (each module is capped at its own full rank)."""
    return _bounded_int(text, 1, MAX_RANK)


def _passes(text: str) -> int:
    return _bounded_int(text, 1, MAX_PASSES)


def _power_iters(text: str) -> int:
    return _bounded_int(text, 0, MAX_POWER_ITERS)


def _oversample(text: str) -> int:
    return _bounded_int(text, 0, MAX_OVERSAMPLE)


def _seed(text: str) -> int:
    return _bounded_int(text, 0, MAX_SEED)


def _density(text: str) -> float:
    return _bounded_float(text, 0.0, 1.0, lo_open=True)


def _sv_ratio(text: str) -> float:
    return _bounded_float(text, 1.0, math.inf)


def _fraction(text: str) -> float:
    """--sv-fro, --sv-cumulative, --clamp-quantile: (0, 1]."""
    return _bounded_float(text, 0.0, 1.0, lo_open=True)


def _min_diff(text: str) -> float:
    """extract --min-diff: >= 0."""
    return _bounded_float(text, 0.0, math.inf)


_QUIET_HELP = ("print nothing on success: no summary on stdout, no notes on stderr (--json still prints its JSON, "
               "with the notes in it; errors are still said)")

_OVERWRITE_HELP = (
    "replace {what} even when lorafuse did not write it (a folder or file of yours, or a lorafuse output you "
    "added files to or changed) or when it is a lorafuse output of another kind (a merged model where an "
    "adapter is written, ...); stderr names what was replaced. Without it such an output is refused and "
    "nothing is written. New paths, empty folders and lorafuse's own outputs of the same kind, i.e. a re-run "
    "(a folder holding lorafuse_manifest.json and only the files it lists, a file with lorafuse_version "
    "metadata) need no "
    "flag. Never "
    "replaced, even with it: the current folder or one above it, your home folder or one above it, an input, a "
    "folder holding an input, a path inside an input folder, a symbolic link")


def _overwrite_option(p: argparse.ArgumentParser, what: str = "the output (-o)") -> None:
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP.format(what=what))


def _dry_run_option(p: argparse.ArgumentParser, checks: str, extra: str = "") -> None:
    p.add_argument("--dry-run", action="store_true",
                   help=f"check everything a run checks before it writes ({checks}) and print the plan instead: "
                   f"per module its input ranks -> output rank and shape; {extra}the output's format, dtypes, "
                   "tensors and bytes; the bytes of tensor data to read. Refusals and exit status are those of a "
                   "real run. Nothing is written, created or replaced: not the output, not a temporary file, not a "
                   "folder. With --json the plan is printed as JSON")


def _show_plan(args: argparse.Namespace, plan: Any) -> int:
    """--dry-run: the plan (ops.plan.Plan) on stdout: as text (every module with --verbose), as JSON with --json;
    nothing with -q."""
    if getattr(args, "json", False):
        shown = plan.as_json()
        _say(_json_text({**shown, "notes": _json_notes(args, *shown.get("notes", []))}, indent=2, allow_nan=False))
    elif not args.quiet:
        for line in plan.lines(every=getattr(args, "verbose", False)):  # --verbose: one line per module, all
            _say(line)
    return 0


def _method(text: str) -> str:
    if text.lower() in _combine_methods():
        return text.lower()
    from lorafuse.ops.combine.registry import foreign_method

    other = foreign_method(text)
    if other is not None:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}: {other} (choose from "
                                         f"{', '.join(_combine_methods())})")
    return _one_of(text, _combine_methods(), "unknown method")


_FACTOR_DTYPE_HELP = ("dtype of the written factors: fp32, fp16 or bf16 (kohya's --save_precision: float, fp16, bf16; "
                      "float32, half, bfloat16 also work); computed in float32 and rounded once, to nearest even "
                      "(default: the inputs' factor dtype when they all share one, else fp32, with a note)")


def _split(text: str) -> str:
    return split_name(text)


def _out(text: str) -> str:
    """An output path (-o, --plot, --spectrum, --intermediate-dir): `-`, which other tools read as stdout, is
    refused (lorafuse writes files and folders, never to stdout)."""
    if text == "-":
        raise argparse.ArgumentTypeError("'-' (stdout): lorafuse writes files and folders, not to stdout; give a "
                                         "path (./- for one named '-')")
    if not text:  # not the current folder (Path('')), nor an option left out (`--plot ''` would draw nothing)
        raise argparse.ArgumentTypeError("an empty path: give a file or folder name")
    return _path(text)


def _intermediate_dir(text: str) -> str:
    """run --intermediate-dir: as _out, but an empty one is refused by lorafuse.run, naming intermediate_dir."""
    return _out(text) if text else text


def _path(text: str) -> str:
    """A path argument with a leading `~` or `~user` expanded, as a shell does where it can (a quoted `'~/x'`, or
    `--out=~/x`, which bash leaves as typed), and as list lines and recipe models are: never a folder named `~`."""
    if text.startswith("~"):
        return os.path.expanduser(text)
    if os.path.normpath(text).startswith("~"):  # `./~/x`, the escape for a folder named `~` here: made absolute,
        return os.path.abspath(text)  # as a path that Path() shortens to `~/x` would be refused (io.atomic)
    return text


def _convert_target(text: str) -> str:
    """convert --to: peft (the diffusers LoRA file; `diffusers` names it too), kohya or gguf, any case."""
    word = text.lower()
    return "peft" if word == "diffusers" else word


def _dtype_text(text: str) -> str:
    """apply --dtype: checked as _factor_dtype checks it, kept as given (apply records it)."""
    _factor_dtype(text)
    return text


def _factor_dtype(text: str) -> str:
    """combine / resize --dtype: fp32, fp16, bf16 or an alias io.dtypes accepts -> 'F32', 'F16', 'BF16'."""
    from lorafuse.io.dtypes import parse_output_dtype

    try:
        return parse_output_dtype(text)
    except LorafuseValueError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r} (choose from fp32, fp16, bf16)") from None


# Other tools' options and verbs, and what lorafuse calls them: said instead of a bare "unrecognized".
_FOREIGN_OPTIONS = {
    "--new_rank": "kohya's --new_rank is --rank here", "--new-rank": "kohya's --new_rank is --rank here",
    "--save_precision": "kohya's --save_precision is --dtype here (fp32, fp16, bf16; float, half, bfloat16)",
    "--save-precision": "kohya's --save_precision is --dtype here (fp32, fp16, bf16; float, half, bfloat16)",
    "--dynamic_method": "kohya's --dynamic_method is the option itself here: --sv-ratio R, --sv-fro F or "
                        "--sv-cumulative C (its --dynamic_param is their value)",
    "--dynamic_param": "kohya's --dynamic_param is the value of --sv-ratio, --sv-fro or --sv-cumulative here",
    "--combination_type": "PEFT's combination_type is --method here",
    "--combination-type": "PEFT's combination_type is --method here",
    "--save_to": "kohya's --save_to is -o/--out here", "--output": "the output is -o/--out",
    "--output_dir": "the output is -o/--out", "--output-dir": "the output is -o/--out",
    "--dim": "the rank is --rank", "--network_dim": "kohya's --network_dim is --rank here",
    "--clamp_quantile": "kohya's --clamp_quantile is --clamp-quantile here (extract)",
    "--min_diff": "kohya's --min_diff is --min-diff here (extract)",
    "--conv_dim": "kohya's --conv_dim is --conv-rank here (extract, combine)",
    "--conv-dim": "kohya's --conv_dim is --conv-rank here (extract, combine)",
    "--ratios": "kohya's --ratios is --weights here (one comma-separated value: --weights 0.8,0.5)",
    "--concat": "kohya's --concat is --method cat here",
    "--new_conv_rank": "kohya's --new_conv_rank is --conv-rank here (combine); resize reduces every module by "
                       "one rule",
    "--new-conv-rank": "kohya's --new_conv_rank is --conv-rank here (combine); resize reduces every module by "
                       "one rule",
    "--sd_model": "kohya's --sd_model is the first argument here (lorafuse apply BASE ADAPTER...)",
    "--sd-model": "kohya's --sd_model is the first argument here (lorafuse apply BASE ADAPTER...)",
    "--models": "kohya's --models are the arguments here (lorafuse apply BASE ADAPTER..., lorafuse combine "
                "ADAPTER...), their --ratios --weights",
    "--model": "kohya's --model is an argument here, not an option (lorafuse resize ADAPTER ..., lorafuse info "
               "PATH)",
    "--precision": "kohya's --precision has no counterpart here: lorafuse computes in float32 (sums in float64) "
                   "and rounds once; --dtype sets the output's",
    "--torch_dtype": "transformers' torch_dtype is --dtype here (fp32, fp16, bf16)",
    "--torch-dtype": "transformers' torch_dtype is --dtype here (fp32, fp16, bf16)",
    **dict.fromkeys(("--revision",), "a Hub id's revision is part of the id here: org/name@REVISION (a branch, a "
                    "tag or a commit sha)"),
    **dict.fromkeys(("--token", "--hf-token", "--hf_token", "--use_auth_token", "--use-auth-token"),
                    "lorafuse takes no token on its command line (a command line is seen by other users' `ps` and "
                    "kept in shell histories): set HF_TOKEN, or log in with `hf auth login`"),
    **dict.fromkeys(("--cache-dir", "--cache_dir"), "the Hugging Face cache is the one HF_HUB_CACHE or HF_HOME names"),
    **dict.fromkeys(("--local-files-only", "--local_files_only", "--offline"),
                    "set HF_HUB_OFFLINE=1 to read Hub ids from the Hugging Face cache only"),
    **dict.fromkeys(("--subfolder",), "give a folder inside a Hub repository as a path: `hf download ORG/NAME "
                    "--include 'FOLDER/*'`, then the folder that prints followed by /FOLDER"),
}
_FOREIGN_VERBS = {
    "merge": "to merge adapters into a base model: apply; to merge adapters into one adapter: combine",
    "fuse": "to merge adapters into a base model: apply; to merge adapters into one adapter: combine",
    "help": "for a command's options: lorafuse COMMAND --help",
    "version": "for the version: lorafuse --version",
    "svd": "to combine adapters by SVD: combine --method svd; to reduce an adapter's rank: resize",
    "inspect": "to describe an adapter or checkpoint: info", "show": "to describe an adapter or checkpoint: info",
}
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _close(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str | None:
    import difflib

    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return found[0] if found else None


def _misspelt(name: str, known: Sequence[str], parsers: Iterable[argparse.ArgumentParser]) -> str | None:
    """The option `name` (a word of the command line, not one of `known`) looks like a misspelling of: a close
    long option (`--ouput`: '--out'), or for a capital short option (`-V`) the one long option of its letter.
    None for a name that is an option of another verb (said by parse_args with that verb named)."""
    if name in known or any(name in _option_names(p) for p in parsers):
        return None
    if re.fullmatch(r"--[A-Za-z][\w-]*", name):
        return _close(name, [o for o in known if o.startswith("--")], 0.75)
    if re.fullmatch(r"-[A-Z]", name):
        letter = [o for o in known if o.startswith("--" + name[1].lower())]
        return letter[0] if len(letter) == 1 else None
    return None


class _Version(argparse.Action):
    """--version, reading the version (from the compiled core, which loads numpy) only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:  # noqa: A002 (argparse's name)
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from importlib.util import find_spec

        try:  # whether the CUDA module was built (found, not loaded: --version stays instant)
            cuda = "built (--device cuda)" if find_spec("lorafuse._cuda") is not None else "not built"
        except (ImportError, ValueError):
            cuda = "not built"
        _say(f"lorafuse {get_version()} (CUDA backend: {cuda})")
        parser.exit()


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string a parser takes (-h, --help, -o, --out, --rank, ...), in the order they were added."""
    return [o for action in parser._actions for o in action.option_strings]


def _meaning(action: argparse.Action, value: object) -> object:
    """What an option's parsed value means, for comparing two of them: apply's --dtype keeps the spelling given
    (fp16, half), which names one dtype."""
    return _factor_dtype(value) if action.type is _dtype_text and isinstance(value, str) else value


def _once(parser: argparse.ArgumentParser, action: argparse.Action, namespace: argparse.Namespace, value: object,
          shown: str) -> None:
    """Refuse a single-valued option given twice with different values (`-o a -o b`: argparse would take the
    last and write to b alone, where the user may have meant a); record `value` (shown as `shown`) otherwise."""
    seen: dict[str, tuple[object, str]] = namespace.__dict__.setdefault(_SEEN, {})
    if action.dest in seen and _meaning(action, seen[action.dest][0]) != _meaning(action, value):
        parser.error(f"{'/'.join(action.option_strings)} given twice ({seen[action.dest][1]} and {shown}): give it "
                     "once")
    seen[action.dest] = (value, shown)


class _StoreOnce(argparse._StoreAction):
    """argparse's store, refusing an option given twice with different values (_once)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        _once(parser, self, namespace, values, str(values))
        super().__call__(parser, namespace, values, option_string)


class _BooleanOnce(argparse.BooleanOptionalAction):
    """--x / --no-x (argparse's BooleanOptionalAction), refusing both given (_once: the last would win)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        if option_string is not None and option_string in self.option_strings:
            _once(parser, self, namespace, not option_string.startswith("--no-"), option_string)
        super().__call__(parser, namespace, values, option_string)


_SEEN = "_lorafuse_given"  # the namespace attribute _StoreOnce keeps its values in (removed after parsing)


class _Parser(argparse.ArgumentParser):
    """argparse with suggestions: a mistyped verb, choice or option gets `did you mean ...?`, and an
    unknown option after a verb is reported with that verb's usage. Single-valued options given twice with
    different values are refused (_StoreOnce). Options are taken only as spelled in full (allow_abbrev False,
    on every verb's parser too): an abbreviation (`--ou`, `--weight`) would escape the checks that read the
    command line as words (--weights' value, the recorded command's -o OUT), and would change meaning when a
    new option shares its prefix; `did you mean` names the option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    verbs: dict[str, argparse.ArgumentParser]
    # fills in what costs imports (the combine methods from their registry) when help or usage is shown,
    # so a command that runs never imports what only its neighbours' help needs
    complete: Callable[[argparse.ArgumentParser], None] | None = None

    def _complete_now(self) -> None:
        if self.complete is not None:
            fill, self.complete = self.complete, None
            fill(self)

    def format_usage(self) -> str:
        self._complete_now()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete_now()
        return super().format_help()

    def _print_message(self, message: str, file: Any = None) -> None:  # (typeshed: IO[str] | None)
        """argparse's, but a stdout that cannot take --help / --version (a full disk written through at once:
        python -u, PYTHONUNBUFFERED) fails the command as a failed final flush does (main: `stdout: No space left
        on device`, status 1); argparse drops the error, which exited 0 with nothing shown. stderr: as argparse."""
        stream = file or sys.stderr
        if stream is not sys.stdout or not message:
            super()._print_message(message, stream)
            return
        try:
            stream.write(message)
        except OSError as e:
            if e.filename is None:
                e.filename = "stdout"
            raise
        except (AttributeError, ValueError):  # a Python caller's sys.stdout None or closed: nothing shown, as argparse
            pass

    def error(self, message: str) -> NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"[\w.-]+", m.group(2))
            hint = _FOREIGN_VERBS.get(m.group(1).lower()) if set(choices) >= {"apply", "combine"} else None
            near = _close(m.group(1), choices)
            if hint is not None:
                message += f"; {hint}"
            elif near is not None:
                message += f"; did you mean {near!r}?"
        super().error(message)

    def _help(self, words: Sequence[str]) -> NoReturn:
        """`lorafuse help`: the commands; `lorafuse help COMMAND`: what `lorafuse COMMAND --help` prints (exit 0);
        anything else is a usage error naming the command meant."""
        verbs = getattr(self, "verbs", {})
        words = [w for w in words if w not in ("-h", "--help")]  # `lorafuse help --help`: help is what it asks
        if len(words) > 1:
            self.error(f"help takes one COMMAND, got {' '.join(words)}: lorafuse help COMMAND")
        if words and words[0] not in verbs:
            near = _close(words[0], list(verbs))
            self.error(f"help: no command {words[0]!r}" + (f"; did you mean {near!r}?" if near is not None else
                                                           f" (choose from {', '.join(verbs)})"))
        (verbs[words[0]] if words else self).print_help()
        self.exit()

    def _before_verb(self, name: str, verb: str | None) -> None:
        """Refuse an option of a command given before it (`lorafuse --threads 2 info x`), saying where it goes:
        argparse took its value for the command (invalid choice: '2'), or named the option as a misspelling of
        itself (`lorafuse --json info x`: did you mean '--json'?)."""
        verbs: dict[str, argparse.ArgumentParser] = getattr(self, "verbs", {})
        owners = [v for v, q in verbs.items() if name in _option_names(q)]
        if name in _option_names(self) or not owners:
            return
        if verb in owners:
            self.error(f"{name} is an option of {verb}: give it after the command (lorafuse {verb} ... {name})")
        self.error(f"{name} is an option of {', '.join(owners)}, not of {verb or 'lorafuse itself'}: give it after "
                   f"the command (lorafuse {owners[0]} ... {name})")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        words = sys.argv[1:] if args is None else list(args)
        verbs = getattr(self, "verbs", {})
        if verbs and words[:1] == ["--"]:  # `lorafuse -- info x`: the end of lorafuse's own options
            words = words[1:]
            if words and words[0].startswith("-"):  # (argparse would name the '--', not what follows it)
                self.error(f"argument COMMAND: invalid choice: {words[0]!r} after -- (choose from "
                           f"{', '.join(map(repr, verbs))})")
        if verbs and words[:1] == ["help"]:  # `lorafuse help [COMMAND]`, as git and pip read it: COMMAND --help
            self._help(words[1:])
        if not words and verbs:  # `lorafuse` alone: the commands, not only "COMMAND is required"
            self.print_help(sys.stderr)
            self.error("give a COMMAND (the list above)")
        if verbs and words[0].startswith("-"):  # a command's option before the command (`lorafuse -q apply ...`)
            self._before_verb(words[0].split("=", 1)[0], next((w for w in words if w in verbs), None))
        verb = next((w for w in words if not w.startswith("-")), "")
        target = verbs.get(verb, self)
        known = _option_names(target)
        for i, w in enumerate(words):
            if w == "--":  # what follows is inputs, whatever they look like
                break
            name = w.split("=", 1)[0]
            if name in _FOREIGN_OPTIONS and name not in known:
                target.error(f"unrecognized argument {name}: {_FOREIGN_OPTIONS[name]}")
            whole = [o for o in known if o.startswith(name)] if name.startswith("--") and name not in known else []
            if whole and name != "--":  # said before argparse's "required" errors, which would come first
                target.error(f"unrecognized argument {name}: options are spelled in full (did you mean "
                             f"{' or '.join(map(repr, whole))}?)")
            if name.startswith("-") and name not in known and not _NUMBER.fullmatch(w) and os.path.lexists(w):
                target.error(f"unrecognized argument {w}: a word that starts with '-' is read as an option, and {w} "
                             f"names a file or folder: write ./{w}, or put it after -- (lorafuse {verb or 'COMMAND'} "
                             f"... -- {w})")  # not argparse's "the following arguments are required"
            if target is not self and i > words.index(verb) and name not in known and name in _option_names(self):
                target.error(f"unrecognized argument {name}: an option of lorafuse itself, before any command "
                             f"(lorafuse {name})")
            near = _misspelt(name, known, verbs.values())
            if near is not None:  # so is a misspelling (`--ouput`, `lorafuse -V`): not "-o/--out is required"
                target.error(f"unrecognized argument {name}; did you mean {near!r}?")
            if name == "--weights" and "=" not in w and i + 2 < len(words) and _NUMBER.fullmatch(words[i + 2]) \
                    and not os.path.lexists(words[i + 2]):
                target.error(f"--weights takes one comma-separated value: --weights {words[i + 1]},{words[i + 2]} "
                             f"(not {words[i + 1]} {words[i + 2]})")
        ns, extras = self.parse_known_args(words, namespace)
        ns.__dict__.pop(_SEEN, None)
        if extras:
            target = verbs.get(getattr(ns, "command", None) or "", self)
            message = "unrecognized arguments: " + " ".join(extras)
            unknown = next((e.split("=", 1)[0] for e in extras if e.startswith("-")), None)
            near = _close(unknown, _option_names(target), 0.75) if unknown else None
            elsewhere = sorted(v for v, p in verbs.items() if p is not target and unknown in _option_names(p)) \
                if unknown else []
            if near is not None:
                message += f"; did you mean {near!r}?"
            elif elsewhere:
                message += f" ({unknown} is an option of {', '.join(elsewhere)}, not of {ns.command})"
            target.error(message)
        return ns


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lorafuse",
        description="Compose LoRA adapters over safetensors files: exact, fast, streaming.",
        epilog="examples:\n"
               "  lorafuse apply ./Llama-3.2-1B ./my-lora -o ./merged       merge an adapter into its base\n"
               "  lorafuse combine ./a ./b --weights 0.5,0.5 -o ./ab        combine adapters (svd by default)\n"
               "  lorafuse resize ./my-lora --rank 8 -o ./my-lora-r8        reduce an adapter's rank\n"
               "  lorafuse extract ./base ./finetuned --rank 32 -o ./lora   a LoRA from a full fine-tune\n"
               "  lorafuse convert style.safetensors --to peft -o ./out/    kohya <-> diffusers, or --to gguf\n"
               "  lorafuse info ./my-lora                                   what an adapter or checkpoint holds\n"
               "\n`lorafuse COMMAND --help` (or `lorafuse help COMMAND`) lists a command's options, with more\n"
               "examples; every command that writes a model or an adapter takes --dry-run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=_Version, help="show the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p.verbs = sub.choices  # type: ignore[assignment]

    a = sub.add_parser("apply", help="merge adapters into base weights", description="Merge LoRA adapters into a "
                       "base checkpoint and write a new checkpoint.", epilog=_EPILOG_APPLY,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("base", type=_path,
                   help="base checkpoint: a folder (model.safetensors or sharded with an index), one "
                   ".safetensors file, or a diffusers pipeline folder")
    a.add_argument("adapters", nargs="+", type=_path, help="adapters: PEFT folders, kohya / LyCORIS .safetensors "
                   "files, diffusers LoRA files (or a folder holding one)")
    a.add_argument("-o", "--out", type=_out, required=True,
                   help="output. A folder base: a checkpoint folder (config and "
                   "tokenizer files copied), or, for a name ending in .safetensors, one file holding every tensor "
                   "(the folder's other files cannot go into it: a note lists them; refused when the merge must "
                   "change config.json, i.e. an untied lm_head, with --max-shard-size, and for a diffusers pipeline). "
                   "A single-file base: the output file; a name ending in / or an existing folder gets the base's "
                   "file name inside it")
    _overwrite_option(a)
    a.add_argument("--weights", type=_weights, help=WEIGHTS_HELP[:-1] + "; an adapter with modules_to_save tensors "
                   "or DoRA takes weight 1 only)")
    a.add_argument("--dtype", metavar="{fp32,fp16,bf16}", type=_dtype_text,
                   help="output dtype of float tensors: fp32, fp16 or bf16 (float32, half, bfloat16 also work; "
                   "default: as in the base); a quantized base's weights are then written dequantized in it")
    a.add_argument("--requantize", action=_BooleanOnce, default=None,
                   help="a quantized base: write its quantized format back (merged weights quantized again, the "
                   "rest copied); --no-requantize writes it dequantized. Default: FP8 stays FP8 unless --dtype; "
                   "bitsandbytes is written dequantized (16-bit)")
    a.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")
    _device_option(a)
    a.add_argument("--max-shard-size", help="re-shard the output, e.g. 5GB (10^9 bytes) or 2GiB (2^30 bytes); at "
                   "least 64KiB and 100x the checkpoint's metadata, which every shard repeats (default: shards as "
                   "the input)")
    a.add_argument("--allow-nonfinite", action="store_true", help="write NaN/Inf results instead of failing")
    a.add_argument("--skip-missing", action="store_true",
                   help="merge the modules that find a target and list the others (default: refuse)")
    _progress_options(a)
    a.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    shown = a.add_mutually_exclusive_group()
    shown.add_argument("--verbose", action="store_true", help="one line per weight quantized again (quantized bases)")
    shown.add_argument("--json", action="store_true", help="print the report as JSON (with the requantization error "
                       "of each weight of a quantized base)")
    _dry_run_option(a, "the options, the inputs, every adapter module matched to its base weight as the merge "
                    "matches it, the output path", "the weights merged, the tensors copied, the shards; ")

    c = sub.add_parser("combine", help="combine adapters into one adapter",
                       description=_paragraph("Combine LoRA adapters into one adapter (PEFT's add_weighted_adapter, "
                       "method for method; the svd method is exact and needs no dense matrix). One adapter goes "
                       "through the method asked, with a note: PEFT takes 'linear' for one adapter, returning it "
                       "unchanged (--method cat does that here)."),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("adapters", nargs="*", type=_path,
                   help="adapters: PEFT folders, kohya / LyCORIS files, diffusers LoRA files "
                   "(or a folder holding one; or --from-list)")
    c.add_argument("--from-list", metavar="LIST", type=_path,
                   help="read the adapters from LIST, one per line: PATH [WEIGHT] (a line without a weight gets 1/n; "
                   "# starts a comment; blank lines are ignored; relative paths are from LIST's folder). Every "
                   "adapter is checked before any work; errors name the line")
    c.add_argument("--engine", type=str.lower, choices=("auto", "memory", "stream", "ray"),
                   default="auto",
                   help="memory: every adapter mapped at once; stream: each adapter opened, read once per pass and "
                   "closed, memory independent of their number (svd, linear); ray: the streamed passes as Ray tasks "
                   "over shards of adapters, partial sketches summed in a fixed tree (pip install 'lorafuse[ray]'; "
                   "a local Ray unless --ray-address); auto (default): stream for more than 256 adapters, with "
                   "--passes, or when a module would take a randomized SVD anyway")
    c.add_argument("--ray-address", metavar="ADDR",
                   help="--engine ray: the Ray cluster to join (e.g. auto, ray://head:10001; default: start a local "
                   "Ray and stop it at the end); adapter paths must be readable from every node")
    c.add_argument("--passes", type=_passes, metavar="P",
                   help="streamed svd: passes over the adapters: 3 (default: range, one power iteration, projection; "
                   "near-optimal), 2 (range, then projection: 2/3 of the time, up to 1.5x the optimal error), 1 (a "
                   "single-pass sketch, Tropp et al. 2017, for adapters read only once), more (power iterations); "
                   "selects --engine stream")
    c.add_argument("--oversample", type=_oversample, metavar="P",
                   help="streamed svd: sketch columns beyond --rank (default 10). Without a power iteration the "
                   "sketch's width is what bounds the error: on benchmarks/bench_many.py's adapters --passes 2 "
                   "--oversample 120 came within 1.02x of the optimum, where 10 gave 1.43x (docs/cli.md); each "
                   "pass's products grow with it. Selects --engine stream")
    c.add_argument("-o", "--out", type=_out, required=True,
                   help="output: a PEFT folder, or a .safetensors file (kohya, diffusers). A name ending in "
                   ".safetensors is one file: PEFT inputs without --format are then written as a diffusers or "
                   "kohya file if those can name their modules, else refused before any work; a one-file format "
                   "given a name ending in / (or an existing folder) writes into it, as the first input's file "
                   "name (pytorch_lora_weights.safetensors for diffusers)")
    _overwrite_option(c)
    c.add_argument("--format", type=str.lower, choices=("peft", "kohya", "diffusers"),
                   help="output format (default: that of the first input)")
    c.add_argument("--weights", type=_weights, help=WEIGHTS_HELP[:-1] + "; the sum of the deltas, as PEFT's "
                   "add_weighted_adapter: give 1/n each for their mean, which --from-list lines without a weight get)")
    # the registry's methods, listed as argparse lists choices; checked by combine (exit status 2, like every
    # refused option value, with the choices named)
    method = c.add_argument("--method", default="svd", type=_method, metavar="METHOD",
                            help="combination method (default svd; see below)")

    def complete_combine(parser: argparse.ArgumentParser) -> None:  # when combine's help or usage is shown
        parser.epilog = _combine_epilog()
        method.metavar = "{" + ",".join(_combine_methods()) + "}"

    c.complete = complete_combine
    c.add_argument("--rank", type=_rank, help="output rank of the svd methods (default: the largest input rank)")
    c.add_argument("--conv-rank", type=_rank, help="output rank of kxk convolutions, k > 1 (default: --rank; "
                   "refused when no module is one)")
    c.add_argument("--density", type=_density,
                   help="fraction of values kept by ties / dare / magnitude_prune, in (0, 1]; no default: those "
                   "methods need it (0.2 to 0.5 is usual), the others refuse it")
    c.add_argument("--majority-sign", default="total", type=str.lower, choices=("total", "frequency"),
                   help="ties: majority sign from the sum (total, the default) or the count (frequency) of signs")
    c.add_argument("--seed", type=_seed, default=0,
                   help="seed of DARE's random masks and of randomized SVD sketches (default 0)")
    c.add_argument("--split", default="B", type=_split, choices=("B", "sqrt"),
                   help="where the svd methods put the singular values: on B like PEFT (default B), or their square "
                   "roots on both factors (sqrt)")
    c.add_argument("--exact", action="store_true",
                   help="svd: exact for every module however many adapters are stacked (default: a module whose "
                   "stacked rank makes the exact SVD 1.5x dearer than a randomized one takes the randomized one)")
    c.add_argument("--dtype", type=_factor_dtype, metavar="{fp32,fp16,bf16}", help=_FACTOR_DTYPE_HELP)
    c.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")
    _device_option(c)
    _progress_options(c, "; combine draws one only when it streams the adapters: --engine stream or ray, or auto "
                      "choosing stream; none with the memory engine")
    c.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    c.add_argument("--json", action="store_true", help="print the report as JSON: out, method, adapters, modules "
                   "with their ranks, randomized, dtype, seconds, engine, notes and the streamed engine's summary "
                   "(passes, bytes read, peak memory, each module's estimated error; null in memory)")
    _dry_run_option(c, "the options, the adapters' headers, the method's rules, the output path",
                    "the engine and the passes; ")

    s = sub.add_parser("similarity", help="cosine similarity of adapters' deltas",
                       description="Exact cosine similarity of the adapters' deltas (all modules together),\n"
                       "computed from the factors without forming any dense matrix. Reads PEFT adapter\n"
                       "folders, kohya / LyCORIS .safetensors files (LoRA, LoCon, LoHa, LoKr) and\n"
                       "diffusers LoRA .safetensors files, in any mix. A DoRA module is refused: its\n"
                       "delta depends on the base weight, which an adapter does not hold.",
                       epilog=_EPILOG_SIMILARITY, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("adapters", nargs="+", type=_path,
                   help="adapters: PEFT folders, kohya / LyCORIS .safetensors files, "
                   "diffusers LoRA .safetensors files (or a folder holding one)")
    s.add_argument("--json", action="store_true", help="print JSON for machines")
    s.add_argument("--plot", metavar="IMAGE", type=_out, help="also draw the matrix as a heat map to this file, in the "
                   "format its suffix names: .png, .svg, .pdf, .jpg or .jpeg (other suffixes are refused before "
                   "any work; needs matplotlib: pip install lorafuse[plot])")
    _overwrite_option(s, "the --plot file")
    s.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")

    r = sub.add_parser("resize", help="reduce the rank of an adapter (optimally)",
                       description="Reduce an adapter's rank: per module the best rank-k approximation of its\n"
                       "delta (QR of the factors + SVD of the small core), the rank fixed or chosen from\n"
                       "the singular values. Each module keeps its scale; the output has the input's\n"
                       "format. Reads PEFT adapter folders, kohya / LyCORIS .safetensors files and\n"
                       "diffusers LoRA .safetensors files.",
                       epilog=_EPILOG_RESIZE, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("adapter", type=_path,
                   help="adapter: PEFT folder, kohya / LyCORIS file or diffusers LoRA file (or a folder "
                   "holding one)")
    r.add_argument("-o", "--out", type=_out, required=True,
                   help="output adapter, in the input's format (a PEFT folder, or "
                   "one kohya / diffusers file). A name ending in .safetensors is one file: a PEFT input is then "
                   "written as a diffusers or kohya file if those can name its modules, else refused before any "
                   "work; a file format given a name ending in / (or an existing folder) writes into it, as the "
                   "input's file name (pytorch_lora_weights.safetensors for diffusers)")
    _overwrite_option(r)
    _rank_options(r, " (default: none; a module keeps at most its input rank)")
    r.add_argument("--split", default="B", type=_split, choices=("B", "sqrt"),
                   help="singular values on B (default, as PEFT and kohya), or their square roots on both")
    _progress_options(r)
    r.add_argument("--dtype", type=_factor_dtype, metavar="{fp32,fp16,bf16}", help=_FACTOR_DTYPE_HELP)
    _dry_run_option(r, "the options, the adapter, the output path", "no SVD runs, so with --sv-ratio, --sv-fro or "
                    "--sv-cumulative a module's rank is an upper bound (its rank, capped by --max-rank); ")

    e = sub.add_parser("extract", help="extract a LoRA from a fine-tuned model and its base",
                       description="Extract a PEFT LoRA adapter from a fine-tuned checkpoint and its base: a\n"
                       "randomized SVD of each weight difference, streamed from both memory-mapped\n"
                       "checkpoints.",
                       epilog=_EPILOG_EXTRACT, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("base", type=_path, help="base checkpoint (folder or .safetensors file)")
    e.add_argument("finetuned", type=_path, help="fine-tuned checkpoint of the same architecture")
    e.add_argument("-o", "--out", type=_out, required=True, help="output adapter folder (PEFT). A name ending in "
                   ".safetensors is one file: written as a diffusers or kohya file if those can name the base's "
                   "modules (single-file Stable Diffusion checkpoints: a kohya file, lora_unet_ / lora_te*_), else "
                   "refused before any work (checkpoint weight names, e.g. model.layers.0.self_attn.q_proj, are "
                   "neither)")
    _overwrite_option(e)
    _rank_options(e, " (default with --sv-*: 128, the randomized SVD's sketch size; with --rank: that rank)")
    e.add_argument("--include", help="only modules whose name matches this regular expression")
    e.add_argument("--exclude", help="skip modules whose name matches this regular expression")
    e.add_argument("--embeddings", default="skip", type=str.lower, choices=("skip", "lora", "full"),
                   help="embeddings and output heads (lm_head): skip (default), extract as LoRA, or keep whole "
                        "(modules_to_save); a layer tied to an extracted embedding (lm_head) gets the same")
    e.add_argument("--power-iters", type=_power_iters, default=2,
                   help="power iterations of the randomized SVD (default 2)")
    e.add_argument("--oversample", type=_oversample, default=10, help="extra sketch columns (default 10)")
    e.add_argument("--seed", type=_seed, default=0, help="seed of the random sketch (default 0)")
    e.add_argument("--dtype", type=_factor_dtype, metavar="{fp32,fp16,bf16}",
                   help="dtype of the written factors: fp32 (default), fp16 or bf16 (kohya's --save_precision); "
                   "computed in float32 and rounded once, to nearest even")
    e.add_argument("--conv-rank", type=_rank, help="kohya's --conv_dim: the rank of kxk convolutions (a kernel "
                   "dimension above 1), whatever the rule of the others (capped by --max-rank); default: the rule "
                   "(kohya without --conv_dim leaves them out: --exclude does that here)")
    e.add_argument("--clamp-quantile", type=_fraction, metavar="Q",
                   help="kohya's --clamp_quantile (0 < Q <= 1; kohya's default 0.99): clamp each module's factors "
                   "B = U S and A = V^T to [-h, h], h the Q-quantile of their entries; the reported error is then "
                   "the clamped factors' (default: no clamp, the optimal factors)")
    e.add_argument("--min-diff", type=_min_diff, metavar="F",
                   help="kohya's --min_diff (>= 0): a module whose largest |W_ft - W_base| is at most F counts as "
                   "unchanged, no LoRA (kohya applies it to the text encoder as a whole, lorafuse to each module; "
                   "default: only equal weights)")
    _progress_options(e)
    _dry_run_option(e, "the options, both checkpoints' headers, which weights are extracted, kept whole or left "
                    "out, the output path", "no weight is read, so ranks and bytes are upper bounds (an unchanged "
                    "weight is left out when run; a rule on singular values chooses at most the planned rank); ")

    v = sub.add_parser("convert", help="convert a diffusion LoRA between kohya and diffusers/PEFT naming, or an "
                       "LLM LoRA to GGUF for llama.cpp",
                       description=_paragraph("Convert a diffusion LoRA (SD 1.x/2.x, SDXL, Flux.1 / .2, Wan) between "
                       "kohya naming (lora_unet_..., one .safetensors file) and diffusers / PEFT naming (the file "
                       "diffusers' save_lora_weights writes), losslessly (but for a float32 rounding where parts with "
                       "different scales fuse, see below); LoHa / LoKr modules become LoRA with --rank. "
                       "--to gguf writes an LLM LoRA (PEFT) as a GGUF LoRA adapter for llama.cpp."),
                       epilog=_EPILOG_CONVERT, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("adapter", type=_path,
                   help="kohya / LyCORIS .safetensors file, or diffusers LoRA .safetensors file (or a "
                   "folder holding one); --to gguf: a PEFT adapter folder")
    v.add_argument("-o", "--out", type=_out, required=True,
                   help="output .safetensors file (--to gguf: .gguf file); a name "
                   "ending in / (or an existing folder) writes into it: pytorch_lora_weights.safetensors (--to "
                   "peft, what diffusers' load_lora_weights(folder) looks for) or the input's file name (--to "
                   "kohya; --to gguf: with .gguf)")
    _overwrite_option(v)
    v.add_argument("--to", required=True, type=_convert_target, choices=("peft", "kohya", "gguf"),
                   help="peft: diffusers / PEFT names (unet.down_blocks.0...); kohya: lora_unet_... names; gguf: "
                   "a llama.cpp GGUF LoRA adapter")
    arch = v.add_argument("--arch", type=_arch, metavar="ARCH",
                          help="--to gguf: the base model's architecture (default: from --base-config)")

    def complete_convert(parser: argparse.ArgumentParser) -> None:  # when convert's help or usage is shown
        arch.metavar = "{" + ",".join(_gguf_archs()) + "}"

    v.complete = complete_convert
    v.add_argument("--base-config", metavar="CONFIG", type=_path,
                   help="--to gguf: the base model's config.json (or its "
                   "folder): the architecture, the head counts Llama / Mistral q_proj and k_proj LoRAs need, "
                   "tie_word_embeddings")
    v.add_argument("--gguf-type", type=str.lower, choices=("f32", "f16", "bf16", "q8_0"),
                   help="--to gguf: tensor type (default f32, as llama.cpp's convert_lora_to_gguf.py; q8_0 "
                   "tensors whose rows are not a multiple of 32 are written f16, as it does)")
    v.add_argument("--rank", type=_rank, help="LoHa / LoKr modules: the rank of their LoRA approximation "
                   "(plain LoRA modules are not resized, see lorafuse resize: refused for an adapter without "
                   "LoHa / LoKr modules)")
    v.add_argument("--conv-rank", type=_rank, help="LoHa / LoKr kxk convolutions (k > 1): their rank "
                   "(default: --rank; refused for an adapter without them)")
    v.add_argument("--family", type=str.lower, choices=("sd1", "sdxl", "flux", "flux2", "wan"),
                   help="model family of the names (default: "
                   "guessed from names one family alone has: a diffusers Flux LoRA, "
                   "transformer.transformer_blocks..., whose names SD3, QwenImage, HunyuanVideo share, needs "
                   "--family flux; flux is Flux.1, flux2 Flux.2, told apart by the layers and MLP widths one of "
                   "them alone has; wan: Wan 2.1 / 2.2, only when given; sd1 covers SD 2.x too); for the "
                   "conversions that rename (kohya -> peft, diffusers -> kohya), refused where the modules are "
                   "another family's (a UNet's for flux)")
    v.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")
    vo = v.add_mutually_exclusive_group()
    vo.add_argument("--verbose", action="store_true", help="one line per LoHa / LoKr module converted")
    vo.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    _dry_run_option(v, "the options, the adapter, the names, the output path", "the modules split or fused "
                    "(LoHa / LoKr modules are converted in memory: what is written depends on their values); ")

    u = sub.add_parser("run", help="run a recipe (YAML): combine, apply, resize, extract in named stages",
                       description=_paragraph("Run a recipe: a YAML file whose fields follow mergekit's (merge_method, "
                       "base_model, models[].model, models[].parameters.weight / density, parameters, dtype). Each "
                       "stage runs as the matching lorafuse command would; several YAML documents (---) are named "
                       "stages run in order, a later one naming an earlier one's output by its name; the last writes "
                       "-o. Every stage is checked before the first runs; errors name the line and field. Values "
                       "are read by YAML 1.2's core schema, as the command line reads numbers (1e-3 is a number, 010 "
                       "is 10; 1_5, yes, on and dates are text). The recipe is recorded verbatim in the output's "
                       "model card and metadata."),
                       epilog=_EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("recipe", nargs="?", type=_path,
                   help="the recipe file (.yml / .yaml); relative model paths are taken from its "
                   "folder (the folder of the path given: for a symbolic link, the link's, not its target's); a model "
                   "may also be a Hub id, org/name or org/name@revision")
    u.add_argument("-o", "--out", type=_out, help="output of the last stage (what its verb's -o takes)")
    _overwrite_option(u)
    u.add_argument("--dry-run", action="store_true", help="check the recipe and print each stage's plan (modules, "
                   "ranks, sizes, where it writes: DIR/NAME with --intermediate-dir); write nothing. A stage that "
                   "reads an earlier stage's output is planned when run")
    u.add_argument("--intermediate-dir", metavar="DIR", type=_intermediate_dir,
                   help="write the outputs of the stages before the last into "
                   "DIR/NAME and keep them (default: a temporary folder beside -o, removed at the end)")
    u.add_argument("--print-schema", action="store_true", help="print the JSON schema of a recipe stage and exit "
                   "(given alone: with a recipe or -o it is refused)")
    u.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")
    u.add_argument("--device", type=_device, choices=("cpu", "cuda"), help="where every stage's math runs, as its "
                   "verb's --device: cpu (the default) or cuda, one NVIDIA GPU (needs a lorafuse built with CUDA: "
                   "docs/building.md)")
    _progress_options(u, "; each stage draws its own: apply, combine (streamed), resize, extract")
    u.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    u.add_argument("--json", action="store_true", help="print one JSON object for machines: the output, and per "
                   "stage its command line, output, seconds and its verb's own --json report (with --dry-run: "
                   "its plan)")

    i = sub.add_parser("info", help="describe an adapter, a checkpoint or a pipeline",
                       description="Describe an adapter (modules, ranks, alphas, scales, dtypes, parameters,\n"
                       "exact ||delta||_F per module from the factors): a PEFT adapter folder, a kohya /\n"
                       "LyCORIS .safetensors file (LoRA, LoCon, LoHa, LoKr, DoRA), a diffusers LoRA\n"
                       ".safetensors file or a folder holding one (pytorch_lora_weights.safetensors);\n"
                       "or a safetensors checkpoint (one file, a folder, sharded with an index), or a\n"
                       "diffusers pipeline folder (model_index.json), per component.",
                       epilog=_EPILOG_INFO, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("path", type=_path,
                   help="an adapter (PEFT folder, kohya / LyCORIS or diffusers LoRA .safetensors file, or a "
                   "folder holding one), a checkpoint (.safetensors file or folder) or a diffusers pipeline folder")
    shown = i.add_mutually_exclusive_group()  # --json lists every module already: --modules would do nothing
    shown.add_argument("--json", action="store_true", help="print JSON for machines (every module)")
    shown.add_argument("--modules", action="store_true", help="list every module of an adapter or a GGUF file "
                       "(default: the 10 with the largest ||delta||_F)")
    i.add_argument("--spectrum", metavar="IMAGE", type=_out,
                   help="adapters: also plot the singular values of every module's "
                   "delta, per module type, to this file, in the format its suffix names: .png, .svg, .pdf, .jpg "
                   "or .jpeg (other suffixes are refused before any work; needs matplotlib: pip install "
                   "lorafuse[plot])")
    _overwrite_option(i, "the --spectrum file")
    i.add_argument("--threads", type=_threads, default=0, help="worker threads (default 0: all cores)")
    return p


def _cmd_apply(args: argparse.Namespace) -> int:
    from lorafuse._progress import TqdmBar
    from lorafuse.ops.apply import apply

    if args.dry_run:
        from lorafuse.ops.plan import plan_apply

        return _show_plan(args, plan_apply(
            args.base, args.adapters, args.weights, args.out, dtype=args.dtype, threads=args.threads,
            max_shard_size=args.max_shard_size, skip_missing=args.skip_missing, overwrite=args.overwrite,
            device=args.device, requantize=args.requantize))
    draw = _progress_of(args)
    bar = TqdmBar("apply", sys.stderr) if draw or (draw is None and sys.stderr.isatty()) else None
    try:
        report = apply(args.base, args.adapters, args.weights, args.out, dtype=args.dtype, threads=args.threads,
                       max_shard_size=args.max_shard_size, progress=bar if bar is not None else False,
                       allow_nonfinite=args.allow_nonfinite, skip_missing=args.skip_missing,
                       overwrite=args.overwrite, device=args.device, requantize=args.requantize)
    finally:
        if bar is not None:
            bar.close()
    for note in report.notes:  # (-q: kept for --json, not said)
        _note(args, note)
    summary = (f"merged {plural(len(report.merged), 'weight')}"
               + (f", replaced {len(report.replaced)}" if report.replaced else "")
               + (f", updated {plural(len(report.biases), 'bias', 'biases')}" if report.biases else "")
               + f"; wrote {plural(report.tensors, 'tensor')} ({human_bytes(report.bytes_written)}) to {report.out} "
               f"in {report.seconds:.2f} s")
    if not args.quiet and not args.json:
        _say(summary)
        _say_requantized(report.requantized, args.verbose)
        if args.verbose and not report.requantized:  # said, not silently ignored
            _note(args, "--verbose lists the weights of a quantized base that are quantized again (--requantize, or "
                  "FP8), and this merge quantized none: it printed nothing more")
    if args.json:
        _say(_json_text({"summary": summary, "out": str(report.out), "merged": report.merged,
                         "replaced": report.replaced,
                         "biases": report.biases, "tensors": report.tensors, "bytes": report.bytes_written,
                         "seconds": report.seconds, "notes": _json_notes(args, *report.notes),
                         "requantized": report.requantized},
                        indent=2, allow_nan=False))
    return 0


def _say_requantized(errors: dict[str, dict[str, float]], verbose: bool) -> None:
    """Weights of a quantized base merged and quantized again: the largest error, or (verbose) each one's."""
    if not errors:
        return
    worst = max(errors, key=lambda n: errors[n]["rel_fro_error"])
    _say(f"quantized {plural(len(errors), 'merged weight')} again; largest relative error (Frobenius, vs the float32 "
         f"merge) {errors[worst]['rel_fro_error']:.3g} in {worst}" + ("" if verbose else " (--verbose: each)"))
    if verbose:
        for name, e in errors.items():
            _say(f"  {name}: max |error| {e['max_abs_error']:.4g}, relative {e['rel_fro_error']:.4g}")


def _cmd_combine(args: argparse.Namespace) -> int:
    from lorafuse.formats import load
    from lorafuse.ops.combine import CombineOptions, combine_to
    from lorafuse.ops.outputs import checked_output

    start = time.monotonic()
    options = CombineOptions(method=args.method, rank=args.rank, conv_rank=args.conv_rank, density=args.density,
                             majority_sign=args.majority_sign, seed=args.seed, split=args.split,
                             threads=args.threads, exact=args.exact, dtype=args.dtype, device=args.device,
                             engine=args.engine, passes=args.passes, progress=_progress_of(args),
                             ray_address=args.ray_address, oversample=args.oversample)
    if args.from_list is not None:
        from pathlib import Path

        from lorafuse.ops.combine.many import read_list

        if args.adapters or args.weights is not None:
            raise LorafuseValueError("--from-list names the adapters and their weights: give no adapters and no "
                                     "--weights beside it")
        sources, weights = read_list(args.from_list)
        inputs = [s.path for s in sources if s.path is not None] + [Path(args.from_list)]  # the list is one too
        try:  # the output's format and name; every adapter is checked before any work
            loaded = [load(inputs[0])]
        except LorafuseError as e:
            raise type(e)(f"{sources[0].where}: {e}") from None
        count: int = len(sources)
        items: Sequence[object] = sources
    else:
        if not args.adapters:
            raise LorafuseValueError("give the adapters to combine, or --from-list LIST")
        loaded = [load(a) for a in args.adapters]
        inputs = [p for a in loaded for p in a.sources()]
        count, items, weights = len(loaded), loaded, args.weights
        if args.engine == "ray":  # Ray tasks open each adapter by its path (a Hub id: its local snapshot)
            from lorafuse.ops.combine.many import Source

            items = [Source(a.path, f"adapter {i} ({name})") if a.path is not None else a
                     for i, (a, name) in enumerate(zip(loaded, args.adapters), 1)]
    if args.from_list is None and options.method != "cat":  # adapters of two models (or two namings) before the
        from lorafuse.model.arithmetic import check_shared  # output's format is judged on them: the cause first

        check_shared(loaded, f"combine --method {options.method}")
    # what the name means (a .safetensors name is one file; a folder name for a one-file format: a file in it)
    try:
        target = checked_output(args.out, args.format or loaded[0].format, loaded, inputs,  # before the work
                                asked=f"--format {args.format}" if args.format else None, overwrite=args.overwrite)
    except OutputError:
        if args.from_list is not None:  # a listed path that is no adapter (`/`, which holds any output): that first
            _refuse_non_adapters(items)
        raise
    if args.dry_run:
        from lorafuse.ops.plan import plan_combine

        plan = plan_combine(items, weights, options, target.path, target.format,  # type: ignore[arg-type]
                            overwrite=args.overwrite)
        plan.notes += [target.note] if target.note else []
        return _show_plan(args, plan)
    # streamed: each group of modules is written as it is computed (never over an input)
    report = combine_to(items, weights, options, target.path, target.format,  # type: ignore[arg-type]
                        overwrite=args.overwrite)
    if target.note:  # (-q: kept for --json, not said: _note)
        _note(args, target.note)
    if (args.seed != 0 and not args.method.startswith("dare") and report.engine == "memory"
            and not report.randomized):  # the seed of the randomized SVDs, and none ran: said, not silently ignored
        _note(args, f"--seed {args.seed} changed nothing: every module took the exact SVD, which draws no random "
              "sketch (a module takes a randomized one where it is cheaper, or under --engine stream)")
    if args.json:
        _say(_json_text(_combine_json(args, report, count, time.monotonic() - start, target.note), indent=2,
                        allow_nan=False))
    elif not args.quiet:
        ranks = sorted(set(report.ranks.values()))
        _say(f"combined {plural(count, 'adapter')} with {args.method}: {plural(len(report), 'module')}, "
              f"rank {'/'.join(map(str, ranks))}; wrote {report.out} in {time.monotonic() - start:.2f} s")
        if report.summary is not None:
            for line in report.summary.lines():
                _say(line)
        elif count > 1:
            _say("  engine: memory (every adapter mapped at once; --engine stream reads them one at a time)")
        if report.randomized and report.summary is None:
            hint = " (--exact forces the exact SVD)" if args.method == "svd" else ""
            _say(f"  {len(report.randomized)} of {plural(len(report), 'module')} took a randomized SVD (near-optimal)"
                  f"{hint}: {', '.join(report.randomized[:3])}{', ...' if len(report.randomized) > 3 else ''}")
    return 0


def _refuse_non_adapters(sources: Sequence[Any]) -> None:
    """The error of the first of a list's adapters (many.Source) that is not an adapter, naming its line."""
    from lorafuse.formats import detect_format

    for s in sources:
        if s.path is not None:
            try:
                detect_format(s.path)
            except LorafuseError as e:
                raise type(e)(f"{s.where}: {e}") from None


def _combine_json(args: argparse.Namespace, report: Any, count: int, seconds: float,
                  note: str | None) -> dict[str, object]:
    """combine --json: the CombineReport, with the streamed engine's summary (null in memory)."""
    import dataclasses

    summary = None
    if report.summary is not None:
        summary = {**dataclasses.asdict(report.summary), "seconds_per_adapter": report.summary.seconds_per_adapter}
    return {"out": str(report.out), "method": args.method, "adapters": count,
            "modules": [{"name": n, "rank": r} for n, r in report.ranks.items()], "randomized": report.randomized,
            "dtype": report.dtype, "seconds": seconds, "engine": report.engine, "summary": summary,
            "notes": _json_notes(args, *report.notes, *([note] if note else []))}


def _cmd_resize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorafuse.formats import load
    from lorafuse.ops.outputs import checked_output
    from lorafuse.ops.resize import resize

    start = time.monotonic()
    if args.dry_run:
        from lorafuse.ops.plan import plan_resize

        return _show_plan(args, plan_resize(
            args.adapter, args.rank, sv_ratio=args.sv_ratio, sv_fro=args.sv_fro, sv_cumulative=args.sv_cumulative,
            max_rank=args.max_rank, split=args.split, threads=args.threads, dtype=args.dtype, out=args.out,
            overwrite=args.overwrite, device=args.device))
    adapter = load(args.adapter)
    # what the name means, and what it holds: before the work
    target = checked_output(args.out, adapter.format, [adapter], adapter.sources(), overwrite=args.overwrite)
    result, report = resize(adapter, _rule(args), args.split, args.threads,
                            progress=_progress_of(args), dtype=args.dtype,
                            device=args.device)
    result.save(target.path, target.format, overwrite=args.overwrite)
    if target.note:  # (-q: kept for --json, not said: _note)
        _note(args, target.note)
    if (args.rank is not None and report and all(m.rank_out >= m.rank_in <= args.rank
                                                 for m in report)):  # (a --max-rank below the ranks reduces them)
        _note(args, f"every module's rank is {args.rank} or less already (at most {max(m.rank_in for m in report)}): "
              "nothing was reduced; the factors are rewritten (balanced by the SVD)")
    rows = [{"name": m.name, "rank_in": m.rank_in, "rank": m.rank_out, "fro_kept": m.fro_kept} for m in report]
    kept = [m.fro_kept for m in report]
    ranks = [m.rank_out for m in report]
    summary = (f"resized {plural(len(report), 'module')} of {Path(args.adapter)} ({_rule(args).describe()}): ranks "
               f"{min(ranks, default=0)}..{max(ranks, default=0)} (mean {fmean(ranks) if ranks else 0:.1f}), "
               f"Frobenius norm kept min {min(kept, default=1):.4f} / mean {fmean(kept) if kept else 1:.4f}; "
               f"wrote {target.path} in {time.monotonic() - start:.2f} s")
    _print_rank_report(args, rows, summary, "fro_kept", out=target.path, seconds=time.monotonic() - start)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorafuse.ops.extract import extract, kohya_named
    from lorafuse.ops.outputs import extract_output, save_as

    start = time.monotonic()
    if args.dry_run:
        from lorafuse.ops.plan import plan_extract

        return _show_plan(args, plan_extract(
            args.base, args.finetuned, args.out, rank=args.rank, sv_ratio=args.sv_ratio, sv_fro=args.sv_fro,
            sv_cumulative=args.sv_cumulative, max_rank=args.max_rank, include=args.include, exclude=args.exclude,
            embeddings=args.embeddings, oversample=args.oversample, power_iters=args.power_iters, seed=args.seed,
            threads=args.threads, overwrite=args.overwrite, device=args.device, dtype=args.dtype,
            clamp_quantile=args.clamp_quantile, min_diff=args.min_diff, conv_rank=args.conv_rank))
    inputs = [Path(args.base), Path(args.finetuned)]
    # what the name means (a .safetensors name is one file, if a one-file format can name the base's modules) and
    # what it holds: first
    target = extract_output(args.out, args.base, args.finetuned, args.include, args.exclude, overwrite=args.overwrite)
    res = extract(args.base, args.finetuned, _rule(args), include=args.include, exclude=args.exclude,
                  embeddings=args.embeddings, oversample=args.oversample, power_iters=args.power_iters,
                  seed=args.seed, threads=args.threads, progress=_progress_of(args),
                  device=args.device, dtype=args.dtype, clamp_quantile=args.clamp_quantile, min_diff=args.min_diff,
                  conv_rank=args.conv_rank)
    if target.format == "kohya":  # a kohya file from single-file SD checkpoints: kohya's names
        res = kohya_named(res, args.base, args.finetuned)
    save_as(res.adapter, target.format, target.path, inputs, overwrite=args.overwrite)
    if target.note:  # (-q: kept for --json, not said: _note)
        _note(args, target.note)
    rows = [{"name": m.name, "shape": list(m.shape), "rank": m.rank, "rel_error": m.rel_error,
             "singular_values": m.singular_values} for m in res.modules]
    errs = [m.rel_error for m in res.modules]
    ranks = [m.rank for m in res.modules]
    rule = _rule(args).describe() + (f", conv-rank {args.conv_rank}" if args.conv_rank is not None else "")
    summary = (f"extracted {plural(len(res.modules), 'module')} ({rule}): ranks "
               f"{min(ranks, default=0)}..{max(ranks, default=0)}, relative error mean "
               f"{fmean(errs) if errs else 0:.4f} / max {max(errs, default=0):.4f}; {res.unchanged} unchanged; "
               f"{len(res.adapter.full)} kept whole; wrote {target.path} in {time.monotonic() - start:.2f} s")
    if res.skipped and not args.quiet:  # on stderr with --json too, as every verb's notes (the JSON lists all)
        for line in res.skipped[:10]:
            _say(f"note: not extracted: {line}", file=sys.stderr)
        if len(res.skipped) > 10:
            _say(f"note: ... and {len(res.skipped) - 10} more", file=sys.stderr)
    if not args.quiet:
        for line in res.notes:
            _say(f"note: {line}", file=sys.stderr)
    _print_rank_report(args, rows, summary, "rel_error", [*(f"not extracted: {line}" for line in res.skipped),
                                                          *res.notes], out=target.path,
                       seconds=time.monotonic() - start)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from lorafuse.formats import load
    from lorafuse.ops.convert import convert
    from lorafuse.ops.outputs import adapter_output

    start = time.monotonic()
    adapter = load(args.adapter)
    if args.to == "gguf":
        return _convert_gguf(args, adapter, start)
    gguf_only = [o for o, v in (("--arch", args.arch), ("--base-config", args.base_config),
                                ("--gguf-type", args.gguf_type)) if v is not None]
    if gguf_only:
        raise LorafuseValueError(f"{', '.join(gguf_only)}: for --to gguf only")
    # a name ending in / (or an existing folder): the file inside it
    out = adapter_output(args.out, "diffusers" if args.to == "peft" else "kohya", [adapter], adapter.sources()).path
    if args.dry_run:
        from lorafuse.ops.plan import plan_convert

        return _show_plan(args, plan_convert(adapter, out, to=args.to, rank=args.rank, conv_rank=args.conv_rank,
                                             family=args.family, threads=args.threads, overwrite=args.overwrite))
    rep = convert(adapter, out, to=args.to, rank=args.rank, conv_rank=args.conv_rank,
                  family=args.family, threads=args.threads, overwrite=args.overwrite)
    rows = [{"name": m.name, "algo": m.algo, "shape": list(m.shape), "rank": m.rank, "fro_kept": m.fro_kept}
            for m in rep.lycoris]
    kept = [m.fro_kept for m in rep.lycoris]
    summary = (f"converted {plural(rep.modules_in, 'module')} of {args.adapter} to {args.to}"
               + (f" ({rep.family} names)" if rep.family else "") + f": {plural(rep.modules_out, 'module')}"
               + (f", {len(rep.split)} split" if rep.split else "") + (f", {len(rep.fused)} fused" if rep.fused else "")
               + (f"; {len(kept)} LoHa / LoKr modules to LoRA, Frobenius norm kept min {min(kept):.4f} / mean "
                  f"{fmean(kept):.4f}" if kept else "")
               + f"; wrote {rep.out} in {time.monotonic() - start:.2f} s")
    for note in rep.notes:  # on stderr unless -q, --json too; kept for --json's notes either way
        _note(args, note)
    if args.json:
        _say(_json_text({"summary": summary, "out": str(rep.out), "family": rep.family, "split": rep.split,
                         "fused": rep.fused, "modules": rows, "seconds": time.monotonic() - start,
                         "notes": _json_notes(args)}, indent=2, allow_nan=False))
    elif not args.quiet:
        if args.verbose:
            width = max((len(m.name) for m in rep.lycoris), default=6)
            for m in rep.lycoris:
                _say(f"{m.name:<{width}}  {m.algo:<4}  rank {m.rank:>4}  fro_kept {m.fro_kept:.6f}")
            _verbose_unused(args, rep.lycoris)
        _say(summary)
    return 0


def _verbose_unused(args: argparse.Namespace, converted: Sequence[object]) -> None:
    """convert --verbose with no LoHa / LoKr module to list: said, not silently ignored."""
    if not converted:
        _note(args, f"--verbose lists the LoHa / LoKr modules converted to LoRA, and {args.adapter} has none: it "
              "printed nothing more")


def _convert_gguf(args: argparse.Namespace, adapter: Any, start: float) -> int:
    """convert --to gguf: the summary (and notes: folded scales, F16 fallbacks, left-out tensors)."""

    from lorafuse.ops.convert import convert, output_path

    out = output_path(args.out, "gguf", adapter)  # a name ending in / (or an existing folder): the file inside it
    if args.dry_run:
        from lorafuse.ops.plan import plan_convert

        return _show_plan(args, plan_convert(adapter, out, to="gguf", rank=args.rank, conv_rank=args.conv_rank,
                                             family=args.family, threads=args.threads, overwrite=args.overwrite,
                                             arch=args.arch, base_config=args.base_config, gguf_type=args.gguf_type))
    rep = convert(adapter, out, to="gguf", rank=args.rank, conv_rank=args.conv_rank, family=args.family,
                  threads=args.threads, overwrite=args.overwrite, arch=args.arch, base_config=args.base_config,
                  gguf_type=args.gguf_type)
    ranks = sorted(set(rep.ranks.values()))
    summary = (f"converted {plural(rep.modules_in, 'module')} of {args.adapter} to a {rep.gguf_type} GGUF LoRA for "
               f"llama.cpp ({rep.arch}): {plural(rep.modules_out, 'module')}, rank {'/'.join(map(str, ranks))}, alpha "
               f"{rep.alpha:g}" + (f", {len(rep.folded)} with the scale folded into lora_b" if rep.folded else "")
               + (f"; {len(rep.lycoris)} LoHa / LoKr modules to LoRA" if rep.lycoris else "")
               + f"; wrote {rep.out} in {time.monotonic() - start:.2f} s")
    for note in rep.notes:  # on stderr unless -q, --json too; kept for --json's notes either way
        _note(args, note)
    if args.json:
        rows = [{"name": m.name, "algo": m.algo, "shape": list(m.shape), "rank": m.rank, "fro_kept": m.fro_kept}
                for m in rep.lycoris]
        _say(_json_text({"summary": summary, "out": str(rep.out), "arch": rep.arch, "gguf_type": rep.gguf_type,
                         "alpha": rep.alpha, "ranks": rep.ranks, "folded": rep.folded, "fallback_f16": rep.fallback,
                         "seconds": time.monotonic() - start, "notes": _json_notes(args), "modules": rows},
                        indent=2, allow_nan=False))
    elif not args.quiet:
        if args.verbose:
            for m in rep.lycoris:
                _say(f"{m.name}  {m.algo}  rank {m.rank}  fro_kept {m.fro_kept:.6f}")
            _verbose_unused(args, rep.lycoris)
        _say(summary)
    return 0


def _cmd_similarity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorafuse.formats import load
    from lorafuse.io.provenance import path_text
    from lorafuse.ops.similarity import (
        LEFT_OUT_NOTE,
        ZERO_NOTE,
        left_out_notes,
        similarity,
        unshared_notes,
        unshared_pairs,
        zero_notes,
    )

    if args.overwrite and not args.plot:  # what it replaces is the plot: said, not ignored
        raise LorafuseValueError("--overwrite replaces the --plot file, and no --plot was given: similarity writes "
                                 "nothing else; leave --overwrite out, or add --plot IMAGE")
    if args.plot:  # before the work: a refused plot path (or image format) costs nothing
        from lorafuse.plot import check_plot_output

        check_plot_output(args.plot, [Path(a) for a in args.adapters], args.overwrite)
    loaded = [load(a) for a in args.adapters]
    with warnings.catch_warnings():  # its notes of unshared pairs are printed below, with the given names
        warnings.filterwarnings("ignore", message="(?s).* share no module", category=UserWarning)  # (?s): a path's \n
        warnings.filterwarnings("ignore", message=f"(?s).*: {ZERO_NOTE} ", category=UserWarning)
        warnings.filterwarnings("ignore", message=f"(?s).* {LEFT_OUT_NOTE} ", category=UserWarning)
        cos = similarity(loaded, args.threads)
    labels = [str(a) for a in args.adapters]
    zero = [i for i in range(len(loaded)) if cos[i, i] == 0]  # a zero delta: a diagonal of 0, not 1
    notes = unshared_notes(loaded, labels) + zero_notes(loaded, zero, labels)  # a 0 that measures nothing: said
    notes += left_out_notes(loaded, labels)  # full tensors (modules_to_save) that the cosines leave out: said
    drawn = None
    if args.plot:  # before the matrix is printed: a plot that fails (a full disk) leaves no report of a success
        from lorafuse.plot import plot_similarity

        drawn = plot_similarity(cos, labels, args.plot, [Path(a) for a in args.adapters], overwrite=args.overwrite)
    if args.json:
        _say(_json_text({"adapters": [path_text(a) for a in args.adapters], "cosine": cos.round(8).tolist(),
                         "share_no_module": [list(pair) for pair in unshared_pairs(loaded)],
                         "notes": _json_notes(args, *notes)}, indent=2))
    else:
        shown = [_one_line(path_text(x)) for x in labels]  # as info shows them (\xNN, \n): the columns line up
        width = max(len(x) for x in shown)
        _say(" " * width + "  " + " ".join(f"{i:>8d}" for i in range(len(shown))))
        for i, (label, row) in enumerate(zip(shown, cos)):
            _say(f"{label:<{width}}  " + " ".join(f"{v:8.4f}" for v in row) + f"   [{i}]")
    for note in notes:
        _say(f"note: {_one_line(note)}", file=sys.stderr)  # (stderr: --json stays JSON)
    if drawn is not None:
        _say(f"wrote the heat map to {drawn}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _one_line(text: object) -> str:
    """`text` as one line of the output: a line break in it (a file named `a\\nnote: ...`) escaped, so that
    no part of a name passes for a line, a row or a note of its own."""
    return printable(text, keep_newlines=False)


def _print_info(d: dict[str, Any], modules: bool) -> None:
    if d["type"] == "pipeline":
        _say(f"pipeline    {_one_line(d['path'])}")
        for name, comp in d["components"].items():
            _say(f"  {name}: {comp['tensors']} tensors, {comp['parameters']:,} parameters, "
                  f"{human_bytes(comp['bytes'])}, {', '.join(f'{k}: {v}' for k, v in comp['dtypes'].items())}")
            if comp.get("quantization"):
                q = comp["quantization"]
                _say(f"    quantized {q['method']} ({q['scheme'] or 'not supported by lorafuse apply'})")
            for note in comp.get("notes", []):
                _say(f"    note: {note}")
        for name, why in d.get("not_read", {}).items():
            _say(f"  {name}: not read: {why}")
        return
    if d["type"] == "gguf":
        what = "LoRA adapter" if d["kind"] == "adapter" and d["adapter_type"] == "lora" else \
            str(d["kind"] or "no general.type")
        _say(f"gguf        {_one_line(d['path'])}  ({what}, llama.cpp)")
        _say(f"  arch        {d['architecture']}")
        if d["lora_alpha"] is not None:
            _say(f"  lora_alpha  {d['lora_alpha']:g}")
        _say(f"  tensors     {d['tensors']} ({', '.join(f'{k}: {v}' for k, v in d['tensor_types'].items())})")
        if d["modules"]:
            _say(f"  modules     {len(d['modules'])}, ranks {', '.join(f'r={k}: {v}' for k, v in d['ranks'].items())}")
            shown = d["modules"] if modules else d["modules"][:10]
            width = max(len(printable(m["name"])) for m in shown)  # as printed: escaped
            for m in shown:
                _say(f"    {printable(m['name']):<{width}}  r={m['rank']:<4} shape={tuple(m['shape'])}  "
                     f"{'/'.join(m['types'])}")
            if len(d["modules"]) > len(shown):
                _say(f"    ... {len(d['modules']) - len(shown)} more (--modules lists all)")
        if d["written_by_lorafuse"]:
            _say(f"  made by     lorafuse {d['written_by_lorafuse']} (convert --to gguf)")
        for note in d.get("notes", []):
            _say(f"  note: {note}")
        return
    if d["type"] == "checkpoint":
        _say(f"checkpoint  {_one_line(d['path'])}")
        _say(f"  shards      {len(d['shards'])}{' (indexed)' if d['sharded'] else ''}")
        _say(f"  tensors     {d['tensors']}")
        _say(f"  parameters  {d['parameters']:,}")
        _say(f"  size        {human_bytes(d['bytes'])}")
        _say(f"  dtypes      {', '.join(f'{k}: {v}' for k, v in d['dtypes'].items())}")
        q = d.get("quantization")
        if q:
            how = q["scheme"] if q["supported"] else f"not supported by lorafuse apply: {q['why']}"
            _say(f"  quantized   {q['method']} ({how}; from {q['source']})")
        for note in d.get("notes", []):
            _say(f"  note: {note}")
        return
    _say(f"adapter     {_one_line(d['path'])}  ({d['format']})")
    _say(f"  modules     {d['modules']}")
    # a LoKr of two full halves has no rank (r=full in the module list): counted too, so the line is never empty
    full = sum(1 for m in d["module_details"] if m["rank"] is None and m["scale"] is not None)
    ranks = [f"r={k}: {v}" for k, v in d["ranks"].items()] + ([f"r=full: {full}"] if full else [])
    _say(f"  ranks       {', '.join(ranks)}")
    _say(f"  lora_alpha  {d['lora_alpha']}{'  (rslora)' if d['use_rslora'] else ''}")
    _say(f"  scales      {', '.join(f'{s:g}' for s in d['scales'])}")
    _say(f"  dtypes      {', '.join(f'{k}: {v}' for k, v in d['dtypes'].items())}")
    _say(f"  parameters  {d['parameters']:,}")
    if d["dora"]:
        _say("  DoRA        yes")
    biased = sum(1 for m in d["module_details"] if m.get("bias"))
    if biased:  # PEFT lora_bias: a merge changes these modules' biases too (their norms below are the weights')
        _say(f"  lora_bias   {biased} module{'s' if biased != 1 else ''} with a lora_B bias (a merge adds scale x "
             "bias to the base bias; ||delta||_F is the weight's)")
    if d["full_tensors"]:
        kinds: dict[str, list[str]] = {}
        for key, kind in d["full_tensor_kinds"].items():
            kinds.setdefault(kind, []).append(key)
        _say(f"  full tensors {'; '.join(f'({kind}): ' + ', '.join(keys) for kind, keys in kinds.items())}")
    details: list[dict[str, Any]] = d["module_details"]
    # a parameter LoRA (fused experts) has no norm without its base: listed after the others
    # a norm that is not finite (factors holding NaN / Inf) first: it needs looking at, and NaN does not sort
    shown = details if modules else sorted(details, key=_by_norm)[:10]
    _say("  module" + ("s" if modules else "s with the largest ||delta||_F") + ":")
    width = max((len(printable(m["name"])) for m in shown), default=10)  # as printed: escaped
    for m in shown:
        r, scale = ("?", "?") if m["scale"] is None else (  # a LoRA on a parameter: needs the base
            "full" if m["rank"] is None else m["rank"], format(m["scale"], "g"))  # (a LoKr of two full halves)
        _say(f"    {printable(m['name']):<{width}}  {m['kind']:<9} r={r:<4} scale={scale:<8} "
              f"shape={tuple(m['shape'])}  ||delta||_F={_norm_text(m)}")
    if not modules and len(details) > len(shown):
        _say(f"    ... {len(details) - len(shown)} more (--modules lists all)")


def _by_norm(m: dict[str, Any]) -> tuple[int, float]:
    """Sort key of `info`'s module lines: norms that are not finite first, then the largest; none (a norm that
    needs the base) last."""
    v = m["delta_norm"]
    if v is None:
        return 2, 0.0
    return (1, -float(v)) if math.isfinite(v) else (0, 0.0)


def _norm_text(m: dict[str, Any]) -> str:
    """A module's ||delta||_F in `info`'s lines, and what its factors hold when it is not finite."""
    v = m["delta_norm"]
    if v is None:
        return "n/a (needs the base)"
    held = m.get("nonfinite")
    return format(v, ".6g") + (f" (its factors hold {held})" if held else "")


def _cmd_info(args: argparse.Namespace) -> int:
    from lorafuse.ops.info import adapter_path, alpha_text, describe, json_ready

    if args.overwrite and not args.spectrum:  # what it replaces is the plot: said, not ignored
        raise LorafuseValueError("--overwrite replaces the --spectrum file, and no --spectrum was given: info writes "
                                 "nothing else; leave --overwrite out, or add --spectrum IMAGE")
    if args.spectrum:  # before the work: a refused plot path (or image format) costs nothing
        from pathlib import Path

        from lorafuse.plot import check_plot_output

        check_plot_output(args.spectrum, [Path(args.path)], args.overwrite)
    d = describe(args.path, args.threads)
    if args.spectrum and d["type"] != "adapter":  # a GGUF LoRA too: its factors are llama.cpp's, quantized maybe
        raise LorafuseValueError(f"--spectrum needs an adapter; {args.path} is a {d['type']}")
    plotted = None
    if args.spectrum:  # a DoRA or parameter LoRA refused before the description is printed, as a bad path is
        from lorafuse.formats import load
        from lorafuse.plot import refuse_unplottable

        plotted = load(adapter_path(args.path) or args.path)
        refuse_unplottable(plotted)
    if args.modules and d["type"] not in ("adapter", "gguf"):  # said, not ignored: its description lists none
        raise LorafuseValueError(f"--modules lists an adapter's modules; {args.path} is a {d['type']}, described "
                                 "in full without it: leave --modules out")
    drawn = None
    if args.spectrum and plotted is not None:  # before the description: a plot that fails leaves no report
        from lorafuse.plot import plot_spectrum

        drawn = plot_spectrum(plotted, args.spectrum, args.threads, overwrite=args.overwrite)
    if args.json:  # numbers as JSON numbers; a non-finite one (NaN has no JSON form) as null
        listed = d.get("notes")  # a checkpoint's (on stdout in the text form)
        own = [str(n) for n in listed] if isinstance(listed, list) else []
        shown: dict[str, Any] = {**json_ready(d), "notes": _json_notes(args, *own)}  # type: ignore[dict-item]
        _say(_json_text(shown, indent=2, allow_nan=False))
    else:
        _print_info({**d, "lora_alpha": alpha_text(d)} if d["type"] == "adapter" else d, args.modules)
        from lorafuse.io.provenance import describe_lines

        for line in describe_lines(d.get("provenance")):  # how lorafuse made it, when it did
            _say(line)
    if drawn is not None:
        _say(f"wrote the singular value plot to {drawn}", file=sys.stderr if args.json else sys.stdout)
    return 0


@contextmanager
def _notes(args: argparse.Namespace) -> Iterator[None]:
    """The API's warnings as notes on stderr: --overwrite names each replaced output that lorafuse did not
    write (OverwriteWarning, even with -q); what loading an adapter decided (AdapterNote: tensors PEFT
    ignores, ...) unless -q (apply lists those in its report), kept for --json's "notes" too, with -q as well.
    Other warnings go where they went."""
    import warnings

    from lorafuse.errors import AdapterNote, OverwriteWarning

    adapter_notes = args.command != "apply"  # (-q: kept for --json, not said: _note)
    with warnings.catch_warnings():
        warnings.simplefilter("always", OverwriteWarning)
        warnings.simplefilter("always" if adapter_notes else "ignore", AdapterNote)
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
            if issubclass(category, AdapterNote) and str(message) in args.__dict__.get(_SHOWN, ()):
                return  # an adapter loaded again (combine's header pass, then its engine): its notes said once
            if issubclass(category, (OverwriteWarning, AdapterNote)):
                _note(args, message, always=issubclass(category, OverwriteWarning))
            else:
                shown(message, category, *rest, **kw)

        warnings.showwarning = show
        yield


class _Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP: the terminal closed, an ssh session dropped), raised in the main thread so that temporary
    outputs are removed on the way out."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.status = 128 + self.signum
        self.name = signal.Signals(signum).name


def _on_sigterm(signum: int, frame: object) -> None:
    _watch_stop(128 + int(signum), signal.Signals(signum).name)
    raise _Terminated(signum)


def _on_sigint(signum: int, frame: object) -> None:
    _watch_stop(130, "Ctrl-C (SIGINT)")
    raise KeyboardInterrupt


STOP_GRACE_ENV = "LORAFUSE_STOP_GRACE"  # seconds a stopped command has to unwind (default 20)
_WATCHING: list[bool] = []
_ARMED: list[bool] = []  # the process is the lorafuse command (lorafuse_entry): it may end itself (_watch_stop)


def arm_stop_watch() -> None:
    """Let a stop end this process if it hangs (_watch_stop): called by the console script and `python -m lorafuse`,
    never by main() itself, so that a program (or a test) calling main() is not ended from under it."""
    _ARMED.append(True)


def _stop_grace() -> float:
    try:
        grace = float(os.environ.get(STOP_GRACE_ENV, "20"))
    except ValueError:
        return 20.0
    return grace if math.isfinite(grace) and grace > 0 else 20.0


def _watch_stop(status: int, name: str) -> None:
    """Once per process: a daemon thread that ends the process if it still runs STOP_GRACE seconds after a stop
    (SIGTERM, SIGHUP, Ctrl-C), having removed the temporary outputs (io.atomic.emergency_cleanup). Python raises a
    stop in the main thread between two bytecodes; one that lands inside a lock's acquire-release pair (those of
    concurrent.futures' futures: CPython gh-74174) leaves the lock held, and the worker threads then wait for it
    forever while the main thread waits for them (seen: a SIGTERM during apply's writes, all threads idle)."""
    if _WATCHING or not _ARMED:
        return
    _WATCHING.append(True)
    atomic = sys.modules.get("lorafuse.io.atomic")  # not imported: no temporary output exists
    cleanup = getattr(atomic, "emergency_cleanup", None)
    grace = _stop_grace()

    def watch() -> None:
        time.sleep(grace)
        if cleanup is not None:
            cleanup()
        os.write(2, f"lorafuse: stopped by {name}, and its threads did not finish within {grace:g} s: ended at "
                    "once; the temporary output was removed and nothing was written\n".encode())
        os._exit(status)

    try:
        threading.Thread(target=watch, name="lorafuse-stop-watch", daemon=True).start()
    except RuntimeError:  # no thread can be started (a thread limit): the stop goes on without its watchdog
        pass


# Signals that end a command as SIGTERM does. SIGHUP only where it would kill the process (not under nohup,
# which ignores it): a closed terminal otherwise left a temporary output of the model's size behind.
_ENDING = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def _catch_ending() -> dict[int, object]:
    """Install _on_sigterm for _ENDING (SIGHUP where its handler is the default); returns what it replaced. A signal
    whose handler was set outside Python (an embedding application's: getsignal says None) is left alone, as
    io.atomic's held signals are: Python could not put that handler back."""
    previous: dict[int, object] = {}
    for s in _ENDING:
        now = signal.getsignal(s)
        if now is None or (s != signal.SIGTERM and now is not signal.SIG_DFL):
            continue
        previous[s] = signal.signal(s, _on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Python's: KeyboardInterrupt, and the watch
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
    return previous


WEIGHTS_HELP = "comma-separated weight per adapter, negative ones subtract (default 1 each; e.g. --weights 1,-0.5)"
# a value that starts like a negative number (or -inf, -nan: refused by _weights with the reason), not an option
_NEGATIVE_LIST = re.compile(r"-(?:\d|\.\d|inf|nan).*", re.IGNORECASE | re.DOTALL)
# options whose value is a number, or a comma-separated list of numbers (--weights): a value such as -1e-3 or -5GB
# is theirs, refused by their own check with the allowed range ("expected one argument" said it was missing)
_LIST_OPTIONS = ("--weights", "--rank", "--conv-rank", "--max-rank", "--density", "--seed", "--threads", "--passes",
                 "--oversample", "--power-iters", "--sv-ratio", "--sv-fro", "--sv-cumulative", "--clamp-quantile",
                 "--min-diff", "--max-shard-size")


def _negative_values(argv: Sequence[str]) -> list[str]:
    """`--weights -0.5,1` as `--weights=-0.5,1`: argparse takes a value that starts with '-' and holds a
    comma (or, for any option, one that is not a plain negative number: -1e-3, -inf, -5GB) for an option, so a
    value like a negative number after a numeric option is joined to it (up to a `--`)."""
    out: list[str] = []
    i = int(list(argv[:1]) == ["--"])  # `lorafuse -- combine ...`: that one ends lorafuse's own options (parse_args)
    out += argv[:i]
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out.extend(argv[i:])
            break
        if token in _LIST_OPTIONS and i + 1 < len(argv) and _NEGATIVE_LIST.fullmatch(argv[i + 1]):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    if args.print_schema:
        if args.recipe is not None or args.out is not None:  # it runs nothing: said, not ignored
            raise LorafuseValueError("--print-schema prints the recipe schema and runs nothing: give it alone "
                                     "(lorafuse run --print-schema), or leave it out to run "
                                     + (repr(args.recipe) if args.recipe is not None else "a recipe"))
        unused = [o for o, on in (("--overwrite", args.overwrite), ("--dry-run", args.dry_run),
                                  ("--intermediate-dir", args.intermediate_dir is not None),
                                  ("--threads", args.threads != 0), ("--device", args.device is not None),
                                  ("--progress", args.progress), ("--no-progress", args.no_progress),
                                  ("-q", args.quiet)) if on]
        if unused:  # options of a run, which --print-schema is not: refused, not ignored (--json: it is JSON)
            raise LorafuseValueError(f"--print-schema prints the recipe schema and runs nothing: {', '.join(unused)} "
                                     "would do nothing; give --print-schema alone (lorafuse run --print-schema)")
        from lorafuse.recipes.schema import schema_json

        _say(_json_text(schema_json(), indent=2))
        return 0
    if args.recipe is None or args.out is None:
        raise LorafuseValueError("give a recipe and -o OUT (lorafuse run RECIPE.yml -o OUT), or --print-schema")
    from lorafuse.recipes.runner import run

    reports: dict[tuple[str, ...], object] = {}
    # --progress / --no-progress as given, to every stage: each draws its bar by its own rules (none with -q, --json)
    progress = True if args.progress else False if args.no_progress else None
    # --json: the run as without it (its stages' notes on stderr, unless -q), but for stdout, which holds the JSON
    # alone: the stage command lines the run prints there are dropped, each stage's --json report kept
    shown = _dropped_stdout() if args.json else contextlib.nullcontext()
    with shown:
        report = run(args.recipe, args.out, overwrite=args.overwrite, dry_run=args.dry_run, threads=args.threads,
                     device=args.device, quiet=args.quiet, intermediate_dir=args.intermediate_dir,
                     dispatch=_json_dispatch(reports) if args.json else dispatch, progress=progress)
    if args.json:
        import shlex

        stages = [{"name": s.name, "verb": s.verb, "command": shlex.join(["lorafuse", *s.argv]) if s.argv else None,
                   "out": None if s.out is None else str(s.out), "seconds": s.seconds,
                   ("plan" if report.dry_run else "report"): reports.get(tuple(s.argv)) if s.argv else None}
                  for s in report.stages]
        said = [str(n) for s in stages for n in _stage_notes(s.get("plan" if report.dry_run else "report"))]
        _say(_json_text({"out": None if report.out is None else str(report.out), "dry_run": report.dry_run,
                         "seconds": report.seconds, "notes": _json_notes(args, *report.notes, *said),
                         "stages": stages}, indent=2))
    elif not args.quiet and not args.dry_run:
        _say(f"ran {plural(len(report.stages), 'stage')}; wrote {report.out} in {report.seconds:.2f} s")
    return 0


@contextmanager
def _dropped_stdout() -> Iterator[None]:
    """What is printed on stdout meanwhile is dropped (run --json: the lines a run prints there, not JSON)."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _stage_notes(shown: object) -> list[object]:
    """The notes of a stage's --json report or plan (run --json's own "notes" hold every stage's, as the stages said
    them on stderr)."""
    notes = shown.get("notes") if isinstance(shown, dict) else None
    return notes if isinstance(notes, list) else []


def _json_dispatch(reports: dict[tuple[str, ...], object]) -> Callable[[Sequence[str]], int]:
    """dispatch, each stage with --json and its printed JSON kept by its command line instead of shown (the run's
    checks of the last stage, its dry run, are not a stage's report)."""
    import contextlib
    import io

    def run_stage(argv: Sequence[str]) -> int:
        words = list(argv)
        at = words.index("--") if "--" in words else len(words)  # options before the inputs
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = dispatch([*words[:at], "--json", *words[at:]])
        text = buf.getvalue().strip()
        try:
            reports[tuple(argv)] = json.loads(text) if text else None
        except ValueError:
            reports[tuple(argv)] = {"output": text}
        return code

    return run_stage


def _commands() -> dict[str, Callable[[argparse.Namespace], int]]:
    return {"apply": _cmd_apply, "combine": _cmd_combine, "similarity": _cmd_similarity, "info": _cmd_info,
            "resize": _cmd_resize, "extract": _cmd_extract, "convert": _cmd_convert, "run": _cmd_run}


# Commands that make few BLAS calls, if any: their arithmetic is in the compiled core.
_FEW_BLAS = frozenset({"apply", "info"})
_FEW_PROCESSES = 512  # a process limit (ulimit -u) this low may leave OpenBLAS no room for its threads
_SMALL_ADDRESS_SPACE = 4 << 30  # and an address-space limit (ulimit -v) this low


def _quiet_blas(command: str) -> None:
    """Before numpy loads: OpenBLAS starts its worker threads with it, and they spin for ~0.1 s waiting for
    work (0.14 CPU-s of a 2-core `lorafuse apply` under perf). For a command that makes few BLAS calls they
    sleep at once instead (2**4 cycles, OpenBLAS's least; a call still wakes them), so that core goes to the
    merge and the writes. Under a small process limit (ulimit -u) OpenBLAS starts none: when it cannot start
    one it raises SIGINT in the process, which would read as Ctrl-C. A user's own setting is kept."""
    if "numpy" in sys.modules:
        return
    if command in _FEW_BLAS:
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    try:
        import resource  # POSIX

        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        space = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError, AttributeError):
        return
    few = nproc != resource.RLIM_INFINITY and nproc <= _FEW_PROCESSES and os.geteuid() != 0  # root: no limit
    small = space != resource.RLIM_INFINITY and space < _SMALL_ADDRESS_SPACE  # each thread's stack counts
    if few or small:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _parsed(argv: Sequence[str]) -> argparse.Namespace:
    """The command line parsed, with the options that contradict each other refused (exit status 2) naming both,
    rather than one silently winning: -q (print nothing) with --verbose (print each module)."""
    parser = build_parser()
    args = parser.parse_args(_negative_values(list(argv)))
    if getattr(args, "quiet", False) and getattr(args, "verbose", False):
        verb: argparse.ArgumentParser = parser.verbs[args.command]  # type: ignore[attr-defined]
        verb.error("argument --verbose: not allowed with argument -q/--quiet (-q prints nothing, --verbose a line "
                   "per module): give one of them")
    return args


def dispatch(argv: Sequence[str]) -> int:
    """Run one verb's command line as main() does, but let its LorafuseError propagate (lorafuse run's stages:
    the recipe names the stage in the message). The command line must parse: a recipe's stage is checked first."""
    args = _parsed(argv)
    with _notes(args):
        return _commands()[args.command](args)


def _input_error(e: LorafuseValueError) -> bool:
    """Whether a LorafuseValueError is also one of the input errors (a LorafuseError class that is no
    LorafuseValueError: UnsharedModulesError is a MissingModuleError): exit status 1, as for those, not 2."""
    return any(issubclass(c, LorafuseError) and not issubclass(c, LorafuseValueError) and c is not LorafuseError
               for c in type(e).__mro__)


def _stopped_note(before: int) -> str:
    """What a stopped command wrote: the outputs it put in place (a signal that came while one was put in place
    is handled once it is), else nothing."""
    from lorafuse.io.atomic import COMMITTED

    done = COMMITTED[before:]
    if not done:
        return "; no output was written"
    return f" after {', '.join(map(str, done))} {'was' if len(done) == 1 else 'were'} written"


def _failed_note(before: int) -> str:
    """What a command that failed wrote before it failed (a recipe's kept intermediate outputs), as _stopped_note."""
    done = _stopped_note(before)
    return done if done.startswith(";") else f";{done.removeprefix(' after')} before it failed"


def _ray_starts() -> int:
    """How many Rays this process started (ray_engine.ray_starts; 0 when that module was never imported)."""
    ray_engine = sys.modules.get("lorafuse.ops.combine.ray_engine")
    return 0 if ray_engine is None else int(ray_engine.ray_starts())


def _leave(status: int, rays: int) -> int:
    """`status`, or, when the stopped command started a Ray in this process (combine --engine ray: more
    ray_engine.ray_starts than `rays`, the count before it), an immediate exit with it (os._exit, stdout and
    stderr flushed): Ray's own threads can run on into the interpreter's exit, which crashed it with SIGSEGV
    (after the outputs were cleaned up) in about 1 run in 5 stopped by Ctrl-C."""
    if _ray_starts() == rays:
        return status
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _standard_streams() -> None:
    """stdin, stdout or stderr closed by the caller (`2>&-`): /dev/null in its place, so that no file lorafuse
    opens takes its number (a write meant for stderr would land in an output) and what the CLI prints, a progress
    bar included, goes nowhere instead of failing the run (Python leaves sys.stderr None then). On a stdout or
    stderr that is not UTF-8, what it cannot encode is printed escaped (\\xfc)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 (lives as long as the process)
    for stream in (sys.stdout, sys.stderr):  # an ASCII or Latin-1 terminal (PYTHONIOENCODING, LC_ALL=C without
        encoding = str(getattr(stream, "encoding", None) or "utf-8")  # UTF-8 mode): a path it cannot show is
        if codecs.lookup(encoding).name != "utf-8" and hasattr(stream, "reconfigure"):  # escaped, not a traceback
            stream.reconfigure(errors="backslashreplace")


def _last_line(e: BaseException) -> str:
    """The last line of an error's text: numpy's ImportError is a page of advice that ends in the cause."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    _standard_streams()
    # SIGTERM / SIGHUP caught from the start, not only once the command runs: while the command line is read and
    # numpy loads (a tenth of a second or more) they killed the process without a word (exit -15)
    previous = _catch_ending() if threading.current_thread() is threading.main_thread() else {}
    try:
        return _flushed(argv)
    except (KeyboardInterrupt, ImportError) as e:  # before the command started (reading the command line)
        if not interrupted(e):
            if isinstance(e, ImportError):  # numpy under ulimit -v ("failed to map segment"), a damaged install
                _say(f"lorafuse: error: {_last_line(e)}; no output was written", file=sys.stderr)
                return 1
            raise
        _say("lorafuse: interrupted; no output was written", file=sys.stderr)
        return e.status if isinstance(e, _Terminated) else 130
    except (MemoryError, SystemError) as e:  # numpy's import under ulimit -v, before the command started
        if not out_of_memory(e):
            raise
        _say(OUT_OF_MEMORY, file=sys.stderr)
        return 1
    except BrokenPipeError:  # `lorafuse --version | ...` whose reader left, or one that left before the flush
        return _reader_left()
    except OSError as e:  # --help / --version / what a command printed, to a stdout on a full disk
        _drop_stdout()
        _say(f"lorafuse: error: {e.filename or 'stdout'}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]


def _flushed(argv: Sequence[str] | None) -> int:
    """_main, then stdout flushed, also after argparse's exit (--help, --version): a stdout that cannot take what
    was printed fails here, said by main, not at the interpreter's exit ("Exception ignored", exit status 120)."""
    try:
        status = _main(argv)
    except SystemExit:
        _flush_stdout()
        raise
    _flush_stdout()
    return status


def _flush_stdout() -> None:
    if sys.stdout is not None:  # a Python caller's sys.stdout = None: print() writes nothing there either
        sys.stdout.flush()


def _reader_left() -> int:
    """The reader of stdout left (`lorafuse info ... | head`): stop quietly like other tools, exit status 141."""
    _drop_stdout()
    return 141


def _drop_stdout() -> None:
    """After stdout failed: /dev/null in its place, so that what is still buffered, flushed again at the
    interpreter's exit, does not fail again ("Exception ignored", exit status 120)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # a stdout with no descriptor (an in-memory stream, one already closed)
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no descriptor left (ulimit -n): stdout stays as it is
        return
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _main(argv: Sequence[str] | None) -> int:

    from lorafuse._variants import forced_variant

    try:  # a bad LORAFUSE_ISA: said in one line, not as the core's ImportError at first use
        forced_variant()
    except ImportError as e:
        _say(f"lorafuse: error: {e}", file=sys.stderr)
        return 2
    given = sys.argv[1:] if argv is None else list(argv)
    args = _parsed(given)
    _quiet_blas(args.command)
    from lorafuse.backends import forced_backend  # (loads numpy: after _quiet_blas)

    try:  # a bad LORAFUSE_BACKEND too, before any work: not ignored where a command names its device
        forced = forced_backend()
    except LorafuseValueError as e:
        _say(f"lorafuse: error: {e}", file=sys.stderr)
        return 2
    schema_only = getattr(args, "print_schema", False)  # (run --print-schema runs nothing)
    if forced == "cuda" and "device" in vars(args) and args.device != "cuda" and not schema_only:
        # the verb's math would run on the CPU, unsaid
        _say(f"lorafuse {args.command}: error: LORAFUSE_BACKEND=cuda names the GPU, but lorafuse {args.command} "
             "computes where --device says: the CPU unless --device cuda (there LORAFUSE_BACKEND picks cpu or "
             "reference): give --device cuda, or unset LORAFUSE_BACKEND", file=sys.stderr)
        return 2

    from lorafuse.io.atomic import COMMITTED, overwrite_named
    from lorafuse.io.hub import quiet_downloads
    from lorafuse.io.provenance import command_text, invoked

    committed = len(COMMITTED)  # the outputs put in place before this command
    rays = _ray_starts()
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        previous = _catch_ending()
    try:  # every output records the command line, verbatim but for the output's path (io.provenance)
        with _notes(args), invoked(command_text(given, getattr(args, "out", None)), "command"), \
                overwrite_named("--overwrite"), quiet_downloads(not _bars_drawn(args)):
            return _commands()[args.command](args)
    except LorafuseValueError as e:
        if not _input_error(e):
            _say_error(f"lorafuse {args.command}: error: {e}", given)
            return 2
        _say_error(f"lorafuse {args.command}: error: {type(e).__name__}: {e}", given)
        return 1
    except LorafuseError as e:
        _say_error(f"lorafuse {args.command}: error: {type(e).__name__}: {e}", given)
        return 1
    except _Terminated as e:
        _say(f"lorafuse {args.command}: terminated ({e.name}){_stopped_note(committed)}", file=sys.stderr)
        return _leave(e.status, rays)
    except (KeyboardInterrupt, ImportError) as e:
        if not interrupted(e):
            if isinstance(e, ImportError):  # a module that would not load (out of memory, a damaged install)
                _say(f"lorafuse {args.command}: error: {_last_line(e)}{_failed_note(committed)}", file=sys.stderr)
                return 1
            raise
        _say(f"lorafuse {args.command}: interrupted{_stopped_note(committed)}", file=sys.stderr)
        return _leave(130, rays)
    except MemoryError as e:
        why = f" ({e})" if str(e) else ""
        _say(f"lorafuse {args.command}: error: out of memory{why}: the machine, or a limit such as ulimit -v, leaves "
             f"too little for this input{_failed_note(committed)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `lorafuse info ... | head`: the reader left; stop quietly like other tools
        return _reader_left()
    except OSError as e:  # a file the operation did not expect to fail on: said in one line, not a traceback
        if e.filename == "stdout":  # _say: said once, not again when main flushes stdout
            _drop_stdout()
        where = f"{e.filename}: " if e.filename is not None else ""
        _say_error(f"lorafuse {args.command}: error: {where}{e.strerror or e}", given)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Plots (optional: `pip install lorafuse[plot]`): singular value spectra and similarity heat maps.

matplotlib draws off-screen (an Agg canvas bound to each figure; pyplot and its global
backend are never touched) and every plot is written atomically. The file's suffix chooses the
image format (PLOT_FORMATS: .png, .svg, .pdf, .jpg / .jpeg); any other suffix, or none, is refused
before any work. Each format carries lorafuse's mark so that a later plot may replace it (io.atomic):
a PNG text chunk, the SVG description, the PDF keywords, a JPEG comment.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorafuse._terminal import printable
from lorafuse._validate import unordered
from lorafuse.backends import FactorJob, get_backend
from lorafuse.errors import LorafuseValueError, NonFiniteError, UnsupportedError
from lorafuse.io.atomic import atomic_file, check_output, check_output_path
from lorafuse.io.hub import PEFT_CONFIG
from lorafuse.io.manifest import MARKER_KEY, PLOT, png_metadata
from lorafuse.io.provenance import path_text
from lorafuse.model import Adapter

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    try:
        import matplotlib  # noqa: F401  (fails first when matplotlib is absent)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        absent = isinstance(e, ModuleNotFoundError) or "No module named" in str(e) or "halted" in str(e)
        if not absent:  # matplotlib is there but failed to load (a broken install, a missing shared library)
            raise UnsupportedError(f"matplotlib could not be loaded ({e})") from None
        raise UnsupportedError("plotting needs matplotlib: pip install lorafuse[plot]") from None
    except (MemoryError, SystemError) as e:  # out of memory while importing (SystemError: an allocation in C failed)
        raise MemoryError(f"while loading matplotlib: {type(e).__name__}{': ' + str(e) if str(e) else ''}") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# suffix -> matplotlib's format: the formats lorafuse marks as its own (io.atomic recognises the marks)
PLOT_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpeg", ".jpeg": "jpeg"}


def plot_format(path: str | os.PathLike[str]) -> str:
    """The image format the name `path` asks for, by its suffix (any case): 'png', 'svg', 'pdf' or 'jpeg';
    LorafuseValueError naming the supported suffixes for any other suffix, or none."""
    suffix = Path(os.fspath(path)).suffix.lower()
    fmt = PLOT_FORMATS.get(suffix)
    folder = os.fsdecode(os.fspath(path)).endswith(tuple({os.sep, os.altsep or os.sep}))
    if fmt is None or folder:
        said = ("it ends in a path separator, which names a folder" if folder else
                f"its suffix {suffix!r} is not an image format lorafuse writes" if suffix else "it has no suffix")
        raise LorafuseValueError(f"plot {path}: {said}; the suffix chooses the image format: give a name ending in "
                                 f"{', '.join(PLOT_FORMATS)} (e.g. {Path(os.fspath(path)).with_suffix('.png').name})")
    return fmt


def plot_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """What a plot is checked against: each input, and the folder of an input file that belongs to a PEFT
    adapter folder (beside its adapter_config.json): lorafuse reads such a file as that folder
    (Adapter.sources()), so a plot inside it is inside an input, as for every other writer, whether the
    adapter was given as the folder or as its file."""
    out: list[Path] = []
    for p in map(Path, inputs):
        out.append(p)
        if p.is_file() and (p.parent / PEFT_CONFIG).is_file():
            out.append(p.parent)
    return out


def check_plot_output(path: str | os.PathLike[str], inputs: Sequence[Path] = (), overwrite: bool = False) -> str:
    """Everything a plot's output is checked for before the work: where it is (io.atomic.check_output_path,
    against plot_inputs), its suffix (plot_format, returned), what it holds now (io.atomic.check_output).
    The one rule of every plot, the CLI's (similarity --plot, info --spectrum) and the API's alike."""
    inputs = plot_inputs(inputs)
    check_output_path(path, inputs)
    fmt = plot_format(path)
    check_output(path, inputs, folder=False, overwrite=overwrite, kind=PLOT)
    _check_matplotlib()
    return fmt


def _check_matplotlib() -> None:
    """An absent matplotlib said before the work (finding it imports nothing), not once the matrix or the
    description it would plot was computed and printed."""
    import importlib.util

    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # None in sys.modules, a module without a spec
        found = False
    if not found:
        raise UnsupportedError("plotting needs matplotlib: pip install lorafuse[plot]")


def _save(fig: Figure, path: str | os.PathLike[str], inputs: Sequence[Path], overwrite: bool) -> Path:
    """The plot, atomically, in the format its suffix names, with lorafuse's mark so that a later plot may
    replace it; an existing file without the mark is refused unless `overwrite` (see io.atomic)."""
    fmt = plot_format(path)
    mark = f"{MARKER_KEY} {png_metadata()[MARKER_KEY]}"
    options: dict[str, dict[str, Any]] = {
        "png": {"metadata": png_metadata()},
        "svg": {"metadata": {"Description": mark, "Date": None}},  # no date: the same plot, the same bytes
        "pdf": {"metadata": {"Keywords": mark, "CreationDate": None}},
        "jpeg": {"pil_kwargs": {"comment": mark.encode(), "quality": 92}},
    }
    with atomic_file(path, plot_inputs(inputs), overwrite=overwrite, kind=PLOT) as tmp:
        try:
            fig.savefig(tmp, format=fmt, dpi=120, **options[fmt])
        except SystemError as e:  # matplotlib loads its text and image modules here: an allocation in C failed
            raise MemoryError(f"while drawing the plot: {type(e).__name__}: {e}") from None
        except Exception as e:  # a write that failed inside a backend can surface as another error (the PDF
            # backend's AttributeError after ENOSPC): the OSError under it is the one io.atomic reports
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None
    return Path(path)


_KOHYA_PREFIX = re.compile(r"^lora_(unet|te\d*|transformer)_")


def module_type(name: str) -> str:
    """The kind of layer a module is: the last name component (`q_proj`); for kohya's flat names, what
    follows the last block index (`lora_unet_..._attn1_to_q` -> `attn1_to_q`, `..._ff_net_2` -> `net_2`)."""
    if "." in name:
        return name.rsplit(".", 1)[-1]
    tokens = _KOHYA_PREFIX.sub("", name).split("_")
    numeric = [i for i, t in enumerate(tokens) if t.isdigit()]
    if not numeric:
        return "_".join(tokens)
    last = numeric[-1]
    return "_".join(tokens[last + 1:] or tokens[max(last - 1, 0):])


def spectra(adapter: Adapter, threads: int = 0) -> dict[str, np.ndarray]:
    """All singular values (float64, descending) of every module's delta, from its factors: stored LoRA
    factors through the core in batches of bounded work (Ctrl-C and SIGTERM act between them), LoHa /
    LoKr / Tucker modules through their structure (model.spectral.spectrum: at most its
    MAX_CORE_RANK largest values, a LoKr's being the largest products of its halves')."""
    from lorafuse.model.spectral import batches, is_stored_lora, lora_cost, spectrum

    refuse_unplottable(adapter)
    out: dict[str, np.ndarray] = {}
    stored = [(n, u) for n, u in adapter.updates.items() if is_stored_lora(u)]
    for i0, i1 in batches([lora_cost(u, 12.0) for _, u in stored]):  # type: ignore[arg-type]
        chunk = stored[i0:i1]
        items = []
        for name, u in chunk:  # the scale applied to the singular values in float64: a float32 B * scale overflows
            b, a = u.factors(threads)  # where the delta does not (a scale of 1e300 and a finite ||delta||_F)
            items.append(FactorJob(name, np.ascontiguousarray(b), a))
        try:
            result = get_backend().factored_svd(items, [u.rank for _, u in chunk], "B", threads)
        except NonFiniteError as e:  # the core names the module: the adapter named too
            raise NonFiniteError(f"{adapter.label}: module {e}: its singular values cannot be plotted") from None
        out.update({name: np.asarray(s, dtype=np.float64) * abs(float(u.scale))
                    for (name, _, _), (_, _, s), (_, u) in zip(items, result, chunk)})
    for name, u in adapter.updates.items():
        if name not in out:
            out[name] = spectrum(u)
    return {name: out[name] for name in adapter.updates}


def refuse_unplottable(adapter: Adapter) -> None:
    """Refuse (UnsupportedError naming the adapter and the module) the singular values of an adapter holding a
    DoRA module or a LoRA on a parameter: their delta is known only against the base (info shows its norm as
    n/a), and the singular values of scale * B @ A would be drawn as though they were the delta's."""
    from lorafuse.model.param_lora import refuse_parameter_loras
    from lorafuse.model.update import refuse_dora

    refuse_dora(adapter.label, adapter.updates, "the plot of its delta's singular values")
    refuse_parameter_loras(adapter.label, adapter.updates, "the singular value plot")


def plot_spectrum(adapter: Adapter, path: str | os.PathLike[str], threads: int = 0,
                  title: str | None = None, overwrite: bool = False) -> Path:
    """A plot of the singular values of each module's delta: per module type the mean spectrum (a line)
    and its min..max over the modules of that type (a band); log y, x = index from 1. The suffix of `path`
    chooses the format (PLOT_FORMATS: .png, .svg, .pdf, .jpg, .jpeg; others are refused). `path` may be
    new, empty or an earlier lorafuse plot; another file is refused unless `overwrite` (checked first)."""
    if not adapter.updates:
        raise LorafuseValueError(f"{adapter.label}: no modules to plot")
    check_plot_output(path, adapter.sources(), overwrite)
    refuse_unplottable(adapter)
    groups: dict[str, list[np.ndarray]] = {}
    found = spectra(adapter, threads)
    unit = _unit(list(found.values()))
    for name, s in found.items():
        groups.setdefault(module_type(name), []).append(s / unit)
    fig = _figure(9.0, 5.5)
    ax = fig.add_subplot()
    for (kind, rows), color in zip(sorted(groups.items()), _palette(len(groups))):
        width = max(len(s) for s in rows)
        m = np.full((len(rows), width), np.nan)
        for i, s in enumerate(rows):
            m[i, : len(s)] = np.where(s > 0, s, np.nan)  # zeros have no place on a log axis
        x = np.arange(1, width + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
            mean, lo, hi = np.nanmean(m, 0), np.nanmin(m, 0), np.nanmax(m, 0)
        ax.plot(x, mean, color=color, lw=1.6, marker="." if width <= 64 else None,
                label=f"{kind} ({len(rows)})")
        if len(rows) > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value of scale * B @ A" + (f" (unit {unit:.0e})" if unit != 1.0 else ""))
    name = adapter.path.name if adapter.path is not None else "in-memory adapter"
    ax.set_title(_drawable(title or f"{name}: singular values per module type (mean, band = min..max)"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=1 if len(groups) <= 12 else 2, loc="upper right")
    return _save(fig, path, adapter.sources(), overwrite)


def _unit(values: list[np.ndarray]) -> float:
    """The power of ten the spectra are drawn in: 1, or the largest value's where it is beyond 1e100 either way
    (a scale of 1e280): matplotlib's log axis overflows float64 near its limits (its margins, its ticks)."""
    finite = np.concatenate([s[np.isfinite(s) & (s > 0)] for s in values] + [np.zeros(0)])
    top = float(finite.max()) if finite.size else 1.0
    return 1.0 if 1e-100 <= top <= 1e100 else 10.0 ** math.floor(math.log10(top))


def _drawable(text: object) -> str:
    """Text matplotlib's fonts can draw (a lone surrogate makes them raise): an undecodable byte of a file name as
    \\xNN, as `info` shows it (io.provenance.path_text), other non-printable characters escaped."""
    try:
        text = path_text(str(text))
    except UnicodeError:  # a surrogate no file name decodes to: printable escapes it
        pass
    return printable(text)


MAX_LABEL = 36  # characters of an adapter's label in a heat map (beyond: its middle elided)


def _short_labels(labels: list[str]) -> list[str]:
    """The labels of a heat map's rows: without the folder they all start with (absolute paths: the figure
    left no room for the matrix, and the names were cut off), a long one's middle elided (both its ends
    kept: the run folder and the file name that tell adapters apart)."""
    prefix = os.path.commonprefix(labels)
    cut = max(prefix.rfind("/"), prefix.rfind(os.sep)) + 1
    half = (MAX_LABEL - 3) // 2
    return [x if len(x) <= MAX_LABEL else f"{x[:half]}...{x[len(x) - (MAX_LABEL - 3 - half):]}"
            for x in (label[cut:] or label for label in labels)]


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


MAX_HEAT_MAP_INCHES = 30.0  # a heat map's height at most (3600 pixels at 120 dpi), whatever the adapters
MAX_HEAT_MAP_VALUES = 40  # adapters at most whose cosines are written in the cells (beyond: colours alone)


def plot_similarity(matrix: np.ndarray | Sequence[Sequence[float]], labels: Sequence[str],
                    path: str | os.PathLike[str], inputs: Sequence[Path] = (),
                    title: str = "cosine similarity of the adapters' deltas", overwrite: bool = False) -> Path:
    """A heat map of a cosine similarity matrix, the values written in the cells; the suffix of `path`
    chooses the format, as for plot_spectrum."""
    check_plot_output(path, inputs, overwrite)
    if unordered(labels):  # hash order: each row would get another adapter's label
        raise LorafuseValueError(f"labels must be a list in the matrix's row order, not a {type(labels).__name__} "
                                 "(a set has no order)")
    m = np.asarray(matrix, dtype=np.float64)
    n = len(labels)
    if m.shape != (n, n):
        raise LorafuseValueError(f"a similarity matrix of shape {m.shape} does not fit {n} labels")
    size = min(3.0 + 0.7 * n, MAX_HEAT_MAP_INCHES)  # bounded: n adapters, not n^2 pixels and n^2 texts
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    image = ax.imshow(m, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    font = max(4.0, min(10.0, 110.0 / max(n, 1)))
    for i, j in [(i, j) for i in range(n) for j in range(n)] if n <= MAX_HEAT_MAP_VALUES else []:
        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=font,
                color="white" if abs(m[i, j]) > 0.6 else "black")
    ticks = max(2.0, min(10.0, 0.8 * 72 * size / max(n, 1)))  # a label's height fits its row
    shown = _short_labels([_drawable(x) for x in labels])
    ax.set_xticks(range(n), labels=shown, rotation=45, ha="right", rotation_mode="anchor", fontsize=ticks)
    ax.set_yticks(range(n), labels=shown, fontsize=ticks)
    ax.set_title(_drawable(title))
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine")
    return _save(fig, path, inputs, overwrite)


__all__ = ["PLOT_FORMATS", "check_plot_output", "module_type", "plot_format", "plot_inputs", "plot_similarity",
           "plot_spectrum", "refuse_unplottable", "spectra"]

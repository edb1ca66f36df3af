"""Which compiled core variant this process loads, decided without loading one (lorafuse._core loads it).

The core (and numpy with it) loads when first used, so `import lorafuse` stays light and the CLI chooses
numpy's thread settings before that (lorafuse.cli). A bad LORAFUSE_ISA is refused where the core loads (an
ImportError naming the choices) and, by the CLI, before it reads its command line (a one-line error).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

VARIANTS = ("native", "avx512", "avx2", "generic")  # best first
ENV = "LORAFUSE_ISA"


FAILURES: dict[str, str] = {}  # variant -> why it did not load (for the message when none does)


def load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"lorafuse._core_{name}")
    except ImportError as e:
        FAILURES[name] = str(e)
        return None


def built() -> list[str]:
    here = os.path.dirname(__file__)
    try:
        files = os.listdir(here)
    except OSError:
        files = []
    found = {f[len("_core_"):].split(".", 1)[0] for f in files if f.startswith("_core_")}
    if not found:  # an editable install keeps the compiled modules elsewhere: ask the import system
        from importlib.util import find_spec

        found = {v for v in VARIANTS if find_spec(f"lorafuse._core_{v}") is not None}
    return [v for v in VARIANTS if v in found]


_AVX2 = {"avx2", "fma", "bmi2", "f16c"}
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def cpu_features() -> dict[str, bool]:
    """{'avx2': ..., 'avx512': ...} for this CPU and OS, without loading a variant where possible."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
        except OSError:
            flags = None
        if flags is not None:
            have = set(flags)
            return {"avx2": _AVX2 <= have, "avx512": _AVX512 <= have}
    generic = load("generic")
    if generic is None:
        return {"avx2": False, "avx512": False}
    found = generic.cpu_features()
    return {"avx2": bool(found["avx2"] and found["f16c"]), "avx512": bool(found["avx512"] and found["avx2"])}


def forced_variant() -> str | None:
    """The variant LORAFUSE_ISA forces (None: auto), checked against the build and the CPU."""
    forced = os.environ.get(ENV, "").strip().lower()
    if not forced or forced == "auto":
        return None
    if forced not in VARIANTS:
        raise ImportError(f"{ENV}={forced!r}: choose one of auto, {', '.join(VARIANTS)}")
    have = built()
    if forced not in have:
        raise ImportError(f"{ENV}={forced}: this build of lorafuse has the core variants "
                          f"{', '.join(have) or 'none'}")
    if forced in ("avx2", "avx512") and not cpu_features()[forced]:
        raise ImportError(f"{ENV}={forced}: this CPU does not support {forced}")
    return forced

"""Load the compiled core built for the instruction sets this CPU has.

The build makes one module per variant (CMakeLists.txt): `_core_generic` (any x86-64),
`_core_avx2` (x86-64-v3: AVX2, FMA, F16C), `_core_avx512` (x86-64-v4), or a single
`_core_native` (-march=native source builds). This module replaces itself in
`sys.modules` with the best one the CPU runs, so `from lorafuse import _core` gives the
compiled module itself. `LORAFUSE_ISA=generic|avx2|avx512|native` forces a variant (to
compare them, or to rule one out); one the build or the CPU lacks is an error.

On Linux the CPU's features come from /proc/cpuinfo (the kernel clears a flag whose register
state it does not save), so exactly one variant is loaded: each holds process-wide state (the
SIGBUS guard of mapped inputs). Elsewhere the generic variant is asked first.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

VARIANTS = ("native", "avx512", "avx2", "generic")  # best first
ENV = "LORAFUSE_ISA"


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"lorafuse._core_{name}")
    except ImportError:
        return None


def _built() -> list[str]:
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
    generic = _load("generic")
    if generic is None:
        return {"avx2": False, "avx512": False}
    found = generic.cpu_features()
    return {"avx2": bool(found["avx2"] and found["f16c"]), "avx512": bool(found["avx512"] and found["avx2"])}


def _choose() -> ModuleType:
    built = _built()
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced != "auto":
        if forced not in VARIANTS:
            raise ImportError(f"{ENV}={forced!r}: choose one of auto, {', '.join(VARIANTS)}")
        if forced not in built:
            raise ImportError(f"{ENV}={forced}: this build of lorafuse has the core variants "
                              f"{', '.join(built) or 'none'}")
        if forced in ("avx2", "avx512") and not cpu_features()[forced]:
            raise ImportError(f"{ENV}={forced}: this CPU does not support {forced}")
        module = _load(forced)
        if module is None:
            raise ImportError(f"{ENV}={forced}: lorafuse._core_{forced} failed to load")
        return module
    if "native" in built:
        module = _load("native")
        if module is not None:
            return module
    features = cpu_features()
    for name in ("avx512", "avx2"):
        if name in built and features[name]:
            module = _load(name)
            if module is not None:
                return module
    generic = _load("generic")
    if generic is None:
        raise ImportError("lorafuse's compiled core is missing (no lorafuse._core_generic): reinstall lorafuse")
    return generic


sys.modules[__name__] = _choose()

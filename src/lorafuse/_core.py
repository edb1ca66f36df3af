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

import sys
from types import ModuleType

from lorafuse._variants import ENV, FAILURES, built, cpu_features, forced_variant, load

__all__ = ["cpu_features"]


def _choose() -> ModuleType:
    forced = forced_variant()
    if forced is not None:
        module = load(forced)
        if module is None:
            raise ImportError(f"{ENV}={forced}: lorafuse._core_{forced} failed to load")
        return module
    have = built()
    if "native" in have:
        module = load("native")
        if module is not None:
            return module
    features = cpu_features()
    for name in ("avx512", "avx2"):
        if name in have and features[name]:
            module = load(name)
            if module is not None:
                return module
    generic = load("generic")
    if generic is None:
        why = FAILURES.get("generic", "")
        if "No module named" in why or not why:
            raise ImportError("lorafuse's compiled core is missing (no lorafuse._core_generic): reinstall lorafuse")
        raise ImportError(f"lorafuse's compiled core could not be loaded ({why}; out of memory or address space, "
                          "a memory limit such as ulimit -v, or a damaged install)")
    return generic


sys.modules[__name__] = _choose()

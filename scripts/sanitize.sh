#!/usr/bin/env bash
# Build lorafuse's C++ core under AddressSanitizer and UndefinedBehaviorSanitizer and
# run the whole test suite against that build. Fails on any sanitizer report.
#
#   scripts/sanitize.sh                 # build, then the whole suite
#   scripts/sanitize.sh tests/test_dtype.py -x    # arguments go to pytest
#
# Needs: Linux, GCC with its ASan and UBSan runtimes (Debian: libasan8, libubsan1;
# they come with gcc), binutils (nm), and the test extra installed in the Python
# that runs this script (`pip install torch==2.13.0 ".[test]"`). The build
# requirements (scikit-build-core, pybind11, cmeel-eigen, CMake) are used from there
# when present, else pip installs them into the venv. The build goes into a virtual
# environment of its own (build/sanitize-venv, which sees the outer site-packages
# for torch, peft and the rest, but not an outer lorafuse) and a CMake build folder
# of its own (build/sanitize); an installed or editable lorafuse is left alone.
# Sanitizer reports are kept in build/sanitize-logs.
#
# Environment: PYTHON (default python3) makes the venv; CMAKE_BUILD_PARALLEL_LEVEL
# (default: all cores) sets the build's parallelism; LORAFUSE_NATIVE (default ON here:
# one core variant, the one this machine runs, instead of the portable set) is passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/build/sanitize-venv
logs=$root/build/sanitize-logs

# --- the venv ----------------------------------------------------------------------
# It must see the outer packages (torch, peft, pytest, the build requirements) but
# not an outer lorafuse: an editable install puts an import hook (a .pth file) in
# the outer site-packages that would hand `import lorafuse` to the working tree
# ahead of anything on sys.path, --system-site-packages included. So the venv is
# made without them, and a .pth of its own (the hook below) appends the outer
# site-packages folders and runs their .pth files, except lorafuse's.
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py=$venv/bin/python
outer=$("${PYTHON:-python3}" -c '
import os, sys
print(repr([p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]))')
site=$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
cat >"$site/_lorafuse_sanitize_hook.py" <<EOF_HOOK
"""Written by lorafuse's scripts/sanitize.sh, run at every start of this venv's Python."""
import ctypes, os, sys

# 1. The outer site-packages, after this venv's own, without lorafuse's .pth files.
for d in $outer:
    if not os.path.isdir(d) or d in sys.path:
        continue
    sys.path.append(d)
    for name in sorted(n for n in os.listdir(d) if n.endswith(".pth")):
        with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        if "lorafuse" in (name + text).lower():
            continue
        for line in text.splitlines():
            if line.startswith(("import ", "import\t")):
                exec(line)
            elif line.strip() and not line.startswith("#"):
                p = os.path.join(d, line.rstrip())
                if os.path.exists(p) and p not in sys.path:
                    sys.path.append(p)

# 2. UBSan reports to a file (see scripts/sanitize.sh).
if os.environ.get("LORAFUSE_UBSAN_LIB"):
    ctypes.CDLL(os.environ["LORAFUSE_UBSAN_LIB"]).__sanitizer_set_report_path(
        os.environ["LORAFUSE_UBSAN_LOG"].encode())
EOF_HOOK
echo "import _lorafuse_sanitize_hook" >"$site/_lorafuse_sanitize_hook.pth"

# --- build ---------------------------------------------------------------------------
"$py" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmeel-eigen>=3.4"
command -v cmake >/dev/null || "$py" -m pip install -q cmake ninja
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# Not editable, no build isolation (so the outer packages are used), own build
# folder; not stripped, so reports name functions and lines.
LORAFUSE_NATIVE=${LORAFUSE_NATIVE:-ON} LORAFUSE_SANITIZE=ON "$py" -m pip install -q --no-deps --no-build-isolation \
  --force-reinstall -C build-dir=build/sanitize -C install.strip=false .

# --- is this really the sanitized build? ----------------------------------------
# (Located without importing lorafuse, which loads _core: that needs the preload.)
core=$(cd / && "$py" -c '
import glob, importlib.util as u
print(*glob.glob(u.find_spec("lorafuse").submodule_search_locations[0] + "/_core_*.so"))')
case $core in
  *" "*) echo "sanitize.sh: more than one core variant was built ($core); build with LORAFUSE_NATIVE=ON" >&2; exit 1 ;;
  "$venv"/*.so) ;;
  *) echo "sanitize.sh: lorafuse._core resolves to $core, not the build in $venv" >&2; exit 1 ;;
esac
# Instrumented code calls the runtimes: ASan's __asan_report_* and UBSan's
# __ubsan_handle_*; both runtimes must be among the module's dependencies.
undef=$(nm -D --undefined-only "$core")
grep -q '__asan_report_' <<<"$undef" || { echo "sanitize.sh: $core is not built with ASan" >&2; exit 1; }
grep -q '__ubsan_handle_' <<<"$undef" || { echo "sanitize.sh: $core is not built with UBSan" >&2; exit 1; }
deps=$(ldd "$core")
libasan=$(awk '/libasan\.so/ {print $3}' <<<"$deps")
libubsan=$(awk '/libubsan\.so/ {print $3}' <<<"$deps")
libstdcxx=$(awk '/libstdc\+\+\.so/ {print $3}' <<<"$deps")
[ -n "$libasan" ] && [ -n "$libubsan" ] || { echo "sanitize.sh: $core does not link libasan and libubsan:"$'\n'"$deps" >&2; exit 1; }

# --- run the suite ------------------------------------------------------------------
# Python itself is not instrumented, so the ASan runtime is preloaded: it must come
# first to replace malloc for the whole process. libstdc++ is preloaded with it:
# ASan hooks C++ throw (__cxa_throw) when it starts, and python, a C program, has
# not loaded libstdc++ by then, so the first exception _core throws would stop
# the process with "CHECK failed: ... real___cxa_throw". (libubsan comes with _core.)
export LD_PRELOAD=$libasan:$libstdcxx${LD_PRELOAD:+:$LD_PRELOAD}
# detect_leaks=0: CPython, numpy and torch deliberately leave memory allocated at
# exit (interned objects, module state, caches), which LeakSanitizer would report
# by the thousand; leaks are not what this run checks.
# Reports go to files as well as ending the process, so one in a subprocess or one
# a test swallowed still fails the run.
rm -rf "$logs" && mkdir -p "$logs"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$logs/asan:${ASAN_OPTIONS:-}
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1:${UBSAN_OPTIONS:-}
# Every Python object through malloc, so ASan sees them too.
export PYTHONMALLOC=malloc
# With the ASan runtime preloaded, GCC's UBSan runtime never reads log_path from
# UBSAN_OPTIONS (nor from ASAN_OPTIONS), so its reports would reach stderr only,
# which a test may capture from a subprocess it expects to fail. The venv's hook
# (above) sets UBSan's report file through UBSan's own runtime. (Each process
# still ends at its first report, ASan's or UBSan's.)
export LORAFUSE_UBSAN_LIB=$libubsan LORAFUSE_UBSAN_LOG=$logs/ubsan

# tests/test_memory_limit.py cannot run under ASan: it runs lorafuse under a 256 MiB
# RLIMIT_DATA, and ASan's shadow memory (terabytes of reserved address space, counted
# by that limit) cannot be mapped under it, so the child dies at start.
status=0
"$py" - "$core" --ignore=tests/test_memory_limit.py "$@" <<'EOF' || status=$?
import sys, pytest
import lorafuse._core
assert lorafuse._core.__file__ == sys.argv[1], (lorafuse._core.__file__, sys.argv[1])
import ctypes
ctypes.CDLL(None).__asan_init  # the ASan runtime is in this process
assert "_lorafuse_sanitize_hook" in sys.modules, "the UBSan report hook did not run"
print(f"sanitize.sh: testing {lorafuse._core.__file__}", flush=True)
sys.exit(pytest.main(sys.argv[2:]))
EOF

if compgen -G "$logs/*" >/dev/null; then
  echo "sanitize.sh: sanitizer reports:" >&2
  cat "$logs"/* >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitize.sh: pytest failed (exit $status)" >&2
  exit "$status"
fi
echo "sanitize.sh: clean"

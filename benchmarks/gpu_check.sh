#!/usr/bin/env bash
# One GPU check of lorafuse's CUDA backend, under 6 minutes on one H200, in three timed steps:
#   1. build and install lorafuse with LORAFUSE_CUDA=ON (CMAKE_CUDA_ARCHITECTURES=90) into a virtual
#      environment that sees the image's packages (the image's Python is left as it is);
#   2. the CUDA tests: pytest tests/test_backend_ops.py tests/test_cuda_device.py -k cuda; fails when
#      none of them ran on the GPU or any was skipped because the CUDA backend could not run;
#   3. python benchmarks/bench_gpu.py (full size).
# Everything printed goes to benchmarks/results/gpu_check-<gpu name>.txt, copied to $OUT when set.
#
# No internet is needed: Eigen (cmeel-eigen) and pytest come from benchmarks/wheels/*.whl when the image
# lacks them (benchmarks/gpu_prepare.sh downloads them; the folder is git-ignored, so carry it).
# Environment knobs (defaults in brackets): PYTHON [python3], GPU_CHECK_VENV [.venv-gpu],
# CUDA_ARCH [90], GPU_CHECK_NATIVE [ON: one -march=native core instead of three ISA variants, to save
# build time], BUILD_TIMEOUT [180], TEST_TIMEOUT [90], BENCH_TIMEOUT [300] (seconds: caps, 570 in all, under
# the device tool's 600 s per command; expected about 90 + 40 + 240),
# BENCH_ARGS [extra bench_gpu.py options], GPU_CHECK_STEPS ["build tests bench"; leaving out build reuses the
# lorafuse already installed in the venv, e.g. GPU_CHECK_STEPS=bench for a rerun on a warm machine].
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY_BASE=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-$ROOT/.venv-gpu}
ARCH=${CUDA_ARCH:-90}
NATIVE=${GPU_CHECK_NATIVE:-ON}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-180}
TEST_TIMEOUT=${TEST_TIMEOUT:-90}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
BENCH_ARGS=${BENCH_ARGS:-}
STEPS=" ${GPU_CHECK_STEPS:-build tests bench} "
WHEELS=$ROOT/benchmarks/wheels
LOGDIR=$ROOT/build/gpu-check-logs
mkdir -p "$LOGDIR" "$ROOT/benchmarks/results"

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
slug=$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
LOG=$ROOT/benchmarks/results/gpu_check-${slug:-no-gpu}.txt

PY=""          # the interpreter lorafuse is installed for
STEP_NAMES=()  # "name: seconds of budget" per finished step

die() {
  echo "FAILED: $*"
  exit 1
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

begin_step() {  # number, name, budget seconds
  STEP_START=$(now)
  echo
  echo "### step $1/3: $2 (budget $3 s) -- $(date -u +%H:%M:%S)"
}

end_step() {  # name, budget seconds
  local took
  took=$(elapsed "$STEP_START")
  STEP_NAMES+=("$1: ${took} s of $2 s")
  echo "### $1: ${took} s (budget $2 s)"
}

run_limited() {  # seconds, command...: the command's status; a timeout says so
  local limit=$1 rc=0
  shift
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    local cmd="$*"
    echo "TIMEOUT after ${limit} s: ${cmd:0:160}"
  fi
  return "$rc"
}

# ---------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------

make_python() {
  # A venv over the image's site-packages (torch, peft, ...); pip is the image's, run by the venv's python,
  # so it installs into the venv. Without venv support: pip --target into build/gpu-check-site.
  if [ -x "$VENV/bin/python" ] || "$PY_BASE" -m venv --system-site-packages --without-pip "$VENV" 2>"$LOGDIR/venv.err"; then
    PY=$VENV/bin/python
    PIP_DEST=()
  else
    echo "no venv ($(tail -n 1 "$LOGDIR/venv.err")); installing with pip --target build/gpu-check-site"
    PY=$PY_BASE
    PIP_DEST=(--target "$ROOT/build/gpu-check-site" --upgrade)
    export PYTHONPATH="$ROOT/build/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -m pip --version >/dev/null || die "$PY -m pip does not run"
}

pip_install() {
  "$PY" -m pip install --disable-pip-version-check --no-input "${PIP_DEST[@]}" "$@"
}

eigen_dir() {  # the Eigen3Config.cmake folder of an installed cmeel-eigen, or nothing
  "$PY" - <<'EOF'
import sys
from pathlib import Path
for entry in sys.path:
    found = Path(entry or ".") / "cmeel.prefix" / "share" / "eigen3" / "cmake"
    if (found / "Eigen3Config.cmake").is_file():
        print(found)
        break
EOF
}

ensure_eigen() {
  EIGEN_DIR=$(eigen_dir)
  if [ -z "$EIGEN_DIR" ] && [ ! -f /usr/share/eigen3/cmake/Eigen3Config.cmake ]; then
    local wheel
    wheel=$(ls "$WHEELS"/cmeel_eigen-*.whl 2>/dev/null | head -n 1 || true)
    [ -n "$wheel" ] || die "Eigen not found and no cmeel_eigen wheel in $WHEELS (pip download cmeel-eigen --no-deps -d $WHEELS)"
    echo "installing $(basename "$wheel") (Eigen headers; MPL-2.0)"
    pip_install --no-deps --no-index "$wheel" >"$LOGDIR/eigen.log" 2>&1 || { tail -n 20 "$LOGDIR/eigen.log"; die "installing Eigen"; }
    EIGEN_DIR=$(eigen_dir)
  fi
  echo "Eigen: ${EIGEN_DIR:-/usr/share/eigen3/cmake}"
}

ensure_pytest() {
  if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "installing pytest from $WHEELS"
    pip_install --no-index --find-links "$WHEELS" pytest >"$LOGDIR/pytest-install.log" 2>&1 \
      || { tail -n 20 "$LOGDIR/pytest-install.log"; die "installing pytest"; }
  fi
}

find_nvcc() {
  local c
  for c in "${CUDACXX:-}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc \
           "$("$PY" -c 'import nvidia, glob, os; print(next(iter(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "cu*", "bin", "nvcc")))), ""))' 2>/dev/null || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then
      export CUDACXX=$c
      export PATH="$(dirname "$c"):$PATH"
      return 0
    fi
  done
  die "nvcc not found (set CUDACXX)"
}

describe() {
  echo "gpu:      $(nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
  echo "python:   $("$PY" -c 'import sys; print(sys.version.split()[0], sys.prefix)')"
  "$PY" - <<'EOF'
import importlib
for name in ("torch", "numpy", "scikit_build_core", "pybind11", "cmake", "ninja", "peft", "transformers", "pytest", "pynvml"):
    try:
        mod = importlib.import_module(name)
        print(f"{name + ":":<19}{getattr(mod, '__version__', 'present')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name + ":":<19}missing ({type(exc).__name__})")
import torch
print(f"{'cuda:':<10}torch {torch.version.cuda}, available {torch.cuda.is_available()}")
EOF
  echo "nvcc:     $CUDACXX ($("$CUDACXX" --version | tail -n 1))"
  echo "cmake:    $(cmake --version 2>/dev/null | head -n 1 || echo 'not on PATH (the cmake pip package is used)')"
  echo "cpus:     $(nproc)"
}

# ---------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------

build() {
  begin_step 1 build "$BUILD_TIMEOUT"
  rm -f "$LOGDIR"/*.log "$LOGDIR"/junit.xml  # no stale logs from an earlier run
  make_python
  ensure_eigen
  ensure_pytest
  find_nvcc
  describe
  if [[ "$STEPS" != *" build "* ]]; then
    echo "GPU_CHECK_STEPS has no build: using the lorafuse installed for $PY"
  else
    local args=(-v --no-build-isolation --no-deps
                -C build-dir=build/gpu-check
                -C cmake.define.LORAFUSE_CUDA=ON
                -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCH"
                -C "cmake.define.CMAKE_CUDA_COMPILER=$CUDACXX")
    [ -n "${EIGEN_DIR:-}" ] && args+=(-C "cmake.define.Eigen3_DIR=$EIGEN_DIR")
    echo "pip install ${args[*]} . (LORAFUSE_NATIVE=$NATIVE; log: $LOGDIR/build.log)"
    local t0 rc=0
    t0=$(now)
    LORAFUSE_NATIVE=$NATIVE CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      run_limited "$BUILD_TIMEOUT" "$PY" -m pip install --disable-pip-version-check --no-input "${PIP_DEST[@]}" \
      "${args[@]}" . >"$LOGDIR/build.log" 2>&1 || rc=$?
    echo "build: $(elapsed "$t0") s, exit $rc"
    if [ "$rc" != 0 ]; then
      echo "--- last 80 lines of $LOGDIR/build.log ---"
      tail -n 80 "$LOGDIR/build.log"
      die "build (exit $rc)"
    fi
    grep -E "lorafuse:|CUDA|cuBLAS|cuSOLVER|Successfully installed" "$LOGDIR/build.log" | grep -v "^ *#" | tail -n 15 || true
  fi
  (cd /tmp && "$PY" - <<'EOF') || die "the CUDA backend does not load"
import lorafuse
from lorafuse.backends import cuda, get_backend
why = cuda.unavailable()
print(f"lorafuse {lorafuse.__version__} from {lorafuse.__file__}")
if why:
    raise SystemExit(f"CUDA backend unavailable: {why}")
print(f"CUDA backend: {get_backend('cuda').device}")
EOF
  end_step build "$BUILD_TIMEOUT"
}

count_tests() {  # junit xml -> counts; fails when no CUDA test ran or one was skipped for want of the backend
  "$PY" - "$1" <<'EOF'
import re
import sys
import xml.etree.ElementTree as ET

cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
status = {}
skips = {}
for case in cases:
    name = f"{case.get('classname')}::{case.get('name')}"
    kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
    status[name] = kinds[0] if kinds else "passed"
    if kinds and kinds[0] == "skipped":
        skips[name] = next(c for c in case if c.tag == "skipped").get("message", "")
counts = {k: list(status.values()).count(k) for k in ("passed", "failure", "error", "skipped")}
# the tests that need the GPU: a 'cuda' backend parameter (test_backend_ops) or "on_the_gpu" (test_cuda_device)
needs_gpu = [n for n in status if re.search(r"[\[-]cuda[\]-]|on_the_gpu", n)]
gpu = [n for n in needs_gpu if status[n] == "passed"]
unavailable = {n: m for n, m in skips.items() if "backend 'cuda'" in m or "no CUDA backend" in m}
print(f"tests: {counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, "
      f"{counts['skipped']} skipped; GPU tests: {len(gpu)} of {len(needs_gpu)} passed")
for reason in sorted(set(skips.values())):
    print(f"  skipped x{list(skips.values()).count(reason)}: {reason[:200]}")
if unavailable:
    sys.exit(f"{len(unavailable)} tests skipped because the CUDA backend could not run")
if not gpu:
    sys.exit("no CUDA test ran")
EOF
}

tests() {
  begin_step 2 "CUDA tests" "$TEST_TIMEOUT"
  local rc=0
  (cd "$ROOT" && run_limited "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider -rs \
     --junitxml="$LOGDIR/junit.xml" tests/test_backend_ops.py tests/test_cuda_device.py -k cuda) || rc=$?
  [ -f "$LOGDIR/junit.xml" ] || die "pytest wrote no report (exit $rc)"
  count_tests "$LOGDIR/junit.xml" || die "CUDA tests did not run on the GPU"
  [ "$rc" = 0 ] || die "pytest exit $rc"
  end_step "CUDA tests" "$TEST_TIMEOUT"
}

bench() {
  begin_step 3 "bench_gpu.py" "$BENCH_TIMEOUT"
  local rc=0
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  run_limited "$BENCH_TIMEOUT" "$PY" -u benchmarks/bench_gpu.py --workdir "$ROOT/build/gpu-bench" $BENCH_ARGS || rc=$?
  [ "$rc" = 0 ] || die "bench_gpu.py exit $rc"
  end_step "bench_gpu.py" "$BENCH_TIMEOUT"
}

main() {
  local t0
  t0=$(now)
  echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), ${gpu_name:-no GPU found}; log $LOG"
  echo "commit:   $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') ($(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files)"
  build  # always: it also sets up the interpreter and checks that the CUDA backend loads
  if [[ "$STEPS" == *" tests "* ]]; then tests; fi
  if [[ "$STEPS" == *" bench "* ]]; then bench; fi
  echo
  printf '  %s\n' "${STEP_NAMES[@]}"
  echo "gpu_check: OK in $(elapsed "$t0") s"
}

rc=0
main 2>&1 | tee "$LOG" || rc=$?
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$LOG" "$OUT/"
  for f in build.log junit.xml; do
    if [ -f "$LOGDIR/$f" ]; then cp "$LOGDIR/$f" "$OUT/gpu_check-$f"; fi
  done
fi
exit "$rc"

#!/usr/bin/env bash
# Run here (with package-registry access) before benchmarks/gpu_check.sh goes to a GPU machine without
# internet: downloads the wheels gpu_check.sh installs when the machine's image lacks them (Eigen from
# cmeel-eigen for the build, pytest and its dependencies) into benchmarks/wheels/ (git-ignored, about
# 7 MB). Name that folder in the device tool's `carry` list so it travels with the working tree.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip download --quiet --only-binary=:all: --python-version 3.11 --no-deps \
    -d benchmarks/wheels "cmeel-eigen>=3.4,<3.5" "pytest>=8" "pluggy>=1.5" "iniconfig" "packaging" "pygments"
ls -l benchmarks/wheels

#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels of what this project needs and
# the lent GPU machine lacks (it has no network; /work/.library/device/KINDS.md lists its
# packages), into .whl/ (git-ignored). benchmarks/gpu_check.sh installs .whl/*.whl into a
# temporary folder there before its first step; the run tool carries the folder:
#   benchmarks/gpu_check_wheels.sh      # then: run(..., carry=[".whl"])
#
# The check itself needs nothing beyond the machine's list (torch, triton, numpy, pandas,
# pyarrow, scipy, matplotlib, tqdm and pytest are there; tomli only below Python 3.12).
# submitit (a dependency of the sweep launcher, absent there) is carried so that the test
# suite and `moe sweep` import there too; the check never imports it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=(submitit==1.5.3)  # pure Python; its needs (cloudpickle, typing-extensions) are there
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl

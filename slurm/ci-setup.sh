#!/usr/bin/env bash
# CI: install (when missing) and start the local SLURM cluster, printing how long it took.
#   eval "$(bash slurm/ci-setup.sh)"     # exports SLURM_CONF for the rest of the CI script
# Then run the SLURM tests with MOE_TEST_SLURM=1 (tests/slurm_cluster.py finds the
# cluster by itself through `slurm/local-cluster status`).
# stdout carries only the `export SLURM_CONF=...` line; everything else goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
start_ns=$(date +%s%N)
if ! export_line=$("$here/local-cluster" up </dev/null); then
  echo "slurm/ci-setup.sh: the local SLURM cluster did not come up; logs:" >&2
  tail -n 20 "${MOE_SLURM_STATE:-/tmp/moe-local-slurm}"/log/*.log >&2 || true
  exit 1
fi
elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
printf 'slurm/ci-setup.sh: local SLURM cluster up in %d.%03d s\n' \
  $((elapsed_ms / 1000)) $((elapsed_ms % 1000)) >&2
"$here/local-cluster" status >&2
printf '%s\n' "$export_line"

#!/usr/bin/env bash
# One prepared check of the GPU path, made for the machine this project is sometimes lent:
# one CUDA GPU, its own torch and triton (2.11 / 3.6 when this was written), a fixed list of
# Python packages, no network, at most 600 s a command, at most 8 result files.
#
#   benchmarks/gpu_check.sh OUT_DIR          # on the GPU machine, from the repository
#   benchmarks/gpu_check.sh --cpu OUT_DIR    # the same steps at toy sizes on CPU (tests)
#   benchmarks/gpu_check.sh --plan           # each step's time cap and the total; no run
#
# OUT_DIR receives two files, both rewritten after every step, so a check stopped at any
# point keeps every finished step: summary.md (steps, kernel ratios, training, gpu tests)
# and results.tar.gz (every log and record). Steps, the paper-shape kernels first:
#   environment    torch, triton, CUDA, GPU; wheels from .whl/ (benchmarks/gpu_check_wheels.sh,
#                  run where there is a package index) installed into a temporary folder
#   bench_kernels  `moe bench kernels`: the paper's configs' expert shapes first (16k tokens),
#                  Triton vs torch grouped_mm vs the equal-FLOP dense SwiGLU, fwd and
#                  fwd+bwd, each result appended as it is measured; same-run ratios
#   gpu_tests      pytest -m gpu on the test files that hold gpu tests: each test's outcome
#   train_*        `moe bench train` of configs/pocket-tiny.toml and configs/paper/d512-E8-k2.toml
#                  (blocks compiled, as `moe train` on CUDA): tokens/s, MFU, peak memory
#   train_fsdp     `torchrun --nproc-per-node 1 -m moe train` of pocket-tiny with FSDP2 (bf16
#                  matmul weights, fp32 reduction): the sharded path and its checkpoint
# The whole check fits BUDGET_S by construction: the steps' caps, plus the grace `timeout`
# gives a stopped step and the report after each step, add up to at most BUDGET_S, or the
# script refuses to start.
set -uo pipefail

BUDGET_S=420
KILL_S=5     # timeout --kill-after: how late a stopped step may end
REPORT_S=3   # summary.md and results.tar.gz after each step
STEPS=(environment:20 bench_kernels:125 gpu_tests:75 train_pocket-tiny:35
       train_d512-E8-k2:75 train_fsdp:40)

planned_s() {
  local total=0 step
  for step in "${STEPS[@]}"; do total=$(( total + ${step#*:} + KILL_S + REPORT_S )); done
  echo "$total"
}
cap_of() {
  local step
  for step in "${STEPS[@]}"; do [[ ${step%%:*} == "$1" ]] && echo "${step#*:}"; done
}

if [[ "${1:-}" == "--plan" ]]; then
  for step in "${STEPS[@]}"; do
    printf '%s\t%s\n' "${step%%:*}" "$(( ${step#*:} + KILL_S + REPORT_S ))"
  done
  printf 'total\t%s\nbudget\t%s\n' "$(planned_s)" "$BUDGET_S"
  (( $(planned_s) <= BUDGET_S ))
  exit
fi
CPU=0
if [[ "${1:-}" == "--cpu" ]]; then CPU=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: benchmarks/gpu_check.sh [--cpu] OUT_DIR | --plan" >&2
  exit 2
fi
if (( $(planned_s) > BUDGET_S )); then
  echo "error: the steps' caps add up to $(planned_s) s, over the ${BUDGET_S} s budget" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
PY="${PYTHON:-python3}"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1
export PYTHONPATH="$PYTHONPATH:$WORK/site"  # carried wheels go here (the environment step)
START_S=$SECONDS
mkdir -p "$WORK/logs"
printf 'step\tstatus\tseconds\tcap\n' > "$WORK/steps.tsv"

# report: summary.md and results.tar.gz in OUT, each replaced whole (never half-written).
report() {
  timeout "$REPORT_S" "$PY" benchmarks/gpu_check_summary.py "$WORK" > "$WORK/summary.md.tmp" \
    2> "$WORK/logs/summary.log" && cp "$WORK/summary.md.tmp" "$OUT/.summary.md" \
    && mv "$OUT/.summary.md" "$OUT/summary.md"
  tar czf "$OUT/.results.tar.gz" -C "$WORK" --exclude=./site --exclude='./*.tmp' \
    --exclude='./fsdp_run/checkpoints' . 2> /dev/null && mv "$OUT/.results.tar.gz" \
    "$OUT/results.tar.gz"
}

# run_step NAME CMD...: output to logs/NAME.log, status and seconds to steps.tsv, then report.
run_step() {
  local name=$1 cap t0=$SECONDS status; shift
  cap=$(cap_of "$name")
  echo "== $name (up to ${cap}s)"
  timeout --kill-after="$KILL_S" "$cap" "$@" > "$WORK/logs/$name.log" 2>&1
  case $? in
    0) status=ok ;;
    124|137) status="timed out after ${cap}s" ;;
    *) status="failed (see logs/$name.log)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" $(( SECONDS - t0 )) "$cap" >> "$WORK/steps.tsv"
  echo "   $status"
  report
}

if (( CPU )); then
  # Toy sizes: every command and file of the GPU run, in seconds on CPU.
  KERNEL_ARGS=(--shapes small --repeats 1 --warmup 0 --backends torch,triton,dense)
  TRAIN_ARGS=(--steps 2 --warmup 1 --micro-batch 2 --seq-len 16 --device cpu)
  PAPER_ARGS=(--set model.n_layers=1 --set model.vocab_size=512)
  FSDP_ARGS=(--set train.device=cpu)
  export OMP_NUM_THREADS=1
else
  KERNEL_ARGS=(--shapes paper --dtype bf16 --repeats 10 --warmup 2 --backends triton,torch,dense)
  TRAIN_ARGS=(--steps 30 --warmup 3 --device cuda)
  PAPER_ARGS=()
  FSDP_ARGS=(--set train.device=cuda --set train.compile=false)
fi
GPU_TEST_FILES=($(grep -l "pytest.mark.gpu" tests/test_*.py))

run_step environment bash -c 'set -e
  if compgen -G ".whl/*.whl" > /dev/null; then  # no package index there: carried wheels
    "$0" -m pip install -q --no-index --no-deps --no-compile --target "$1/site" .whl/*.whl
  fi
  "$0" benchmarks/gpu_check_summary.py --environment "$1/environment.txt"' "$PY" "$WORK"
run_step bench_kernels "$PY" -m moe bench kernels "${KERNEL_ARGS[@]}" \
  --jsonl "$WORK/bench_kernels.jsonl"
run_step gpu_tests "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TEST_FILES[@]}" \
  --junitxml "$WORK/gpu_tests.xml"
run_step train_pocket-tiny "$PY" -m moe bench train configs/pocket-tiny.toml \
  "${TRAIN_ARGS[@]}" -o "$WORK/train_pocket-tiny.json"
run_step train_d512-E8-k2 "$PY" -m moe bench train configs/paper/d512-E8-k2.toml \
  "${TRAIN_ARGS[@]}" "${PAPER_ARGS[@]}" -o "$WORK/train_d512-E8-k2.json"
run_step train_fsdp "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m moe train configs/pocket-tiny.toml --out "$WORK/fsdp_run" --quiet \
  --set parallel.data=fsdp --set train.tokens=10240 --set "eval.tasks=[]" "${FSDP_ARGS[@]}"

cat "$OUT/summary.md"
echo "total: $(( SECONDS - START_S )) s of a ${BUDGET_S} s budget; results in $OUT"
rm -rf "$WORK"
! grep -qv -e $'\tok\t' -e '^step' <(tar xzf "$OUT/results.tar.gz" -O ./steps.tsv)

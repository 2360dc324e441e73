#!/usr/bin/env bash
# One prepared check of the GPU path, for a machine with one CUDA GPU: no input, at most
# 10 minutes, everything written under OUT_DIR, ending with OUT_DIR/summary.md.
#
#   benchmarks/gpu_check.sh OUT_DIR          # on the GPU machine (repo root or anywhere)
#   benchmarks/gpu_check.sh --cpu OUT_DIR    # the same steps at toy sizes on CPU (CI runs this)
#
# Steps (each with its own time cap inside the 10-minute budget; a failed or timed-out
# step is recorded and the next one still runs):
#   1. gpu_tests      pytest -m gpu: Triton vs loop in bf16, oracle, determinism, no host
#                     syncs, torch.compile, on the device
#   2. bench_kernels  `moe bench kernels` at the paper's expert shapes (d_model 512-2048,
#                     E 8-128, k 2-16, 16k tokens): triton vs torch grouped_mm vs the
#                     equal-FLOP dense matmul, fwd and fwd+bwd TFLOP/s
#   3. train_*        100 training steps each of configs/pocket-tiny.toml and
#                     configs/paper/d512-E8-k2.toml on generated tokens: tokens/s, MFU,
#                     peak memory
#   4. train_fsdp     `torchrun --nproc-per-node 1 -m moe train` of pocket-tiny with
#                     parallel.data = "fsdp" (FSDP2 with bf16 weights, fp32 reduction): a few
#                     steps through the sharded path, its checkpoint and its evaluation
#   5. summary.md     one table of everything (benchmarks/gpu_check_summary.py)
set -uo pipefail

CPU=0
if [[ "${1:-}" == "--cpu" ]]; then CPU=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: benchmarks/gpu_check.sh [--cpu] OUT_DIR" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
PY="${PYTHON:-python}"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1

BUDGET_S=600
START_S=$SECONDS
STEPS_TSV="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\n' > "$STEPS_TSV"

# run_step NAME CAP_S CMD...: stdout+stderr to OUT/NAME.log, status and seconds to steps.tsv.
run_step() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET_S - (SECONDS - START_S) - 15 ))  # 15 s kept for the summary
  (( cap > left )) && cap=$left
  if (( cap <= 0 )); then
    printf '%s\tskipped (no time left)\t0\n' "$name" >> "$STEPS_TSV"
    return
  fi
  local t0=$SECONDS status
  echo "== $name (up to ${cap}s)"
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
  case $? in
    0) status=ok ;;
    124|137) status="timed out after ${cap}s" ;;
    *) status="failed (see $name.log)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" $(( SECONDS - t0 )) >> "$STEPS_TSV"
  echo "   $status"
}

if (( CPU )); then
  # Toy sizes: every command and file of the GPU run, in seconds on CPU.
  KERNEL_ARGS=(--shapes small --repeats 1 --warmup 0)
  TRAIN_ARGS=(--steps 2 --warmup 1 --micro-batch 2 --seq-len 16 --device cpu)
  PAPER_ARGS=(--set model.n_layers=1 --set model.vocab_size=512)
  FSDP_ARGS=(--set train.device=cpu)
  export OMP_NUM_THREADS=1
else
  KERNEL_ARGS=(--shapes paper --dtype bf16 --repeats 10 --warmup 2)
  TRAIN_ARGS=(--steps 100 --warmup 5 --device cuda)
  PAPER_ARGS=()
  FSDP_ARGS=(--set train.device=cuda)
fi

"$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name} | sm_{p.major}{p.minor} | {p.total_memory / 2**30:.0f} GiB")
else:
    print("no CUDA device")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
EOF

run_step gpu_tests 150 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider \
  --junitxml "$OUT/gpu_tests.xml"
run_step bench_kernels 240 "$PY" -m moe bench kernels "${KERNEL_ARGS[@]}" \
  --backends torch,triton,megablocks,dense -o "$OUT/bench_kernels.json"
run_step train_pocket-tiny 60 "$PY" -m moe bench train configs/pocket-tiny.toml \
  "${TRAIN_ARGS[@]}" -o "$OUT/train_pocket-tiny.json"
run_step train_d512-E8-k2 150 "$PY" -m moe bench train configs/paper/d512-E8-k2.toml \
  "${TRAIN_ARGS[@]}" "${PAPER_ARGS[@]}" -o "$OUT/train_d512-E8-k2.json"
run_step train_fsdp 45 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m moe train configs/pocket-tiny.toml --out "$OUT/fsdp_run" --quiet \
  --set parallel.data=fsdp --set train.tokens=10240 --set "eval.tasks=[]" "${FSDP_ARGS[@]}"

"$PY" benchmarks/gpu_check_summary.py "$OUT" > "$OUT/summary.md"
cat "$OUT/summary.md"
echo "total: $(( SECONDS - START_S )) s; everything is in $OUT"
! grep -qv -e $'\tok\t' -e '^step' "$STEPS_TSV"

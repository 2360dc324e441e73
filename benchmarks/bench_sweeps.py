"""Benchmarks of the sweep launcher, against its goals.

    python benchmarks/bench_sweeps.py                 # stub sbatch: no cluster needed
    python benchmarks/bench_sweeps.py --slurm real    # the local cluster (SLURM_CONF set);
                                                      # the submitted array is cancelled at once
Measures:
  1. planning the paper grid (goal: under 1 s);
  2. sbatch calls for launching N runs through the slurm executor (goal: 1, not N);
  3. the launcher's own time per run: launch wall time minus time inside sbatch,
     divided by N (goal: under 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import submitit  # noqa: E402

from moe.sweeps import launch, load_profile, load_spec, plan  # noqa: E402
from moe.sweeps.spec import spec_from_dict  # noqa: E402

FAKE_SBATCH = """#!/bin/sh
echo "$@" >> "{log}"
n=$(wc -l < "{log}")
echo "Submitted batch job $((1000 + n))"
"""
FAKE_SQUEUE = """#!/bin/sh
# every task of every array the stub sbatch accepted is still pending
n=$(cat "{log}" 2>/dev/null | wc -l)
i=1
while [ $i -le $n ]; do
  j=0
  while [ $j -lt {n_runs} ]; do echo "$((1000 + i))_$j|PENDING"; j=$((j + 1)); done
  i=$((i + 1))
done
"""
FAKE_QUIET = "#!/bin/sh\nexit 0\n"


def bench_plan(repeats: int = 5) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runs = plan(load_spec(ROOT / "sweeps" / "paper.toml"))
        times.append(time.perf_counter() - t0)
    return {"paper_runs": len(runs), "plan_s_best": min(times), "plan_s_median":
            sorted(times)[len(times) // 2]}


def n_run_spec(n_runs: int):
    """N distinct tiny runs (one axis over the seed)."""
    base = {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
            "train": {"batch_size": 4, "num_threads": 1}}
    return spec_from_dict({"name": "bench", "base": base, "budget": {"tokens": 1024},
                           "grid": {"train.seed": list(range(n_runs))}})


class SbatchMeter:
    """Counts and times sbatch subprocess calls made through submitit."""

    def __init__(self) -> None:
        self.calls, self.seconds = 0, 0.0
        self._original = submitit.core.utils.CommandFunction.__call__
        meter = self

        def timed(cmd_self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return meter._original(cmd_self, *args, **kwargs)
            finally:
                if cmd_self.command and cmd_self.command[0] == "sbatch":
                    meter.calls += 1
                    meter.seconds += time.perf_counter() - t0

        submitit.core.utils.CommandFunction.__call__ = timed

    def close(self) -> None:
        submitit.core.utils.CommandFunction.__call__ = self._original


def install_fake_slurm(bin_dir: Path, n_runs: int) -> Path:
    log = bin_dir / "sbatch.log"
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(log=log))
    (bin_dir / "squeue").write_text(FAKE_SQUEUE.format(log=log, n_runs=n_runs))
    for name in ("srun", "sacct"):
        (bin_dir / name).write_text(FAKE_QUIET)
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return log


def bench_launch(n_runs: int, mode: str, work: Path) -> dict:
    spec = n_run_spec(n_runs)
    plan(spec)  # warm imports and caches, as a second launch would be
    profile = load_profile(ROOT / "slurm" / "profiles" / "local.toml")
    log = install_fake_slurm(work / "bin", n_runs) if mode == "fake" else None
    meter = SbatchMeter()
    try:
        t0 = time.perf_counter()
        report = launch(spec, work / "sweep", executor="slurm", profile=profile)
        wall_s = time.perf_counter() - t0
    finally:
        meter.close()
    if mode == "real":
        arrays = sorted({j.split("_")[0] for j in report.job_ids.values()})
        subprocess.run(["scancel", *arrays], check=False)
    out = {"mode": mode, "runs": n_runs, "submitted": len(report.submitted),
           "sbatch_calls": meter.calls, "sbatch_s": meter.seconds, "launch_s": wall_s,
           "overhead_ms_per_run": 1000 * (wall_s - meter.seconds) / n_runs,
           "job_arrays": len({j.split("_")[0] for j in report.job_ids.values()})}
    if log is not None:
        out["sbatch_calls_seen_by_stub"] = len(log.read_text().splitlines())
    if mode == "fake":  # the stub queue still holds every task: nothing may go twice
        t0 = time.perf_counter()
        again = launch(spec, work / "sweep", executor="slurm", profile=profile)
        out["relaunch_s"] = time.perf_counter() - t0
        out["relaunch_submitted"] = len(again.submitted)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="runs in the launch benchmark")
    parser.add_argument("--slurm", choices=("fake", "real"), default="fake")
    parser.add_argument("-o", "--out", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    results = {"plan": bench_plan()}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bin").mkdir()
        results["launch"] = bench_launch(args.runs, args.slurm, Path(tmp))
    p, lch = results["plan"], results["launch"]
    print(f"plan paper grid: {p['paper_runs']} runs in {p['plan_s_best'] * 1000:.1f} ms "
          f"(median {p['plan_s_median'] * 1000:.1f} ms)   goal < 1000 ms")
    print(f"launch {lch['runs']} runs ({lch['mode']} slurm): {lch['sbatch_calls']} sbatch "
          f"call(s), {lch['job_arrays']} job array(s)   goal: 1")
    print(f"launcher overhead: {lch['overhead_ms_per_run']:.2f} ms/run "
          f"(launch {lch['launch_s']:.2f} s, of which sbatch {lch['sbatch_s']:.3f} s)   "
          "goal < 50 ms")
    if "relaunch_s" in lch:
        print(f"relaunch while all {lch['runs']} are queued: {lch['relaunch_submitted']} "
              f"submitted in {lch['relaunch_s']:.2f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A stub SLURM on PATH for launcher tests: `sbatch` keeps every batch script it is given.

The stub accepts every submission (job ids 4001, 4002, ...), `squeue` and `sacct` know
no jobs, so nothing ever runs; tests read the kept scripts from `scripts_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

from moe.sweeps.spec import spec_from_dict

SBATCH = """#!/bin/sh
n=$(ls "{scripts}" | wc -l)
cp "$1" "{scripts}/job-$((n + 1)).sh"
echo "Submitted batch job $((4001 + n))"
"""
QUIET = "#!/bin/sh\nexit 0\n"


def install(tmp_path: Path, monkeypatch) -> Path:
    """Put stub sbatch/squeue/sacct/srun first on PATH; returns the folder of kept scripts."""
    bin_dir, scripts = tmp_path / "fake-bin", tmp_path / "sbatch-scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH.format(scripts=scripts))
    for name in ("squeue", "sacct", "srun"):
        (bin_dir / name).write_text(QUIET)
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def scripts(folder: Path) -> list[str]:
    return [p.read_text() for p in sorted(folder.iterdir())]


def two_run_spec(name: str = "harden"):
    """Two tiny runs (never trained here)."""
    base = {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
            "train": {"batch_size": 4, "num_threads": 1}}
    return spec_from_dict({"name": name, "base": base, "budget": {"tokens": 1024},
                           "grid": {"train.seed": [0, 1]}})

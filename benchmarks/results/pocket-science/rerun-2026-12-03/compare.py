"""This re-run against the committed study (run on another machine, commit 336baee).

    python benchmarks/results/pocket-science/rerun-2026-12-03/compare.py
"""

import json
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
old = pd.read_parquet(HERE.parent / "results.parquet")
new = pd.read_parquet(HERE / "results.parquet")
print(f"runs: {len(old)} then, {len(new)} now")
print(f"training core-seconds: {old.train_wall_s.sum():.0f} then, {new.train_wall_s.sum():.0f} "
      f"now, ratio {new.train_wall_s.sum() / old.train_wall_s.sum():.3f}")
m = old[["run_id", "model.d_model", "train.tokens", "train_wall_s", "val_loss"]].merge(
    new[["run_id", "train_wall_s", "val_loss"]], on="run_id", suffixes=("_then", "_now"))
g = m.groupby(["model.d_model", "train.tokens"])
print("training time now / then, by width and budget:")
print((g.train_wall_s_now.sum() / g.train_wall_s_then.sum()).round(3).to_string())
diff = m.val_loss_now - m.val_loss_then
print(f"validation loss, now - then: mean {diff.mean():+.4f}, largest {diff.abs().max():.4f}")
then = {f["id"]: f for f in json.loads((HERE.parent / "findings.json").read_text())}
now = {f["id"]: f for f in json.loads((HERE / "findings.json").read_text())}
for key, a in then.items():
    b = now[key]
    print(f"{key}:\n  then {a['verdict']}: {a['estimate']:+.4f} [{a['ci_low']:+.4f}, "
          f"{a['ci_high']:+.4f}]\n  now  {b['verdict']}: {b['estimate']:+.4f} "
          f"[{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]")

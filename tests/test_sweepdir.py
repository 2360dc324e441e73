"""`moe.sweepdir.SweepDir` owns a sweep directory's layout as `RunDir` owns a run's: no other
module of the package builds a path of either (a scan of the package's syntax), and the
sweep's parts are where docs/architecture.md says."""

from __future__ import annotations

import ast
from pathlib import Path

import moe.rundir as rundir
import moe.sweepdir as sweepdir
from moe.rundir import RunDir
from moe.sweepdir import SweepDir

ROOT = Path(__file__).resolve().parent.parent
OWNERS = {"moe/rundir.py", "moe/sweepdir.py"}
LAYOUT_CONSTANTS = {
    rundir: ("CONFIG", "STATUS", "METRICS", "CHECKPOINTS", "EVAL", "SNAPSHOTS", "EMA", "RESULT",
             "EXPORT_HF", "HARNESS", "TENSORBOARD", "WORKER_LOG", "WRITER_LOCK"),
    sweepdir: ("SPEC", "RUNS", "RECIPES", "RESULTS", "REPORT", "LAUNCH_LOCK", "SLURM_LOGS"),
}
NAMES = {name for names in LAYOUT_CONSTANTS.values() for name in names}
VALUES = {getattr(module, name) for module, names in LAYOUT_CONSTANTS.items() for name in names}


def _is_layout_part(node: ast.AST) -> bool:
    """A file or folder name of the run/sweep layout: its literal or its constant."""
    if isinstance(node, ast.Constant):
        return node.value in VALUES
    if isinstance(node, ast.Name):
        return node.id in NAMES
    return isinstance(node, ast.Attribute) and node.attr in NAMES


def layout_paths_built(source: str) -> list[int]:
    """Lines that join a layout part onto a path (`x / "runs"`, `x.joinpath(RESULT)`,
    `x.with_name("sweep.toml")`) or test a path part against one (`p.name == "runs"`)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            hit = _is_layout_part(node.left) or _is_layout_part(node.right)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            hit = node.func.attr in ("joinpath", "with_name") and any(
                _is_layout_part(a) for a in node.args)
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            hit = any(isinstance(s, ast.Attribute) and s.attr == "name" for s in sides) and any(
                _is_layout_part(s) for s in sides)
        else:
            continue
        if hit:
            lines.append(node.lineno)
    return sorted(set(lines))


def places_building_layout_paths(root: Path) -> list[str]:
    found = []
    for path in sorted((root / "moe").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel not in OWNERS:
            found += [f"{rel}:{line}" for line in layout_paths_built(path.read_text("utf-8"))]
    return found


def test_the_scan_sees_every_way_of_building_a_layout_path():
    code = ('a = d / "runs" / rid\nb = d / RESULT\nc = p.joinpath("sweep.toml")\n'
            'e = run.path.parent.name != "runs"\nf = run.result_path\ng = d / "other"\n'
            'h = x.with_name(".launch.lock")\n')
    assert layout_paths_built(code) == [1, 2, 3, 4, 7]


def test_no_module_outside_rundir_and_sweepdir_builds_a_run_or_sweep_path():
    assert places_building_layout_paths(ROOT) == []


def test_sweep_parts_are_where_the_layout_says(tmp_path):
    sweep = SweepDir(tmp_path)
    assert sweep.spec_path == tmp_path / "sweep.toml"
    assert sweep.run("abc") == RunDir(tmp_path / "runs" / "abc")
    assert sweep.results_path == tmp_path / "results.parquet"
    assert sweep.launch_lock_path == tmp_path / ".launch.lock"
    assert sweep.slurm_job_folder == tmp_path / "slurm" / "%j"
    assert sweep.runs() == [] and sweep.recipes() == []


def test_runs_are_those_with_a_config_and_recipes_those_with_a_result(tmp_path):
    sweep = SweepDir(tmp_path)
    for run_id in ("b", "a"):
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "runs" / run_id / "config.toml").write_text("")
    (tmp_path / "runs" / "half-made").mkdir()
    (tmp_path / "recipes" / "merge-1").mkdir(parents=True)
    (tmp_path / "recipes" / "merge-1" / "result.json").write_text("{}")
    (tmp_path / "recipes" / "empty").mkdir()
    assert [r.name for r in sweep.runs()] == ["a", "b"]
    assert sweep.recipes() == [RunDir(tmp_path / "recipes" / "merge-1")]


def test_a_run_knows_its_sweep_only_inside_one(tmp_path):
    sweep = SweepDir(tmp_path / "s")
    sweep.write_spec('name = "pocket"\n')
    assert SweepDir.of_run(sweep.run("x")) == sweep and sweep.name() == "pocket"
    assert SweepDir.of_run(RunDir(tmp_path / "s" / "elsewhere" / "x")) is None
    assert SweepDir.of_run(RunDir(tmp_path / "runs" / "x")) is None  # no sweep.toml

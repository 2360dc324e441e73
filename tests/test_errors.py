"""`moe.app.errors`: every expected failure of a command reaches the user as one line,
`error: <what> (<path>)`, with the exit code README.md documents; anything else is our bug
(exit 70, the traceback saved to a file the line names); MOE_DEBUG=1 adds the traceback
and keeps the exit code; Python warnings are one line. Faults are injected where the
command writes or computes."""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_config
from moe.app import errors
from moe.app.cli import main
from moe.errors import BadConfig, BadInput, MissingResource
from moe.rundir import RunDir

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def sweep(tmp_path):
    """A sweep directory with one finished run (files only, nothing trained)."""
    run = RunDir(tmp_path / "sweep" / "runs" / "good")
    run.write_config(tiny_config())
    run.write_result({"run_id": "good", "train_loss": 1.5, "val_loss": 1.6})
    return tmp_path / "sweep"


def _module(name: str):
    return importlib.import_module(name)  # moe.sweeps re-exports functions of these names


def _fail_writes(monkeypatch, exc: OSError) -> None:
    def fsync(fd):
        raise exc

    monkeypatch.setattr("moe.io.os.fsync", fsync)


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, f"one line expected, got {err!r}"
    return code, err.strip()


def test_disk_full_is_one_line_with_the_path(sweep, monkeypatch, capsys):
    _fail_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    code, err = _run(["sweep", "collect", str(sweep), "-o", str(sweep / "t.csv")], capsys)
    assert code == errors.EXIT_OS == 5
    assert err == f"error: no space left on device: free some space and rerun (it resumes) " \
                  f"({sweep / 't.csv'})"
    assert not list(sweep.glob("*.tmp")) and not list(sweep.glob(".*.tmp"))


def test_permission_denied_is_one_line_with_the_path(sweep, monkeypatch, capsys):
    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(_module("moe.sweeps.collect"), "atomic_write_bytes", denied)
    code, err = _run(["sweep", "collect", str(sweep), "-o", str(sweep / "t.csv")], capsys)
    assert (code, err) == (4, f"error: permission denied ({sweep / 't.csv'})")


def test_file_exists_is_bad_input(sweep, monkeypatch, capsys):
    def exists(path, data):
        raise FileExistsError(errno.EEXIST, "File exists", str(path))

    monkeypatch.setattr(_module("moe.sweeps.collect"), "atomic_write_bytes", exists)
    code, err = _run(["sweep", "collect", str(sweep), "-o", str(sweep / "t.csv")], capsys)
    assert code == 2 and err.startswith("error: already exists") and str(sweep) in err


def test_training_failed_has_its_own_exit_code(tmp_path, capsys):
    cfg = tmp_path / "diverges.toml"
    cfg.write_text(tiny_config("train.lr=1e20", "train.min_lr=0").to_toml())
    code, err = _run(["train", str(cfg), "--quiet", "--out", str(tmp_path / "run")], capsys)
    assert code == 3 and re.match(r"error: run .* failed at step \d+: diverged", err)


@pytest.mark.parametrize("exc", [ValueError("bad value"), KeyError("shards"),
                                 ZeroDivisionError("division by zero")])
def test_a_bug_exits_70_and_saves_its_traceback(exc, sweep, tmp_path, monkeypatch, capsys):
    """A ValueError our code did not expect is our bug, not the user's bad input (2)."""
    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(_module("moe.sweeps.status"), "status", broken)
    monkeypatch.setenv("MOE_CRASH_DIR", str(tmp_path / "crashes"))
    code, err = _run(["sweep", "status", str(sweep)], capsys)
    (saved,) = (tmp_path / "crashes").iterdir()
    assert code == errors.EXIT_INTERNAL == 70
    assert err == (f"error: internal error: {type(exc).__name__}: {str(exc).strip()} (a bug; run "
                   f"with MOE_DEBUG=1 and report it; traceback in {saved})")
    assert "Traceback (most recent call last)" in saved.read_text()
    assert "in broken" in saved.read_text()


@pytest.mark.parametrize("exc, code", [(BadInput("no such table"), 2),
                                       (BadConfig("model.top_k=9 must be <= 8"), 2),
                                       (MissingResource("wandb is not installed"), 69)])
def test_user_errors_exit_with_their_own_code(exc, code, sweep, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(_module("moe.sweeps.status"), "status", broken)
    assert _run(["sweep", "status", str(sweep)], capsys) == (code, f"error: {exc}")


def test_moe_debug_adds_the_traceback_and_keeps_the_exit_code(sweep, monkeypatch, capsys):
    _fail_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setenv("MOE_DEBUG", "1")
    assert main(["sweep", "collect", str(sweep)]) == errors.EXIT_OS
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("error: no space left on device")


WARNS = """
import importlib, sys, warnings
status = importlib.import_module("moe.sweeps.status")  # moe.sweeps.status is also a function

def warns(*args, **kwargs):
    warnings.warn("checkpoint step-8 is damaged:\\n  skipped", stacklevel=1)
    return []

status.status = warns
from moe.app.cli import main
sys.exit(main(["sweep", "status", sys.argv[1]]))
"""


def test_warnings_are_one_line(sweep):
    out = subprocess.run([sys.executable, "-c", WARNS, str(sweep)], capture_output=True,
                         text=True, env={**os.environ, "MOE_DEBUG": ""})
    assert out.returncode == 0
    assert out.stderr == "warning: checkpoint step-8 is damaged: skipped\n"


def test_readme_documents_every_exit_code():
    text = README.read_text()
    section = text[text.index("## Reliability"):]
    documented = {int(c) for c in re.findall(r"^\| `(\d+)` \|", section, flags=re.M)}
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert documented == codes


def test_a_result_table_survives_the_failed_write(sweep, monkeypatch, capsys):
    """The write failed atomically: the old table is intact, no temp file is left."""
    assert main(["sweep", "collect", str(sweep), "-o", str(sweep / "t.csv")]) == 0
    before = (sweep / "t.csv").read_bytes()
    RunDir(sweep / "runs" / "good").write_result(
        {"run_id": "good", "train_loss": 9.0, "val_loss": 9.0})
    _fail_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert main(["sweep", "collect", str(sweep), "-o", str(sweep / "t.csv")]) == 5
    assert (sweep / "t.csv").read_bytes() == before
    assert json.loads((sweep / "runs" / "good" / "result.json").read_text())["val_loss"] == 9.0



NO_TORCH = """
import contextlib, io, json, sys
class Missing:  # what `pip install moe-sparsity` without the [train] extra looks like
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "submitit", "triton"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
from moe.app.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def test_commands_that_need_torch_name_the_extra_and_planning_runs_without_it(tmp_path):
    import subprocess
    import sys

    needs_torch = [["train", "configs/pocket-tiny.toml", "--out", f"{tmp_path}/run"],
                   ["demo", "--dir", f"{tmp_path}/demo", "--quiet"],
                   ["sweep", "launch", "sweeps/pocket.toml", "--dir", f"{tmp_path}/s"]]
    plan = ["sweep", "plan", "sweeps/pocket.toml", "--format", "csv"]
    out = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps([*needs_torch, plan])],
                         capture_output=True, text=True, cwd=README.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    *failed, (plan_code, plan_out, _) = json.loads(out.stdout)
    for code, _, err in failed:
        assert code == errors.EXIT_MISSING_RESOURCE
        assert err.strip().splitlines() == ["error: this command needs torch, which is not "
                                             "installed: pip install 'moe-sparsity[train]'"]
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    assert plan_code == 0
    assert len(plan_out.strip().splitlines()) == 31  # a header and the demo's 30 runs

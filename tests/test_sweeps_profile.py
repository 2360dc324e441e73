"""Cluster profiles and the sbatch script (`moe.sweeps.profile`): nothing from a spec or a
cluster profile becomes a line of its own in the generated sbatch script, and every value
the script's shell reads is quoted.

Each probe launches through the slurm executor with a stub `sbatch` on PATH that keeps
the script it is given (tests/fakeslurm.py); the injected command must appear in no line.
"""

from __future__ import annotations

import os
import re
import subprocess

import fakeslurm
import pytest

from moe.sweeps import launch
from moe.sweeps.profile import ClusterProfile, profile_from_dict
from moe.sweeps.spec import SpecError

INJECTED = "touch INJECTED"

PROBES = {
    "name": ({}, f"x\n{INJECTED}"),
    "partition": ({"partition": f"gpu\n{INJECTED}"}, None),
    "account": ({"account": f"acct\n{INJECTED}"}, None),
    "qos": ({"qos": f"normal\r\n{INJECTED}"}, None),
    "constraint": ({"constraint": f"h100\n{INJECTED}"}, None),
    "additional_value": ({"additional_parameters": {"comment": f"c\n{INJECTED}"}}, None),
    "additional_key": ({"additional_parameters": {f"exclusive\n{INJECTED}": True}}, None),
    "setup": ({"setup": [f"module load cuda\n{INJECTED}"]}, None),
}


def _injected_lines(texts: list[str]) -> list[str]:
    return [line for text in texts for line in text.splitlines()
            if line.strip().startswith(INJECTED)]


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_no_injected_line_reaches_the_sbatch_script(probe, tmp_path, monkeypatch):
    kept = fakeslurm.install(tmp_path, monkeypatch)
    raw_profile, name = PROBES[probe]
    error = ""
    try:
        profile = profile_from_dict(raw_profile) if raw_profile else ClusterProfile()
        launch(fakeslurm.two_run_spec(name or "harden"), tmp_path / "sweep", executor="slurm",
               profile=profile, progress=False)
    except ValueError as exc:
        error = str(exc)
    assert _injected_lines(fakeslurm.scripts(kept)) == []
    assert fakeslurm.scripts(kept) == [], "sbatch must not be called at all"
    assert re.search("control character|may hold only|option name", error), error


def test_a_clean_profile_still_submits_one_script(tmp_path, monkeypatch):
    kept = fakeslurm.install(tmp_path, monkeypatch)
    profile = profile_from_dict({"partition": "gpu", "setup": ["module load cuda/12.4"],
                                 "additional_parameters": {"comment": "a b; c"}})
    report = launch(fakeslurm.two_run_spec(), tmp_path / "sweep", executor="slurm",
                    profile=profile, progress=False)
    (script,) = fakeslurm.scripts(kept)
    assert len(report.submitted) == 2 and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --comment='a b; c'" in script  # quoted by submitit: one word


def test_pythonpath_setup_line_is_quoted(tmp_path, monkeypatch):
    """A checkout path with a space and a `$(...)` is exported verbatim, nothing runs."""
    checkout = tmp_path / "my checkout $(touch INJECTED)"
    monkeypatch.setattr("moe.sweeps.local.PACKAGE_ROOT", checkout)
    kept = fakeslurm.install(tmp_path, monkeypatch)
    launch(fakeslurm.two_run_spec(), tmp_path / "sweep", executor="slurm",
           profile=ClusterProfile(), progress=False)
    (script,) = fakeslurm.scripts(kept)
    (line,) = [x for x in script.splitlines() if x.startswith("export PYTHONPATH=")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(["bash", "-c", f'{line}\nprintf %s "$PYTHONPATH"'], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out == str(checkout)
    assert not (tmp_path / "INJECTED").exists()
    env["PYTHONPATH"] = "/already/there"
    out = subprocess.run(["bash", "-c", f'{line}\nprintf %s "$PYTHONPATH"'], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out == f"{checkout}:/already/there"


@pytest.mark.parametrize("name", ["paper", "pocket-science", "v1.2_run"])
def test_ordinary_names_are_accepted(name):
    from moe.sweeps.executor import check_sweep_name

    assert check_sweep_name(name) == name


@pytest.mark.parametrize("bad", ["a b", "x;y", "$(id)", "", "a/b", "ü"])
def test_names_outside_the_safe_set_are_refused(bad):
    from moe.sweeps.executor import LaunchError, check_sweep_name

    with pytest.raises(LaunchError, match="may hold only"):
        check_sweep_name(bad)


def test_profile_strings_with_control_characters_are_refused_when_read():
    with pytest.raises(SpecError, match="control character"):
        profile_from_dict({"partition": "gpu\tx\x00"})

"""`moe.io`: atomic writes follow the umask, and output directories are never mixed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from moe.io import (
    OutputDirNotEmpty,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    claim_output_dir,
    update_json,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_atomic_writes_get_the_mode_open_gives_under_the_umask(tmp_path, umask):
    # the reference is the OS itself: POSIX gives a file created by open() 0666 & ~umask
    with open(tmp_path / "plain", "w") as f:
        f.write("x")
    expected = _mode(tmp_path / "plain")
    assert expected == 0o666 & ~umask  # 0644 under 022, 0600 under 077
    written = [atomic_write_bytes(tmp_path / "a.bin", b"data"),
               atomic_write_json(tmp_path / "b.json", {"k": 1})]
    update_json(tmp_path / "status.json", lambda old: {**old, "state": "running"})
    written.append(tmp_path / "status.json")
    for path in written:
        assert _mode(path) == expected, path
    atomic_write_bytes(tmp_path / "a.bin", b"again")  # a replaced file too
    assert _mode(tmp_path / "a.bin") == expected
    assert (tmp_path / "a.bin").read_bytes() == b"again"
    assert not list(tmp_path.glob(".*.tmp"))  # still atomic: nothing left beside it


def test_output_dir_new_empty_or_its_own_is_accepted(tmp_path):
    claim_output_dir(tmp_path / "new", "merge", source="/runs/a")
    (tmp_path / "new" / "result.json").write_text("{}")
    check_output_dir(tmp_path / "new", "merge", source="/runs/a")  # its own: a rerun
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "merge")
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "fig1.png").write_bytes(b"")
    check_output_dir(figs, "plot", own_names={"fig1.png", "fig1.pdf"})


@pytest.mark.parametrize("case", ["foreign file", "other source", "other command", "a file"])
def test_output_dir_holding_anything_else_is_refused_naming_it(tmp_path, case):
    out = tmp_path / "out"
    if case == "a file":
        out.write_text("x")
    elif case == "foreign file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        claim_output_dir(out, "export" if case == "other command" else "merge",
                         source="/runs/b")
        (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(OutputDirNotEmpty, match=str(out)):
        check_output_dir(out, "merge", source="/runs/a")
    if case != "a file":
        check_output_dir(out, "merge", source="/runs/a", force=True)

"""Every `moe` command the README shows runs, in order, on small stand-ins for its inputs.

The README's configs and sweeps are swapped for tiny ones (same commands, same flags),
so the whole tour runs in seconds; the SLURM commands are exercised against the real
local cluster by tests/test_sweeps_slurm.py, and `make demo` (`moe demo`) by
tests/test_demo.py.
"""

import re
import shlex
from pathlib import Path

import pytest

from helpers import tiny_config
from moe.app.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY_SWEEP = """
name = "readme-tour"
[base.model]
n_layers = 1
n_heads = 2
seq_len = 64
[base.train]
batch_size = 8
warmup_steps = 2
checkpoint_every = 8
num_threads = 1
[base.data]
pocket_entities = 30
pocket_arith_problems = 200
pocket_eval_items = 10
[base.eval]
tasks = ["pocket-memorization", "pocket-reasoning"]
max_items = 10
accuracy = false
[budget]
tokens = 4096
[[grid]]
"model.d_model" = [16, 24, 32]
"model.n_experts" = [1]
"model.top_k" = [1]
[[grid]]
"model.d_model" = [16, 24, 32]
"model.n_experts" = [4]
"model.top_k" = [2]
"""


def readme_commands() -> list[list[str]]:
    """`moe ...` lines of the README's code blocks (continuations joined, comments cut)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "moe":
                commands.append(words[1:])
    return commands


def stand_in(words: list[str], tmp: Path) -> list[str] | None:
    """Map the README's inputs to tiny ones; None for commands tested elsewhere."""
    if any("slurm" in word for word in words):
        return None
    out = []
    for word in words:
        word = {"configs/pocket-tiny.toml": str(tmp / "tiny.toml"),
                "sweeps/pocket.toml": str(tmp / "tour.toml"),
                "sweeps/pocket-science.toml": str(tmp / "tour.toml"),
                "sweeps/paper.toml": str(ROOT / "sweeps" / "paper.toml")}.get(word, word)
        if word.startswith("tests/data/"):
            word = str(ROOT / word)
        out.append(word)
    if "--bootstrap" in out:
        out[out.index("--bootstrap") + 1] = "20"
    if "train.save_every=10" in out:  # the stand-in run has 8 steps: snapshots at 4 and 8
        out[out.index("train.save_every=10")] = "train.save_every=4"
    if out[0] == "merge":  # a window over the stand-in's last two snapshots
        out[out.index("--window") + 1] = "4"
    return out


def test_readme_shows_the_whole_loop():
    verbs = {" ".join(c[:2]) if c[0] in ("sweep", "data") else c[0] for c in readme_commands()}
    assert {"train", "eval", "sweep plan", "sweep launch", "sweep status", "sweep collect",
            "fit", "plot", "report"} <= verbs


def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.toml").write_text(
        tiny_config("train.tokens=4096", "model.seq_len=64", "data.pocket_eval_items=10").to_toml())
    (tmp_path / "tour.toml").write_text(TINY_SWEEP)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for words in readme_commands():
        argv = stand_in(words, tmp_path)
        if argv is None:
            continue
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"`moe {' '.join(words)}` exited {code}: {err}"
        ran += 1
    assert ran >= 12
    assert (tmp_path / "runs" / "pocket" / "results.parquet").is_file()
    assert (tmp_path / "runs" / "pocket" / "report.md").is_file()
    assert list((tmp_path / "runs" / "pocket" / "figures").glob("*.png"))


@pytest.mark.parametrize("target", ["demo", "test"])
def test_makefile_targets_are_the_readme_commands(target):
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert f"make {target}" in readme and f"\n{target}: install" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()

"""The notebooks execute top to bottom (jupytext -> nbclient) on small inputs."""

import os
from pathlib import Path

import pytest

from moe.analysis.synthetic import pocket_table

ROOT = Path(__file__).resolve().parents[1]
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")


def _execute(name: str, env: dict[str, str], tmp_path: Path) -> list:
    nb = jupytext.read(ROOT / "notebooks" / name)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def test_paper_figures_notebook(tmp_path):
    table = tmp_path / "results.parquet"
    pocket_table(seed=1).to_parquet(table)
    outputs = _execute("paper_figures.py", {"MOE_RESULTS": str(table)}, tmp_path)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "runs from" in text


def test_chinchilla_notebook_reproduces_reference(tmp_path):
    outputs = _execute("chinchilla_fit.py", {"MOE_REPO": str(ROOT), "MOE_BOOTSTRAP": "20"},
                       tmp_path)
    text = "".join(o.get("text", "") for o in outputs)
    assert "240 points, objective 0.0010183" in text

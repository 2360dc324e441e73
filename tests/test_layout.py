"""The package's shape: one import package, layers whose arrows point down, no cycles,
torch-free analysis, a wheel with `moe` alone, and one definition of the paper model."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from moe.config import load_config
from moe.sweeps import load_spec, plan

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moe"

# docs/architecture.md, "Layers": a module may import modules of its own rank or below.
RANKS = {
    "moe.io": 0, "moe.config": 0, "moe.params": 0, "moe.rundir": 0, "moe.procs": 0,
    "moe.sweepdir": 0, "moe.record": 0, "moe.errors": 0,
    "moe.kernels": 1,
    "moe.model": 2, "moe.data": 2, "moe.tasks": 2,
    "moe.checkpoint": 3, "moe.checkpoint_dcp": 3,
    "moe.eval": 4, "moe.export": 4,
    "moe.train": 5, "moe.recipes": 5,
    "moe.sweeps": 6, "moe.analysis": 6,
    "moe.app": 7, "moe.__main__": 7,
    # The package root is the public facade (`moe.load_model`): it imports lazily, and no
    # module of the package imports it (test_nothing_imports_the_package_facade).
    "moe": 7,
}
# Torch-free modules: what planning, analysis and the launcher stand on.
TORCH_FREE = ("moe.io", "moe.config", "moe.params", "moe.rundir", "moe.sweepdir", "moe.record",
              "moe.analysis")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank_of(module: str) -> int:
    """The layer of `module`: its longest listed prefix (the root "moe" matches only itself)."""
    found = [p for p in RANKS if module == p or (p != "moe" and module.startswith(p + "."))]
    if not found:
        raise KeyError(f"{module} has no layer: add it to RANKS and docs/architecture.md")
    return RANKS[max(found, key=len)]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """First-party modules `path` imports anywhere (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(_resolve(n, modules) for n in names if n.split(".")[0] == "moe")
    found.discard(None)
    return found


def _resolve(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports_of(p, set(files)) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module-level edges, by depth-first search (None when acyclic)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_import_graph_checker_sees_cycles_and_upward_arrows():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert rank_of("moe.app.cli") > rank_of("moe.sweeps.launch") > rank_of("moe.train.loop")
    assert rank_of("moe.train") > rank_of("moe.eval.evaluate") > rank_of("moe.model.lm")


def test_every_module_has_a_layer():
    for module in import_graph():
        rank_of(module)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_imports_point_down_the_layers():
    upward = [f"{m} (rank {rank_of(m)}) imports {n} (rank {rank_of(n)})"
              for m, targets in import_graph().items() for n in targets
              if rank_of(n) > rank_of(m)]
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_package_facade():
    importers = [m for m, targets in import_graph().items() if "moe" in targets]
    assert not importers, importers


def test_analysis_and_base_import_no_torch_module():
    graph = import_graph()
    torchy = {m for m, p in ((module_name(p), p) for p in PACKAGE.rglob("*.py"))
              if "torch" in {n.split(".")[0] for n in _all_imports(p)}}
    for m, targets in graph.items():
        if m.startswith(TORCH_FREE):
            assert m not in torchy, f"{m} imports torch"
            bad = [n for n in targets if n in torchy]
            assert not bad, f"{m} imports torch-importing {bad}"


def _all_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_importing_analysis_loads_no_torch():
    code = ("import sys, moe.analysis, moe.analysis.report, moe.analysis.plots, "
            "moe.analysis.bootstrap, moe.sweeps.plan, moe.rundir, moe.sweepdir, moe.record; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_wheel_top_level_is_moe_alone(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("moe_sparsity-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"moe"}
    assert "moe/sweeps/pocket.toml" in names  # the demo's embedded spec travels with the wheel
    # `pip install moe-sparsity` plans and analyses without torch: pip reads Requires-Dist
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line.split(":", 1)[1].strip() for line in
                zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    assert not [r for r in base if r.split(">")[0].split("=")[0].split(";")[0].strip()
                in ("torch", "triton", "submitit")], base
    assert any(r.startswith("torch") and 'extra == "train"' in r for r in requires)
    assert any(r.startswith("submitit") and 'extra == "train"' in r for r in requires)


def test_paper_configs_equal_the_planned_paper_runs():
    runs = {(r.config.model.d_model, r.config.model.n_experts, r.config.model.top_k): r.config
            for r in plan(load_spec(ROOT / "sweeps" / "paper.toml"))}
    configs = sorted((ROOT / "configs" / "paper").glob("d*-E*-k*.toml"))
    assert len(configs) >= 3
    for path in configs:
        cfg = load_config(path)
        planned = runs[(cfg.model.d_model, cfg.model.n_experts, cfg.model.top_k)]
        for section, values in cfg.to_dict().items():
            for key, value in values.items():
                assert planned.to_dict()[section][key] == value, (path.name, section, key)

"""`moe bench kernels`: runs on CPU, reports what it ran and why it skipped the rest."""

import argparse
import json

import pytest
import torch

from moe.app import bench


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moe")
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_bench_kernels_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    tiny = [bench.BenchShape(d_model=16, n_experts=4, top_k=2, n_tokens=32)]
    monkeypatch.setattr(bench, "small_shapes", lambda: tiny)
    monkeypatch.setattr(bench, "paper_shapes", lambda n_tokens=0: tiny)
    out = tmp_path / "bench.json"
    args = _parse(["bench", "kernels", "-o", str(out), "--repeats", "1", "--warmup", "0"])
    assert args.func(args) == 0

    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["triton"] and env["device"]
    by_backend = {r["backend"]: r for r in report["results"]}
    assert set(by_backend) == set(bench.BACKENDS)
    for name in ("loop", "torch", "dense"):
        assert by_backend[name]["fwdbwd_ms"] > 0 and by_backend[name]["fwd_tflops"] > 0
    if not torch.cuda.is_available():
        assert "no CUDA" in by_backend["triton"]["skipped"]
        assert "no CUDA" in by_backend["megablocks"]["skipped"]
    table = (tmp_path / "bench.md").read_text()
    assert f"torch {torch.__version__}" in table and "| loop |" in table
    assert table in capsys.readouterr().out


def test_bench_rejects_unknown_backend():
    args = _parse(["bench", "kernels", "--backends", "loop,cublas"])
    with pytest.raises(ValueError, match="cublas"):
        args.func(args)


def test_paper_shapes_cover_the_grid():
    shapes = bench.paper_shapes()
    assert len(shapes) == 12 and {s.n_tokens for s in shapes} == {16384}
    grid = {(s.d_model, s.n_experts, s.top_k) for s in shapes}
    assert grid >= {(512, 8, 2), (1024, 16, 4), (2048, 128, 16)}  # the configs/paper models
    assert {s.d_model for s in shapes} == {512, 1024, 2048}
    assert {s.top_k for s in shapes} == {2, 4, 8, 16} and max(s.n_experts for s in shapes) == 128
    assert shapes[0].fwd_flops == 6 * 16384 * 2 * 512 * 1024

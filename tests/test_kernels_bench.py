"""`moe bench kernels` (`moe.kernels.bench` behind the thin `moe.app.bench`): runs on CPU,
reports what it ran and why it skipped the rest, streams each record, forms same-run ratios."""

import argparse
import json

import pytest
import torch

from moe.app import bench
from moe.kernels import bench as kbench


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moe")
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_bench_kernels_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    tiny = [kbench.BenchShape(d_model=16, n_experts=4, top_k=2, n_tokens=32)]
    monkeypatch.setattr(bench, "small_shapes", lambda: tiny)
    monkeypatch.setattr(bench, "paper_shapes", lambda n_tokens=0: tiny)
    out, lines = tmp_path / "bench.json", tmp_path / "bench.jsonl"
    args = _parse(["bench", "kernels", "-o", str(out), "--repeats", "1", "--warmup", "0",
                   "--jsonl", str(lines)])
    assert args.func(args) == 0
    streamed = [json.loads(line) for line in lines.read_text().splitlines()]

    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["triton"] and env["device"]
    by_backend = {r["backend"]: r for r in report["results"]}
    assert set(by_backend) == set(bench.BACKENDS)
    # every record, one line each as measured, then the shape's ratios once it is complete
    assert streamed[:-1] == report["results"]
    assert streamed[-1] == {"ratios": kbench.ratios(report["results"])[0]}
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


def test_paper_shapes_cover_the_grid_with_the_papers_configs_first():
    shapes = kbench.paper_shapes()
    assert [(s.d_model, s.n_experts, s.top_k) for s in shapes[:3]] == [
        (512, 8, 2), (1024, 16, 4), (2048, 128, 16)]  # configs/paper/
    assert len(shapes) == 12 and {s.n_tokens for s in shapes} == {16384}
    grid = {(s.d_model, s.n_experts, s.top_k) for s in shapes}
    assert grid >= {(512, 8, 2), (1024, 16, 4), (2048, 128, 16)}  # the configs/paper models
    assert {s.d_model for s in shapes} == {512, 1024, 2048}
    assert {s.top_k for s in shapes} == {2, 4, 8, 16} and max(s.n_experts for s in shapes) == 128
    assert shapes[0].fwd_flops == 6 * 16384 * 2 * 512 * 1024


def test_ratios_divide_throughputs_of_the_same_shape():
    def rec(backend, fwd, fwdbwd, d=512):
        return {"backend": backend, "d_model": d, "n_experts": 8, "top_k": 2,
                "n_tokens": 16384, "fwd_tflops": fwd, "fwdbwd_tflops": fwdbwd}

    rows = kbench.ratios([rec("triton", 300.0, 240.0), rec("torch", 200.0, 160.0),
                          rec("dense", 600.0, 480.0), rec("triton", 10.0, 10.0, d=1024),
                          {**rec("dense", 0, 0, d=1024), "error": "OutOfMemoryError"}])
    assert rows[0]["triton/torch fwd"] == 1.5 and rows[0]["triton/torch fwdbwd"] == 1.5
    assert rows[0]["triton/dense fwd"] == 0.5 and rows[0]["triton/dense fwdbwd"] == 0.5
    assert rows[1]["d_model"] == 1024 and rows[1]["triton/torch fwd"] is None  # no partner
    assert rows[1]["triton/dense fwd"] is None  # the partner failed


def test_inputs_and_weights_are_drawn_on_the_benchmarks_device(monkeypatch):
    """A paper shape's weights are gigabytes: drawn on the host they took minutes."""
    drawn = []
    real = torch.randn

    def randn(*size, **kw):
        drawn.append(kw.get("device"))
        return real(*size, **kw)

    monkeypatch.setattr(torch, "randn", randn)
    shape = kbench.BenchShape(d_model=16, n_experts=4, top_k=2, n_tokens=8)
    for backend in ("torch", "dense"):
        rec = kbench.bench_one(bench.expert_ops(), backend, shape, torch.device("cpu"),
                               torch.float32, warmup=0, repeats=1)
        assert rec["fwd_ms"] > 0, rec
    assert drawn and all(d == torch.device("cpu") for d in drawn)  # explicitly, every draw

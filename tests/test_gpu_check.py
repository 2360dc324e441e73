"""benchmarks/gpu_check.sh and its Python parts, exercised on CPU at toy sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from moe.app import bench_train
from moe.params import train_flops_per_token

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_counts_tokens_flops_and_mfu():
    cfg = tiny_config()
    rec = bench_train.bench_train(cfg, device=torch.device("cpu"), steps=2, warmup=1,
                                  micro_batch=3, seq_len=16, max_tokens=1024, peak=1e-3)
    tokens = 2 * 3 * 16
    assert rec["micro_batch"] == 3 and rec["seq_len"] == 16 and rec["finite"]
    assert rec["tokens_per_s"] == pytest.approx(tokens / rec["elapsed_s"])
    assert rec["tflops"] == pytest.approx(
        rec["tokens_per_s"] * train_flops_per_token(cfg.model, 16) / 1e12)
    assert rec["mfu"] == pytest.approx(rec["tflops"] / 1e-3)
    assert rec["experts_backend"] == "torch" and rec["peak_memory_gb"] is None
    assert bench_train.peak_tflops(torch.device("cpu")) is None


def test_bench_train_halves_the_default_micro_batch_on_out_of_memory(monkeypatch):
    tried = []

    def fake_steps(cfg, device, micro_batch, seq_len, steps, warmup):
        tried.append(micro_batch)
        if micro_batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"elapsed_s": 1.0, "final_loss": 1.0, "finite": True}

    monkeypatch.setattr(bench_train, "_timed_steps", fake_steps)
    rec = bench_train.bench_train(tiny_config(), device=torch.device("cpu"), steps=1,
                                  warmup=0, micro_batch=None, seq_len=32, max_tokens=1 << 20)
    assert tried == [8, 4, 2] and rec["micro_batch"] == 2  # from train.batch_size = 8


def test_bench_train_rejects_a_sequence_longer_than_the_model():
    with pytest.raises(ValueError, match="seq-len"):
        bench_train.bench_train(tiny_config(), device=torch.device("cpu"), steps=1, warmup=0,
                                micro_batch=1, seq_len=33, max_tokens=64)


@pytest.mark.slow
def test_gpu_check_script_runs_every_step_on_cpu(tmp_path):
    import tarfile

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu",
                           str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.md"]  # <= 8
    work = tmp_path / "work"
    with tarfile.open(out / "results.tar.gz") as tar:
        tar.extractall(work, filter="data")
    steps = (work / "steps.tsv").read_text().splitlines()[1:]
    assert [s.split("\t")[:2] for s in steps] == [
        ["environment", "ok"], ["bench_kernels", "ok"], ["gpu_tests", "ok"],
        ["train_pocket-tiny", "ok"], ["train_d512-E8-k2", "ok"], ["train_fsdp", "ok"]]
    lines = [json.loads(line) for line in (work / "bench_kernels.jsonl").read_text().splitlines()]
    assert {r["backend"] for r in lines if "backend" in r} == {"torch", "triton", "dense"}
    assert sum("ratios" in r for r in lines) == 2  # one row per shape, once it is complete
    for name in ("pocket-tiny", "d512-E8-k2"):
        rec = json.loads((work / f"train_{name}.json").read_text())
        assert rec["steps"] == 2 and rec["finite"] and rec["tokens_per_s"] > 0
        assert rec["compiled"] is False  # CPU: train.compile unset means off
    summary = (out / "summary.md").read_text()
    assert "| train_d512-E8-k2 | ok |" in summary and "d512-E8-k2.toml" in summary
    assert "triton/dense fwdbwd" in summary and "triton/torch fwd" in summary
    assert "test_no_host_sync_in_the_moe_layer_forward[triton] | skipped" in summary
    fsdp = work / "fsdp_run"  # the FSDP2 run went through the sharded checkpoint path
    assert json.loads((fsdp / "result.json").read_text())["world_size"] == 1
    assert "skipped" in (work / "logs" / "gpu_tests.log").read_text()  # the gpu tests, on CPU


def test_gpu_check_fits_its_budget_by_construction():
    """Every step's cap, the grace of a stopped step and the report after it: <= 420 s, so a
    second try fits the 15 minutes of GPU time a task is lent."""
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--plan"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    rows = dict(line.split("\t") for line in proc.stdout.splitlines())
    steps = {k: int(v) for k, v in rows.items() if k not in ("total", "budget")}
    assert list(steps)[:2] == ["environment", "bench_kernels"]  # the paper kernels first
    assert sum(steps.values()) == int(rows["total"]) <= int(rows["budget"]) == 420


def test_gpu_check_summary_reads_partial_results_without_torch(tmp_path):
    """The check rewrites the summary after every step, within seconds: no torch import, and
    what a stopped step left (a shape without its ratios yet) is shown as it is."""
    (tmp_path / "steps.tsv").write_text("step\tstatus\tseconds\tcap\n"
                                        "bench_kernels\ttimed out after 135s\t140\t135\n")
    rec = {"d_model": 512, "n_experts": 8, "top_k": 2, "n_tokens": 16384, "fwd_ms": 1.0,
           "fwd_tflops": 300.0, "fwdbwd_ms": 3.0, "fwdbwd_tflops": 250.0}
    ratio = {"d_model": 512, "n_experts": 8, "top_k": 2, "n_tokens": 16384,
             "triton/torch fwd": 1.5, "triton/torch fwdbwd": 1.25, "triton/dense fwd": 0.5,
             "triton/dense fwdbwd": 0.4}
    (tmp_path / "bench_kernels.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {**rec, "backend": "triton"}, {**rec, "backend": "torch"}, {"ratios": ratio},
        {**rec, "d_model": 1024, "backend": "triton"}]) + "\n")
    code = ("import sys; sys.modules['torch'] = None; "
            "import runpy; sys.argv = ['s', sys.argv[1]]; "
            "runpy.run_path('benchmarks/gpu_check_summary.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "| bench_kernels | timed out after 135s | 140 | 135 |" in proc.stdout
    assert "| 512 | 8 | 2 | 16384 | 1.50 | 1.25 | 0.50 | 0.40 |" in proc.stdout
    assert "| 1024 | 8 | 2 | triton | 300 | 250 | 3.000 |" in proc.stdout
    assert "(gpu_tests.xml missing" in proc.stdout


def test_gpu_check_script_needs_an_output_dir():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr

"""benchmarks/gpu_check.sh and its Python parts, exercised on CPU at toy sizes."""

import json
import os
import subprocess
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
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu",
                           str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = (tmp_path / "steps.tsv").read_text().splitlines()[1:]
    assert [s.split("\t")[:2] for s in steps] == [
        ["gpu_tests", "ok"], ["bench_kernels", "ok"], ["train_pocket-tiny", "ok"],
        ["train_d512-E8-k2", "ok"], ["train_fsdp", "ok"]]
    kernels = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert {r["backend"] for r in kernels["results"]} == {"torch", "triton", "megablocks",
                                                          "dense"}
    for name in ("pocket-tiny", "d512-E8-k2"):
        rec = json.loads((tmp_path / f"train_{name}.json").read_text())
        assert rec["steps"] == 2 and rec["finite"] and rec["tokens_per_s"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| train_d512-E8-k2 | ok |" in summary and "d512-E8-k2.toml" in summary
    assert "triton/dense fwd+bwd" in summary
    fsdp = tmp_path / "fsdp_run"  # the FSDP2 run went through the sharded checkpoint path
    assert json.loads((fsdp / "result.json").read_text())["world_size"] == 1
    assert list((fsdp / "checkpoints").glob("step-*.dcp"))
    assert "skipped" in (tmp_path / "gpu_tests.log").read_text()  # the gpu tests, on CPU


def test_gpu_check_script_needs_an_output_dir():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr

"""train.num_threads = "auto": the thread count a run picks from its size and the free cores.

The rule is a pure function, checked here against the measured facts it encodes
(benchmarks/bench_cpu.py): a pocket model's step is thousands of small ops, so a second
thread only adds hand-offs; a core another process keeps busy makes every op wait for it.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from helpers import tiny_config
from moe.config import ConfigError, RunConfig, load_config
from moe.params import train_flops_per_token
from moe.train import resources
from moe.train.resources import apply_num_threads, busy_cores, choose_num_threads, usable_cores

POCKET_TINY = "configs/pocket-tiny.toml"


def step_flops(cfg: RunConfig) -> float:
    """Training FLOPs of one whole batch (pocket configs train it as one micro-batch)."""
    return train_flops_per_token(cfg.model) * cfg.train.batch_size * cfg.model.seq_len


@pytest.mark.parametrize("d_model", [32, 48, 64])
def test_pocket_models_take_the_idle_cores_and_no_busy_one(d_model):
    # measured on 2 cores: 1.3-1.6x faster on 2 idle cores, 2-3x slower beside a busy loop
    for experts in (["model.n_experts=32", "model.top_k=1"],
                    ["model.n_experts=8", "model.top_k=2"],
                    ["model.n_experts=16", "model.top_k=8"]):
        cfg = load_config(POCKET_TINY, [f"model.d_model={d_model}", *experts])
        assert choose_num_threads(flops_per_step=step_flops(cfg), cores=2, busy_cores=0.0) == 2
        assert choose_num_threads(flops_per_step=step_flops(cfg), cores=2, busy_cores=1.0) == 1


def test_a_large_model_takes_every_free_core_and_no_busy_one():
    big = 40 * resources.MIN_FLOPS_PER_THREAD
    assert choose_num_threads(flops_per_step=big, cores=2, busy_cores=0.0) == 2
    assert choose_num_threads(flops_per_step=big, cores=2, busy_cores=0.1) == 2  # noise
    assert choose_num_threads(flops_per_step=big, cores=2, busy_cores=1.0) == 1  # a busy loop
    assert choose_num_threads(flops_per_step=big, cores=2, busy_cores=3.5) == 1  # overloaded
    assert choose_num_threads(flops_per_step=big, cores=16, busy_cores=5.0) == 11
    # no more threads than the work can feed
    assert choose_num_threads(flops_per_step=3.5 * resources.MIN_FLOPS_PER_THREAD,
                              cores=16, busy_cores=0.0) == 3


def test_usable_cores_divides_among_local_ranks_and_obeys_a_launchers_cap(monkeypatch):
    import os

    affinity = len(os.sched_getaffinity(0))
    monkeypatch.delenv(resources.CORES_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert usable_cores() == affinity
    monkeypatch.setenv(resources.CORES_ENV, "1")
    assert usable_cores() == 1
    monkeypatch.delenv(resources.CORES_ENV)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(affinity + 1))  # more ranks than cores
    assert usable_cores() == 1


def test_busy_cores_sees_a_busy_loop():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let the interpreter start and spin
        assert busy_cores(sample_s=0.3) >= 0.7
    finally:
        spin.kill()
        spin.wait()


def test_num_threads_defaults_to_auto_and_accepts_counts():
    assert RunConfig().train.num_threads == "auto"
    assert load_config(POCKET_TINY).train.num_threads == "auto"
    assert load_config(POCKET_TINY, ["train.num_threads=3"]).train.num_threads == 3
    assert load_config(POCKET_TINY, ["train.num_threads=auto"]).train.num_threads == "auto"
    for bad in ("fast", "-1"):
        with pytest.raises(ConfigError, match="train.num_threads"):
            load_config(POCKET_TINY, [f"train.num_threads={bad}"])


def test_apply_num_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert apply_num_threads(tiny_config("train.num_threads=2"), torch.device("cpu")) == 2
        monkeypatch.setattr(resources, "busy_cores", lambda: 0.0)
        monkeypatch.setattr(resources, "usable_cores", lambda: 4)
        monkeypatch.setattr(resources, "MIN_FLOPS_PER_THREAD", 1.0)  # any model is "large"
        assert apply_num_threads(tiny_config("train.num_threads=auto"), torch.device("cpu")) == 4
        monkeypatch.setattr(resources, "MIN_FLOPS_PER_THREAD", 1e30)
        assert apply_num_threads(tiny_config("train.num_threads=auto"), torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(before)


def test_memory_refusal_names_the_parts_and_what_to_change(monkeypatch):
    cfg = tiny_config("train.batch_size=4096")
    need = resources.estimate_train_memory(cfg)
    monkeypatch.setattr("moe.train.resources.machine_memory_bytes", lambda: need.total - 1)
    with pytest.raises(resources.ResourceError,
                       match=r"needs about .* GiB \(parameters .* activations .* "
                             r"at 4096 sequences per micro-batch\).*grad_accum"):
        resources.check_resources(cfg, torch.device("cpu"))
    monkeypatch.setattr("moe.train.resources.machine_memory_bytes", lambda: need.total)
    resources.check_resources(cfg, torch.device("cpu"))  # exactly enough: accepted


def test_threads_are_capped_by_the_cores(monkeypatch):
    monkeypatch.setattr("moe.train.resources.os.cpu_count", lambda: 2)
    resources.check_resources(tiny_config("train.num_threads=8"), torch.device("cpu"))
    with pytest.raises(resources.ResourceError,
                       match="num_threads=9 is more than 4 x the 2 CPU cores"):
        resources.check_resources(tiny_config("train.num_threads=9"), torch.device("cpu"))


@pytest.mark.gpu
def test_refusal_uses_the_gpu_memory_on_cuda():
    device = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(0).total_memory
    cfg = tiny_config("train.batch_size=1048576")
    assert resources.estimate_train_memory(cfg, attention_scores=False).total > total
    with pytest.raises(resources.ResourceError, match="GPU 0 has"):
        resources.check_resources(cfg, device)
    resources.check_resources(tiny_config(), device)


PAGE_FAULTS = """
import resource, sys, torch
sys.path.insert(0, "tests")
from helpers import tiny_config
from moe.model import MoELM
from moe.train.resources import retain_freed_memory, set_heap_thresholds
from moe.train.schedule import build_optimizer

torch.set_num_threads(1)
cfg = tiny_config("model.d_model=64", "model.seq_len=128", "train.batch_size=16")
model = MoELM(cfg.model)
opt = build_optimizer(model, cfg.train)
idx = torch.randint(0, 258, (16, 128))

def faults_per_step():
    # The median page faults of 15 steps after 6 that let the heap settle: most steps of a
    # retained heap fault nothing; an occasional one that does (about 1 window of 5 steps
    # in 10 faulted 50-180 pages a step) is not the per-step cost the test is about.
    for _ in range(6):  # the heap settles
        model(idx, idx).ce_loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    faults = []
    for _ in range(15):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(idx, idx).ce_loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(faults)[len(faults) // 2]

# glibc's documented default thresholds (mallopt(3): 128 KiB each), pinned. Left alone, glibc
# raises its mmap threshold to the largest mapped block freed so far, so whether a fresh
# process's steps fault depends on what it happened to free before: one started inside the
# whole test session faulted 1 page a step, the same one started alone 261-635.
assert set_heap_thresholds(mmap=128 << 10, trim=128 << 10)
default = faults_per_step()
assert retain_freed_memory()
print(default, faults_per_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_stops_the_page_faults_of_every_step():
    # the kernel counts the faults (getrusage): a step that reuses freed memory has none
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS], capture_output=True, text=True,
                         check=True, timeout=300)
    default, retained = map(float, out.stdout.split())
    assert retained < 50  # a settled step reuses the heap (pinned defaults: about 32k a step)
    assert retained < default

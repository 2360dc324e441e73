"""`moe.train.resources` and `moe.config.limits`: every config value is bounded, and a run
that cannot fit the machine (or GPU) is refused with one line before anything is allocated
or written."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_config
from moe.app.cli import main
from moe.config import ConfigError, apply_overrides
from moe.config.limits import LIMITS
from moe.model import MoELM
from moe.params import estimate_train_memory
from moe.train.resources import ResourceError, check_resources
from moe.train.schedule import build_optimizer

ABSURD = ["model.n_layers=100000000000000000000",  # used to hang in the allocator
          "train.batch_size=1000000000",             # used to allocate > 6 GB, then fail
          "train.num_threads=5000",                  # used to segfault
          "model.d_model=1048576",                   # used to leave a blocking config.toml
          "train.batch_size=1048576"]                # within the caps, far above any RAM


@pytest.mark.parametrize("override", ABSURD)
def test_absurd_runs_are_refused_in_one_line_before_anything_is_written(override, tmp_path,
                                                                         capsys):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(tiny_config().to_toml())
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--quiet", "--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_memory_refusal_names_the_parts_and_what_to_change(monkeypatch):
    cfg = tiny_config("train.batch_size=4096")
    need = estimate_train_memory(cfg)
    monkeypatch.setattr("moe.train.resources.machine_memory_bytes", lambda: need.total - 1)
    with pytest.raises(ResourceError, match=r"needs about .* GiB \(parameters .* activations .* "
                                            r"at 4096 sequences per micro-batch\).*grad_accum"):
        check_resources(cfg, torch.device("cpu"))
    monkeypatch.setattr("moe.train.resources.machine_memory_bytes", lambda: need.total)
    check_resources(cfg, torch.device("cpu"))  # exactly enough: accepted


def test_threads_are_capped_by_the_cores(monkeypatch):
    monkeypatch.setattr("moe.train.resources.os.cpu_count", lambda: 2)
    check_resources(tiny_config("train.num_threads=8"), torch.device("cpu"))
    with pytest.raises(ResourceError, match="num_threads=9 is more than 4 x the 2 CPU cores"):
        check_resources(tiny_config("train.num_threads=9"), torch.device("cpu"))


def test_estimated_states_equal_the_built_model_and_optimizer():
    """Parameters, gradients and AdamW moments, counted on the real objects after a step."""
    cfg = tiny_config()
    model = MoELM(cfg.model)
    opt = build_optimizer(model, cfg.train)
    x = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len))
    model(x, x).ce_loss.backward()
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(v.numel() * v.element_size() for s in opt.state.values()
                  for v in s.values() if torch.is_tensor(v) and v.dim())
    est = estimate_train_memory(cfg)
    assert est.params == weights and est.optimizer == grads + moments


def test_activations_scale_with_the_micro_batch():
    one = estimate_train_memory(tiny_config("train.batch_size=8"))
    two = estimate_train_memory(tiny_config("train.batch_size=16"))
    accum = estimate_train_memory(tiny_config("train.batch_size=16", "train.grad_accum=2"))
    assert two.activations == 2 * one.activations and accum.activations == one.activations
    ranks = estimate_train_memory(tiny_config("train.batch_size=16"), world=2)
    assert ranks.activations == one.activations and ranks.params == one.params
    sharded = estimate_train_memory(tiny_config("train.batch_size=16"), world=2,
                                    shard_states=True)
    assert sharded.params == one.params // 2


@pytest.mark.parametrize("key", [f"{s}.{k}" for s, caps in LIMITS.items() for k in caps])
def test_every_capped_value_is_refused_above_its_cap(key):
    section, name = key.split(".")
    cap = LIMITS[section][name]
    value = int(cap) + 1 if float(cap).is_integer() else cap * 2
    with pytest.raises(ConfigError):
        apply_overrides(tiny_config(), [f"{key}={value}"])


def test_paper_configs_are_within_the_caps():
    from pathlib import Path

    from moe.config import load_config

    paths = sorted(Path(__file__).resolve().parent.parent.glob("configs/**/*.toml"))
    assert paths
    for path in paths:
        load_config(path)


@pytest.mark.gpu
def test_refusal_uses_the_gpu_memory_on_cuda():
    device = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(0).total_memory
    cfg = tiny_config("train.batch_size=1048576")
    assert estimate_train_memory(cfg, attention_scores=False).total > total
    with pytest.raises(ResourceError, match="GPU 0 has"):
        check_resources(cfg, device)
    check_resources(tiny_config(), device)

"""`moe kernels compile`: every Triton kernel and autotune config builds for sm_80 and sm_90
without a GPU, with no register spills and shared memory within the target's limit.

The build runs in a subprocess without TRITON_INTERPRET (which tests/conftest.py sets for
this process): interpreted kernels cannot be compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.kernels import aot

REPO = Path(__file__).resolve().parents[1]


def _run_compile(out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, without its warning
    return subprocess.run([sys.executable, "-m", "moe", "kernels", "compile", "--out",
                           str(out_dir), *extra], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


@pytest.mark.slow
def test_every_kernel_and_config_builds_for_sm80_and_sm90_without_spills(tmp_path):
    from moe.kernels import tiles

    proc = _run_compile(tmp_path, "--arch", "sm_80,sm_90", "--format", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    builds = json.loads(proc.stdout)
    # grouped_mm, grouped_mm_wT (dx through w's transposed view), grouped_mm_dw; each also
    # as *_unaligned (widths not multiples of 16) with the configs the pruner keeps for it
    kernels = {"grouped_mm", "grouped_mm_wT", "grouped_mm_dw"}
    assert {b["kernel"] for b in builds} == kernels | {f"{k}_unaligned" for k in kernels}
    per_kernel = (len(tiles.AMPERE_CONFIGS) + len(tiles.HOPPER_CONFIGS)
                  + 2 * len(tiles.UNALIGNED_CONFIGS))
    assert len(builds) == len(kernels) * per_kernel
    # builds run in forked processes where cores allow, and come back in a one-process
    # run's order: arch, then kernel variant, then config
    one_process_order = [(name, aot.config_name(cfg), arch) for arch in ("sm_80", "sm_90")
                         for name, _, _, _, configs, _ in aot._variants(aot.ARCHS[arch])
                         for cfg in configs]
    assert [(b["kernel"], b["config"], b["arch"]) for b in builds] == one_process_order
    for b in builds:
        where = f"{b['kernel']}.{b['config']}.{b['arch']}"
        assert b["spilled_bytes"] == 0, f"{where} spills {b['spilled_bytes']} bytes"
        assert 0 < b["registers"] <= aot.MAX_REGISTERS, where
        assert 0 < b["shared_bytes"] <= b["shared_limit_bytes"], where
        assert b["wgmma"] or b["mma_sync"], f"{where} uses no tensor cores"
        if not b["kernel"].endswith("_unaligned"):  # unaligned dw on sm_90: mma.sync
            assert b["wgmma"] if b["arch"] == "sm_90" else b["mma_sync"], where
        ptx = tmp_path / f"{where}.ptx"
        assert Path(b["ptx_path"]) == ptx and ".entry" in ptx.read_text()
    assert {b["arch"] for b in builds} == {"sm_80", "sm_90"}


def test_blackwell_builds_use_its_tensor_cores_without_spills(tmp_path):
    """One kernel and config for sm_100 (the whole set: `moe kernels compile --arch sm_100`)."""
    from moe.kernels import tiles

    script = ("import json, sys\nfrom pathlib import Path\nfrom moe.kernels import aot, tiles\n"
              "name, fn, sig, const = aot._kernel_specs()[0]\n"
              "b = aot._build_one(name, fn, sig, const, tiles.HOPPER_CONFIGS[1], 'sm_100', True,"
              " Path(sys.argv[1]))\n"
              "print(json.dumps({**b.__dict__, 'spilled_bytes': b.spilled_bytes}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    build = json.loads(proc.stdout)
    assert build["arch"] == "sm_100" and build["config"] == aot.config_name(
        tiles.HOPPER_CONFIGS[1])
    assert build["spilled_bytes"] == 0 and 0 < build["registers"] <= aot.MAX_REGISTERS
    assert build["tcgen05"] and not build["wgmma"]  # Blackwell's MMA, not Hopper's
    assert 0 < build["shared_bytes"] <= aot.SMEM_LIMIT_BYTES[100]
    assert ".target sm_100" in Path(build["ptx_path"]).read_text()


def test_unknown_arch_is_a_one_line_error(tmp_path):
    from moe.app.cli import main

    assert main(["kernels", "compile", "--arch", "sm_75", "--out", str(tmp_path)]) == 2


def test_a_spill_or_too_much_shared_memory_is_a_problem():
    ok = aot.KernelBuild(kernel="k", config="c", arch="sm_80", registers=200,
                         spill_store_bytes=0, spill_load_bytes=0, shared_bytes=1000,
                         shared_limit_bytes=aot.SMEM_LIMIT_BYTES[80], wgmma=False,
                         mma_sync=True, ptx_path="k.ptx")
    assert ok.problems == []
    spill = aot.KernelBuild(**{**ok.__dict__, "spill_store_bytes": 8, "spill_load_bytes": 4})
    assert spill.spilled_bytes == 12 and spill.problems == ["spills 12 bytes"]
    big = aot.KernelBuild(**{**ok.__dict__, "shared_bytes": 200_000})
    assert big.problems and "shared memory" in big.problems[0]


def test_unaligned_shapes_get_only_the_configs_that_do_not_spill(monkeypatch):
    from moe.kernels import tiles

    monkeypatch.setattr(tiles, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    x = torch.empty(64, 512)
    args = {"a_ptr": x, "b_ptr": x, "c_ptr": x, "N": 1024, "K": 512, "stride_am": 512,
            "stride_ak": 1, "M": 37}
    configs = tiles.HOPPER_CONFIGS + tiles.AMPERE_CONFIGS + tiles.UNALIGNED_CONFIGS
    assert tiles.is_aligned(args)
    assert tiles.prune_for_device(configs, args) == tiles.HOPPER_CONFIGS
    odd = {**args, "K": 520 + 4, "stride_am": 524}
    assert not tiles.is_aligned(odd)
    assert tiles.prune_for_device(configs, odd) == tiles.UNALIGNED_CONFIGS
    assert not tiles.is_aligned({**args, "a_ptr": x[:, 1:]})  # base pointer off by 4 bytes

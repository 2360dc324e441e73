"""Ahead-of-time builds of the Triton kernels for GPU targets, on a machine without a GPU.

Every kernel of `moe.kernels.grouped_gemm` is compiled with every autotune config
its target would try (Hopper configs for sm_90 and sm_100, Ampere configs for sm_80) through
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`. Triton ships
its own `ptxas`; we run `ptxas -v` on each PTX to build the cubin and read its
registers and spills, since a kernel's own counters (`n_regs`, `n_spills`) are
filled only when it is loaded on a device. Shared memory is Triton's dynamic
allocation (`metadata.shared`), checked against the target's opt-in limit.

The kernels are compiled as the experts use them: bf16 operands, int64 row
indices, gather and scatter on (the most registers), 16-byte aligned pointers,
strides that are multiples of 16 and unit inner strides (what the JIT specialises
for the paper's shapes), E_POW2 = 256 (the paper's largest E); and once more
without the alignment hints, with the configs the pruner keeps for such shapes.

Triton must not be in interpreter mode (TRITON_INTERPRET unset): interpreted
kernels cannot be compiled.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moe.errors import BadInput
from moe.procs import affinity_cores, fork_pool

ARCHS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
SMEM_LIMIT_BYTES = {80: 166912, 90: 232448, 100: 232448}
"""cudaDevAttrMaxSharedMemoryPerBlockOptin of A100 (sm_80), H100 (sm_90) and B200 (sm_100)."""
MAX_REGISTERS = 255
E_POW2 = 256


@dataclass(frozen=True, kw_only=True)
class KernelBuild:
    """Resource use of one kernel, autotune config and target, from ptxas."""

    kernel: str
    config: str
    arch: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    shared_limit_bytes: int
    wgmma: bool
    mma_sync: bool
    ptx_path: str
    tcgen05: bool = False
    """Blackwell's fifth-generation tensor-core instructions (sm_100)."""

    @property
    def spilled_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def problems(self) -> list[str]:
        out = []
        if self.spilled_bytes:
            out.append(f"spills {self.spilled_bytes} bytes")
        if self.shared_bytes > self.shared_limit_bytes:
            out.append(f"shared memory {self.shared_bytes} > {self.shared_limit_bytes}")
        return out


def parse_archs(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ARCHS]
    if bad or not names:
        raise BadInput(f"unknown --arch {','.join(bad) or '(none)'}; choose from "
                         f"{','.join(ARCHS)}")
    return names


def config_name(cfg) -> str:
    kw = cfg.kwargs
    return (f"m{kw['BLOCK_M']}n{kw['BLOCK_N']}k{kw['BLOCK_K']}"
            f"w{cfg.num_warps}s{cfg.num_stages}")


def _kernel_specs():
    """(name, jit function, signature, constexprs) of each kernel as training launches it.

    `grouped_mm` is the forward and the dx product of rows stored [E, K, N];
    `grouped_mm_wT` the dx product that reads w through its transposed view
    (unit stride along K instead of N); `grouped_mm_dw` the weight gradient.
    """
    from moe.kernels import grouped_gemm as gg

    ptrs = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "offs_ptr": "*i32"}
    fwd_sig = {**ptrs, "a_idx_ptr": "*i64", "c_idx_ptr": "*i64", "M": "i32", "N": "i32",
               "K": "i32", "E": "i32", "FANOUT": "i32", "stride_am": "i32",
               "stride_be": "i32", "stride_bk": "i32", "stride_bn": "i32", "stride_cm": "i32"}
    fwd_const = {"stride_ak": 1, "stride_cn": 1, "GATHER_A": True, "SCATTER_C": True,
                 "E_POW2": E_POW2, "PRECISION": "tf32", "UPCAST": False,
                 "GROUP_M": gg.GROUP_M}
    dw_sig = {**ptrs, "a_idx_ptr": "*i64", "b_idx_ptr": "*i64", "N": "i32", "K": "i32",
              "FANOUT": "i32", "stride_am": "i32", "stride_bm": "i32", "stride_ce": "i32",
              "stride_ck": "i32"}
    dw_const = {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1, "GATHER_A": True,
                "GATHER_B": True, "PRECISION": "tf32", "UPCAST": False}
    fwd = gg._grouped_mm_kernel.fn

    def drop(sig, name):
        return {k: v for k, v in sig.items() if k != name}

    return [("grouped_mm", fwd, drop(fwd_sig, "stride_bn"), {**fwd_const, "stride_bn": 1}),
            ("grouped_mm_wT", fwd, drop(fwd_sig, "stride_bk"), {**fwd_const, "stride_bk": 1}),
            ("grouped_mm_dw", gg._grouped_mm_dw_kernel.fn, dw_sig, dw_const)]


def _compile_ptx(fn, signature: dict, constexprs: dict, cfg, capability: int, *,
                 aligned: bool = True):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {**constexprs, **cfg.kwargs}
    full_sig = {name: ("constexpr" if name in constexprs else signature[name])
                for name in fn.arg_names}
    # 16-byte alignment of pointers and divisibility of sizes/strides, as the JIT infers.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if aligned and name in signature and name not in ("M", "FANOUT")}
    src = ASTSource(fn=fn, signature=full_sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=target, options=options)


_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                               str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip().splitlines()[-1:]}")
    regs, spills = _PTXAS_REGS.search(proc.stderr), _PTXAS_SPILLS.search(proc.stderr)
    if regs is None or spills is None:
        raise RuntimeError(f"cannot read ptxas -v output: {proc.stderr[:200]!r}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _variants(capability: int):
    """(name, fn, signature, constexprs, configs, aligned) of every build for one target."""
    from moe.kernels import tiles

    arch_configs = tiles.HOPPER_CONFIGS if capability >= 90 else tiles.AMPERE_CONFIGS
    for name, fn, sig, const in _kernel_specs():
        yield name, fn, sig, const, arch_configs, True
    for name, fn, sig, const in _kernel_specs():
        yield f"{name}_unaligned", fn, sig, const, tiles.UNALIGNED_CONFIGS, False


def _build_one(name, fn, sig, const, cfg, arch, aligned, out_dir: Path) -> KernelBuild:
    from moe.io import atomic_write_text

    capability = ARCHS[arch]
    compiled = _compile_ptx(fn, sig, const, cfg, capability, aligned=aligned)
    ptx = compiled.asm["ptx"]
    path = out_dir / f"{name}.{config_name(cfg)}.{arch}.ptx"
    atomic_write_text(path, ptx)
    regs, spill_st, spill_ld = ptxas_usage(ptx, capability)
    return KernelBuild(kernel=name, config=config_name(cfg), arch=arch, registers=regs,
                       spill_store_bytes=spill_st, spill_load_bytes=spill_ld,
                       shared_bytes=int(compiled.metadata.shared),
                       shared_limit_bytes=SMEM_LIMIT_BYTES[capability],
                       wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync.aligned" in ptx,
                       tcgen05="tcgen05.mma" in ptx, ptx_path=os.fspath(path))


def build_all(archs: list[str], out_dir: Path, log=lambda _: None,
              workers: int | None = None) -> list[KernelBuild]:
    """Compile every kernel x autotune config x arch; write PTX; return resource use.

    `<kernel>_unaligned` builds have no divisibility hints: what the JIT compiles
    for widths that are not multiples of 16 (with UNALIGNED_CONFIGS only).

    Each build is independent (Triton's compiler, then `ptxas -v`, both on one core), so
    they run in forked processes, one per usable core (`workers` caps them); inline where
    fork is unavailable (not POSIX, or this is a daemonic process) or one core is usable.
    Builds are returned, and logged, in the order of a one-process run.
    """
    from moe.kernels import grouped_gemm as gg

    if gg.INTERPRET:
        raise BadInput("moe kernels compile needs TRITON_INTERPRET unset (interpreted "
                         "kernels cannot be compiled)")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(arch, v, c, out_dir) for arch in archs
            for v, variant in enumerate(_variants(ARCHS[arch]))
            for c in range(len(variant[4]))]
    pool = fork_pool(min(len(jobs), workers or affinity_cores()))
    try:
        results = pool.map(_build_job, jobs) if pool is not None else map(_build_job, jobs)
        builds = []
        for build in results:
            builds.append(build)
            log(f"{build.kernel} {build.config} {build.arch}: {build.registers} registers, "
                f"{build.spilled_bytes} bytes spilled")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return builds


def _build_job(job: tuple[str, int, int, Path]) -> KernelBuild:
    """One build of `build_all`: (arch, variant index, config index, out_dir)."""
    arch, v, c, out_dir = job
    name, fn, sig, const, configs, aligned = list(_variants(ARCHS[arch]))[v]
    return _build_one(name, fn, sig, const, configs[c], arch, aligned, out_dir)


def to_table(builds: list[KernelBuild]) -> str:
    lines = ["| kernel | config | arch | registers | spilled bytes | shared bytes "
             "| shared limit | wgmma | tcgen05 | mma.sync |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for b in builds:
        lines.append(f"| {b.kernel} | {b.config} | {b.arch} | {b.registers} | {b.spilled_bytes} "
                     f"| {b.shared_bytes} | {b.shared_limit_bytes} | {yes[b.wgmma]} "
                     f"| {yes[b.tcgen05]} | {yes[b.mma_sync]} |")
    return "\n".join(lines) + "\n"

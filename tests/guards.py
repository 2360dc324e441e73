"""Guards that make CPU tests see two GPU-only failures: host syncs and NCCL's device rule.

`no_host_reads()`: any read of a tensor's value on the host (`.item()`, `bool(t)`, an
`if` on a tensor, `.tolist()`, boolean-mask indexing, `nonzero`) raises. On CUDA each of
these waits for the device (`torch.cuda.set_sync_debug_mode("error")` flags them there);
on CPU they cost nothing, so without this guard a CPU test cannot see them.

`collectives_on_run_device()`: NCCL takes only CUDA tensors ("No backend type
associated with device type cpu"), gloo takes CPU tensors too, and in a CPU test the
run's device *is* the CPU, so a tensor made without `device=` passes. The guard tracks
where every tensor came from: a factory call without a device (`torch.tensor([..])`,
`torch.zeros(2)`, `torch.from_numpy`) makes a *host-made* tensor; an op whose tensor
inputs are all host-made makes one too (as on CUDA, where mixing fails or the result
stays on the host); `.to(device)` / `.to(tensor)` makes it a run-device tensor. Any
torch.distributed collective given a host-made tensor raises, as NCCL would.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class HostSync(AssertionError):
    """The code read a device tensor's value on the host."""


_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default",
             "aten.masked_select.default", "aten.is_nonzero.default"}


class _HostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in _SYNC_OPS:
            raise HostSync(f"{name}: reads a tensor's value on the host (a device sync)")
        if name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            raise HostSync("boolean-mask indexing: the result's size is read on the host")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    """Raise `HostSync` on any device-to-host read inside the block (see the module doc)."""
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        raise HostSync(".tolist(): copies a tensor to the host")

    torch.Tensor.tolist = tolist
    try:
        with _HostReads():
            yield
    finally:
        torch.Tensor.tolist = real_tolist


_FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "as_tensor", "rand",
              "randn", "randint", "linspace", "eye", "scalar_tensor"}
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single", "reduce",
               "gather", "scatter")


class _Provenance(TorchFunctionMode):
    @staticmethod
    def mark(t: torch.Tensor, host: bool) -> None:
        t.__dict__["_made_on_host"] = host  # an attribute: tensors compare elementwise

    @staticmethod
    def is_host_made(t: torch.Tensor) -> bool:
        return t.__dict__.get("_made_on_host", False)

    def _tensors(self, args, kwargs):
        flat = list(args) + list((kwargs or {}).values())
        for a in flat:
            if isinstance(a, (list, tuple)):
                flat.extend(a)
        return [a for a in flat if isinstance(a, torch.Tensor)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        inputs = self._tensors(args, kwargs)
        if name in _FACTORIES and (kwargs or {}).get("device") is None and not inputs:
            host = True
        elif name in ("to", "cuda", "to_local"):  # an explicit move decides
            moved = "device" in (kwargs or {}) or any(
                isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])
            host = not moved and bool(inputs) and all(map(self.is_host_made, inputs[:1]))
        else:
            host = bool(inputs) and all(map(self.is_host_made, inputs))
        outs = out if isinstance(out, (list, tuple)) else [out]
        for o in outs:
            if isinstance(o, torch.Tensor):
                self.mark(o, host)
        return out


class HostTensorInCollective(AssertionError):
    """A collective got a tensor made on the host: NCCL would refuse it."""


@contextlib.contextmanager
def collectives_on_run_device(device: torch.device | str = "cpu"):
    """Every torch.distributed collective inside the block must get run-device tensors."""
    device = torch.device(device)
    tracker = _Provenance()
    real = {name: getattr(dist, name) for name in COLLECTIVES}
    real_from_numpy = torch.from_numpy

    def from_numpy(array):
        out = real_from_numpy(array)
        tracker.mark(out, True)
        return out

    def guarded(name):
        def call(*args, **kwargs):
            for t in tracker._tensors(args, kwargs):
                if tracker.is_host_made(t) or t.device.type != device.type:
                    raise HostTensorInCollective(
                        f"dist.{name} got a tensor made on the host ({t.device}, "
                        f"{tuple(t.shape)}): NCCL takes only tensors on the run's device")
            return real[name](*args, **kwargs)
        return call

    try:
        torch.from_numpy = from_numpy
        for name in COLLECTIVES:
            setattr(dist, name, guarded(name))
        with tracker:
            yield tracker
    finally:
        torch.from_numpy = real_from_numpy
        for name, fn in real.items():
            setattr(dist, name, fn)

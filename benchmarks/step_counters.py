"""Measuring a training step in figures that carry over from a CPU to a GPU.

Wall-clock time on a shared CPU says little about a GPU; these counts do not
depend on the device (:func:`count_step`):

- ``flops``: matrix FLOPs (``torch.utils.flop_counter``: mm, bmm, conv,
  attention; a grouped convolution's weight gradient counted with its groups,
  see :func:`conv_backward_flops`);
- ``aten_ops``: aten operators dispatched (each is at least one kernel launch
  on a GPU);
- ``non_matmul_bytes``: bytes written by operators that are not matrix
  products (copies, casts, elementwise passes, reductions): memory traffic
  that a GPU pays for at its bandwidth, not its matrix rate;
- ``host_syncs``: operators that make the host wait for the device
  (``aten::_local_scalar_dense`` behind ``.item()``, ``bool()`` and ``int()``
  of a tensor, ``nonzero`` and boolean-mask indexing, ``.tolist()``, copies
  from a GPU to the host), by the phase of the step they happen in;
- ``peak_live_bytes``: the peak of the bytes of tensor storages created during
  the step and alive at once (the CPU stand-in for the CUDA allocator's peak),
  also by phase, and ``live_after_backward``: those alive when the step's last
  ``backward()`` returned.

:func:`time_steps` times steps round-robin (median seconds; peak CUDA memory on a GPU).

This module knows no model and no engine: it counts whatever step it is given.
The suite that composes models, the engine, timm and Opacus is
``benchmarks/suite.py`` (``python -m benchmarks.suite``).
"""

import statistics
import time
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

aten = torch.ops.aten

# matrix products: their bytes are part of the matmul's cost, not extra passes (by name: a
# torch version that lacks one of the attention kernels simply does not have it to count)
_MATMUL_NAMES = (
    "mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "convolution", "convolution_backward",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
)
MATMUL_OPS = {getattr(getattr(aten, name), overload) for name in _MATMUL_NAMES if hasattr(aten, name)
              for overload in getattr(aten, name).overloads()}

# operators whose result the host must read before it can go on
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten.is_nonzero.default, aten.equal.default, aten.unique_consecutive.default, aten._unique2.default,
    aten.unique_dim.default, aten.repeat_interleave.Tensor,
}

# operators that allocate without writing, or only relabel memory
_NO_WRITE = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.detach.default, aten.lift_fresh.default, aten._local_scalar_dense.default}


@dataclass
class StepCounts:
    """What :func:`count_step` counted (see the module docstring)."""

    flops: int = 0
    aten_ops: int = 0
    non_matmul_bytes: int = 0
    host_syncs: int = 0
    syncs_by_phase: Counter = field(default_factory=Counter)
    sync_ops: Counter = field(default_factory=Counter)
    peak_live_bytes: int = 0
    peak_by_phase: Counter = field(default_factory=Counter)
    live_after_backward: int | None = None
    live: int = 0  # bytes alive now (while counting)
    phase: str = "step"

    def sync(self, what: str) -> None:
        self.host_syncs += 1
        self.syncs_by_phase[self.phase] += 1
        self.sync_ops[what] += 1

    def summary(self) -> dict:
        return {
            "flops": self.flops, "aten_ops": self.aten_ops, "non_matmul_bytes": self.non_matmul_bytes,
            "host_syncs": self.host_syncs, "syncs_by_phase": dict(self.syncs_by_phase),
            "sync_ops": dict(self.sync_ops), "peak_live_bytes": self.peak_live_bytes,
            "peak_by_phase": dict(self.peak_by_phase),
            "live_after_backward": self.live_after_backward,
        }


def _is_sync(func, args, out) -> bool:
    if func in SYNC_OPS:
        return True
    if func is aten.index.Tensor:  # a boolean mask index needs the count of True entries
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    if func in (aten._to_copy.default, aten.copy_.default):  # device -> host
        sources = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        target = out if func is aten._to_copy.default else args[0]
        return target.device.type == "cpu" and any(t.device.type != "cpu" for t in sources)
    return False


class _Dispatch(TorchDispatchMode):
    """Counts operators, non-matmul bytes written, syncs, and live storages."""

    def __init__(self, counts: StepCounts):
        super().__init__()
        self.counts = counts
        self.tracked: dict[int, tuple] = {}  # id(storage) -> (weakref, nbytes)

    def _freed(self, key: int, nbytes: int, _ref) -> None:
        if self.tracked.pop(key, None) is not None:
            self.counts.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.tracked or storage.nbytes() == 0:
            return
        nbytes = storage.nbytes()
        self.tracked[key] = (weakref.ref(storage, lambda ref, k=key, n=nbytes: self._freed(k, n, ref)), nbytes)
        self.counts.live += nbytes
        c = self.counts
        c.peak_live_bytes = max(c.peak_live_bytes, c.live)
        c.peak_by_phase[c.phase] = max(c.peak_by_phase[c.phase], c.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        out = func(*args, **kwargs)
        c = self.counts
        c.aten_ops += 1
        if _is_sync(func, args, out):
            c.sync(str(func.overloadpacket.__name__))
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        for t in outputs:
            fresh = id(t.untyped_storage()) not in inputs
            if fresh:
                self._track(t)
            writes = fresh or func._schema.is_mutable  # a view shares its input's storage: no write
            if writes and func not in MATMUL_OPS and func not in _NO_WRITE:
                c.non_matmul_bytes += t.numel() * t.element_size()
        return out


@contextmanager
def _host_reads(counts: StepCounts) -> Iterator[None]:
    """``.tolist()`` and ``.numpy()`` of a CPU tensor dispatch no operator, and no
    mode sees them inside a backward, so they are counted by wrapping them; the
    end of ``backward()`` is where the engine's held memory is measured."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
    backward = torch.autograd.backward

    def reader(name):
        def read(self, *args, **kwargs):
            if self.device.type == "cpu":
                counts.sync(name)
            return originals[name](self, *args, **kwargs)
        return read

    def counted_backward(*args, **kwargs):
        out = backward(*args, **kwargs)
        counts.live_after_backward = counts.live
        return out

    for name in originals:
        setattr(torch.Tensor, name, reader(name))
    torch.autograd.backward = counted_backward
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.autograd.backward = backward


def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch's count of ``aten.convolution_backward``, with the weight gradient
    of a grouped (not transposed) convolution divided by ``groups``: torch's
    formula ignores groups there, so a depthwise conv's weight gradient (ConvNeXt's
    7x7) counted ``channels`` times its FLOPs, and a grouped conv's backward no
    longer cost twice its forward. The input gradient's count is torch's."""
    torch_count = conv_backward_flop.__wrapped__  # on shapes (the registered one is wrapped to take tensors)
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    flops = torch_count(*args, [output_mask[0], False, False], out_shape)
    weight = torch_count(*args, [False, output_mask[1], False], out_shape)
    return flops + (weight if transposed else weight // groups)


@contextmanager
def count_step() -> Iterator[StepCounts]:
    """Count what runs inside (one training step); :func:`phase` attributes
    host syncs to a part of the step."""
    counts = StepCounts()
    flop_counter = FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: conv_backward_flops})
    with flop_counter, _Dispatch(counts), _host_reads(counts):
        yield counts
    counts.flops = flop_counter.get_total_flops()


@contextmanager
def phase(counts: StepCounts | None, name: str) -> Iterator[None]:
    """Attribute host syncs inside to ``name`` (no-op when not counting)."""
    if counts is None:
        yield
        return
    before, counts.phase = counts.phase, name
    try:
        yield
    finally:
        counts.phase = before


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
               device: torch.device) -> dict[str, dict]:
    """Seconds per step of each named step function, timed round-robin (one step
    of each in turn, ``repeats`` times) so that a machine shared with other jobs
    slows them alike: median and all wall times, the median CPU time of this
    process (on a shared CPU the steadier figure: other jobs lengthen wall time
    far more than the work done), and on CUDA the peak bytes allocated above
    what was allocated before each one's timed steps."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, int] = {}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device) - base)
    result = {}
    for name, values in times.items():
        result[name] = {"seconds": statistics.median(values), "all_seconds": values,
                        "cpu_seconds": statistics.median(cpu_times[name])}
        if name in peaks:
            result[name]["cuda_peak_bytes"] = peaks[name]
    return result

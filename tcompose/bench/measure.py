"""Measuring on the bench: CUDA syncs, the machine's names, peak memory, timed calls in alternating rounds, FLOPs.

Peak memory (:class:`PeakMemory`): on CUDA ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``),
reset before every timed segment; on CPU the process's peak RSS (``resource.getrusage``), made resettable per
segment where Linux allows it (``malloc_trim`` then ``/proc/self/clear_refs``), so the CPU figure includes the
model, the optimizer state, the Python runtime and whatever the allocator keeps.

Alternating rounds (:func:`alternate`): the variants of a measurement (the plain and the TokenCompose step, two
samplers) run round by round, the order flipped every round, so drift on the machine affects all of them.

FLOPs (:func:`count_flops`): ``torch.utils.flop_counter.FlopCounterMode`` over a call. It counts matmuls,
convolutions and attention; on CPU the SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``) is counted
with torch's own SDPA formulas.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch


# ------------------------------------------------------------------------------------------------ machine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


class PeakMemory:
    """Peak memory of a region: CUDA allocated bytes, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.resettable = False
        self._trim = None
        if not self.cuda:
            try:
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None
            self.resettable = self._reset_rss()

    @property
    def note(self) -> str:
        if self.cuda:
            return ("peak_mem_mb: torch.cuda.max_memory_allocated (peak_reserved_mb: max_memory_reserved), reset "
                    "before every timed segment; the CUDA context itself is not included")
        how = ("reset before every timed segment via malloc_trim + /proc/self/clear_refs" if self.resettable
               else "not resettable here: monotone over the whole process, so later configs include earlier ones")
        return ("peak_mem_mb on CPU is the process's peak RSS (resource.getrusage ru_maxrss), " + how +
                "; it includes the model, optimizer state, the Python runtime and memory the allocator keeps")

    def _reset_rss(self) -> bool:
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._reset_rss()

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20

    def reserved_mb(self) -> float | None:
        return torch.cuda.max_memory_reserved(self.device) / 2**20 if self.cuda else None


# ---------------------------------------------------------------------------------------------------- flops


def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_cpu_sdpa._get_raw = True  # type: ignore[attr-defined]  (FlopCounterMode passes tensors, not shapes)
_cpu_sdpa_backward._get_raw = True  # type: ignore[attr-defined]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` by ``FlopCounterMode`` (matmul, convolution, attention; CPU's SDPA kernel included)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn`` (CUDA synchronised around each)."""
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def alternate(fns: dict[str, Callable[[], Any]], warmup: int, steps: int, rounds: int, device: torch.device,
              mem: PeakMemory) -> dict[str, dict]:
    """Time several variants in alternating rounds (order flipped every round): per variant ``times``
    (every timed call), ``peak_mb`` / ``reserved_mb`` (max over its segments) and ``round_medians``."""
    for fn in fns.values():
        timed(fn, warmup, device)
    out = {k: {"times": [], "peak_mb": 0.0, "reserved_mb": None, "round_medians": []} for k in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            mem.reset()
            t = timed(fns[name], steps, device)
            o = out[name]
            o["times"] += t
            o["round_medians"].append(statistics.median(t))
            o["peak_mb"] = max(o["peak_mb"], mem.peak_mb())
            if mem.reserved_mb() is not None:
                o["reserved_mb"] = max(o["reserved_mb"] or 0.0, mem.reserved_mb())
    return out

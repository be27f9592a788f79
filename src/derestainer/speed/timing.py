"""How speed is measured: warm-up and rotated timed rounds, peak memory, FLOPs, summary statistics."""

from __future__ import annotations

import copy
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def summarize(values: list[float]) -> dict[str, float]:
    """Median, quartiles (``statistics.quantiles``, inclusive), min and max of ``values``."""
    if not values:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"), "min": float("nan"), "max": float("nan")}
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryMeter:
    """Peak memory of a stretch of code: CUDA allocator peak, or the process's peak RSS.

    ``kind`` is ``cuda_max_allocated`` (bytes allocated by tensors on the device, per path),
    ``cpu_peak_rss`` (Linux ``VmHWM``, reset before each call: the process's whole resident set,
    weights of every model in the process included) or ``cpu_lifetime_peak_rss`` (``ru_maxrss``:
    cannot be reset, so it is the process's peak so far).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif self._can_reset():
            self.kind = "cpu_peak_rss"
        else:
            self.kind = "cpu_lifetime_peak_rss"

    @staticmethod
    def _can_reset() -> bool:
        if _proc_status_kb("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def peak_mb(self) -> float:
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "cpu_peak_rss":
            return (_proc_status_kb("VmHWM") or 0) / 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Timings:
    """What :func:`time_paths` measured, per path name.

    Attributes:
        seconds: one duration per timed round.
        peak_mb: peak memory over the path's calls (warm-up included), see :class:`MemoryMeter`.
        memory_kind: :attr:`MemoryMeter.kind`.
        first_call_s: the first warm-up call (includes one-off costs: torch.compile, oneDNN primitive creation).
    """

    seconds: dict[str, list[float]]
    peak_mb: dict[str, float]
    memory_kind: str
    first_call_s: dict[str, float]


def time_paths(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    iters: int,
    first_warmup: Callable[[str, Callable[[], Any]], Any] | None = None,
) -> Timings:
    """Warm up every path, then ``iters`` rounds running every path once, order rotated each round.

    Args:
        fns: path name → zero-argument callable doing one unit of work.
        first_warmup: called as ``first_warmup(name, fn)`` instead of ``fn()`` for the very first
            warm-up call of each path (e.g. to count its FLOPs).
    """
    meter = MemoryMeter(device)
    names = list(fns)
    peaks = dict.fromkeys(names, 0.0)
    first = {n: float("nan") for n in names}
    for n in names:
        for i in range(warmup):
            meter.reset()
            t0 = time.perf_counter()
            if i == 0 and first_warmup is not None:
                first_warmup(n, fns[n])
            else:
                fns[n]()
            _sync(device)
            if i == 0:
                first[n] = time.perf_counter() - t0
            peaks[n] = max(peaks[n], meter.peak_mb())
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(iters):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            _sync(device)
            meter.reset()
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
            peaks[n] = max(peaks[n], meter.peak_mb())
    return Timings(times, peaks, meter.kind, first)


def path_entries(t: Timings, options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per path: its timed seconds, peak memory, memory kind, options and first-call time."""
    return {n: {"seconds": t.seconds[n], "peak_memory_mb": t.peak_mb[n], "memory_kind": t.memory_kind,
                "options": options[n], "first_call_s": t.first_call_s[n]} for n in t.seconds}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def forward_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one ``[1, 3, size, size]`` forward of ``model``, run on a ``meta`` copy (no compute)."""
    m = copy.deepcopy(model).to("meta").eval()
    with torch.no_grad():
        return count_flops(lambda: m(torch.empty(1, 3, size, size, device="meta")))

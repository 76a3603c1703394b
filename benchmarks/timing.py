"""The one timer of every suite: a clock whose reads wait for the device, repeated calls timed alike,
percentile summaries, and peak-memory watchers."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..export.resources import PeakRss


def sync(device: str) -> None:
    """Wait for queued GPU work, so a clock read after it counts that work (no-op on CPU)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def now(device: str = "cpu") -> float:
    """perf_counter seconds, read only after the device is idle."""
    sync(device)
    return time.perf_counter()


class Clock:
    """A run's clock on one device: `now()` reads it with the device idle, `ms_since(t0)` and `elapsed_s()`
    (since the clock was made) measure with it. Passed to whatever times or reports progress."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.start = self.now()

    def now(self) -> float:
        return now(self.device)

    def ms_since(self, t0: float) -> float:
        return (self.now() - t0) * 1e3

    def elapsed_s(self) -> float:
        return self.now() - self.start


def time_calls(fn, device: str = "cpu", iters: int = 5, warmup: int = 1) -> tuple[list[float], object]:
    """`warmup` untimed calls of fn(), then `iters` calls each timed alone with the device idle at both reads
    -> (ms per timed call, the last call's result)."""
    clock, out, times = Clock(device), None, []
    for _ in range(warmup):
        out = fn()
    for _ in range(iters):
        t0 = clock.now()
        out = fn()
        times.append(clock.ms_since(t0))
    return times, out


def p50_ms(fn, device: str = "cpu", iters: int = 5, warmup: int = 1) -> tuple[float, object]:
    """(p50 ms of `time_calls`, the last call's result)."""
    times, out = time_calls(fn, device, iters, warmup)
    return round(float(np.median(times)), 3), out


def summary(samples_ms: list[float]) -> dict:
    """Samples in ms -> {p50, p90, p99, mean, min, max, n} (linear-interpolated percentiles)."""
    if not samples_ms:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None, "n": 0}
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3),
            "mean": round(float(a.mean()), 3), "min": round(float(a.min()), 3), "max": round(float(a.max()), 3),
            "n": int(a.size)}


class Samples:
    """Named lists of ms samples: `s.add("vision", ms)`; `s.summary()` -> {name: summary}."""

    def __init__(self):
        self.data: dict[str, list[float]] = {}

    def add(self, name: str, ms: float) -> None:
        self.data.setdefault(name, []).append(ms)

    def summary(self) -> dict:
        return {k: summary(v) for k, v in self.data.items()}


class PeakMemory(PeakRss):
    """`with PeakMemory(device) as m:` -> m.result: peak RSS (sampled every 2 ms) and, on CUDA, torch's peak.

    RSS is sampled by a thread because the process-wide high-water mark (ru_maxrss) never goes
    down, so it cannot separate one benchmark row from the rows before it.
    """

    def __init__(self, device: str, interval_s: float = 0.002):
        super().__init__(interval_s)
        self.device = device
        self.result: dict = {}

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.result = {"rss_start_mib": round(self.start / 2**20, 1), "rss_peak_mib": round(self.peak / 2**20, 1)}
        if self.device.startswith("cuda") and torch.cuda.is_available():
            # torch's allocator only: ONNX Runtime's CUDA arena is not visible here
            self.result["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)

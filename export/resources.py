"""What each export step cost: wall time and the process's peak resident memory during it.

The peak is sampled (every 20 ms, from /proc/self/statm or psutil), not read from the kernel's high-water
mark: resetting that mark would also reset what `/usr/bin/time -v` reports for the whole run.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class PeakRss:
    """`with PeakRss() as p:` -> p.start and p.peak, this process's resident bytes at entry and at most during
    the block, sampled by a thread every `interval_s`."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class Meter(PeakRss):
    """`with Meter() as m: ...` -> m.result = {"seconds", "peak_rss_mib"}."""

    def __enter__(self) -> "Meter":
        self._t0 = time.perf_counter()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.result = {"seconds": round(time.perf_counter() - self._t0, 1), "peak_rss_mib": round(self.peak / 2**20, 1)}

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


class Meter:
    """`with Meter() as m: ...` -> m.result = {"seconds", "peak_rss_mib"}."""

    INTERVAL_S = 0.02

    def __enter__(self) -> "Meter":
        self._peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._peak = max(self._peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        mib = round(max(self._peak, rss_bytes()) / 2**20, 1)
        self.result = {"seconds": round(time.perf_counter() - self._t0, 1), "peak_rss_mib": mib}

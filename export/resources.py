"""What each export step cost: wall time and the process's peak resident memory during it (Linux: VmHWM,
reset at the start of each step through /proc/self/clear_refs; elsewhere the process's peak so far)."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _hwm_kib() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        _CLEAR.write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


class Meter:
    """`with Meter() as m: ...` -> m.result = {"seconds", "peak_rss_mib", "peak_scope"}; Meter.peak_mib over all.

    Meters nest: an inner one resets the kernel's peak, so it hands its peak to the meters around it."""

    peak_mib = 0.0  # the largest peak of this process's meters (the export's overall peak)
    _open: list["Meter"] = []

    def __enter__(self) -> "Meter":
        self._scoped = _reset_peak() and _hwm_kib() is not None
        self._inner = 0.0
        self._t0 = time.perf_counter()
        Meter._open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        Meter._open.remove(self)
        kib = _hwm_kib() if self._scoped else _maxrss_kib()
        mib = max(round((kib or _maxrss_kib()) / 1024, 1), self._inner)
        for outer in Meter._open:
            outer._inner = max(outer._inner, mib)
        Meter.peak_mib = max(Meter.peak_mib, mib)
        self.result = {"seconds": round(time.perf_counter() - self._t0, 1), "peak_rss_mib": mib,
                       "peak_scope": "this step" if self._scoped else "process so far"}

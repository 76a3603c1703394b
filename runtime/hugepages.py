"""2 MiB pages under the weights a backend has just loaded (Linux transparent huge pages, MADV_COLLAPSE).

A decode step reads every weight once per token. On 4 KiB pages that stream changes page every
4 KiB: a TLB miss each time, and the hardware prefetchers stop at page boundaries, so matrix-vector
kernels fall well short of the memory bandwidth. `madvise(MADV_COLLAPSE)` (Linux 6.1+) moves a range
onto 2 MiB pages synchronously, contents unchanged, whatever allocator made it (ONNX Runtime's
prepacked weights included), which is why it is applied after loading rather than at allocation.

`new_memory_on_huge_pages()` wraps the loading: it notes the process's anonymous mappings before,
and afterwards collapses only what appeared meanwhile, so memory of anything loaded earlier (a
reference model in the same benchmark process) keeps its pages. Best effort: an older kernel, another
OS, or THP set to `never` by the administrator leaves everything as it was, with the reason recorded.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

Range = tuple[int, int]  # [start, end) addresses


@dataclass
class HugePages:
    """What loading put on 2 MiB pages: `bytes` collapsed, or `skipped` saying why nothing was.

    failed_ranges: mappings the kernel would not move (thread stacks, for one); not an error.
    """

    bytes: int = 0
    failed_ranges: int = 0
    skipped: str | None = None

    def describe(self) -> str:
        if self.skipped:
            return f"weights on 4 KiB pages ({self.skipped})"
        return f"{self.bytes / 2**20:.0f} MiB of weights on 2 MiB pages"

    def as_json(self) -> dict:
        return {"huge_page_bytes": self.bytes, "failed_ranges": self.failed_ranges, "skipped": self.skipped}


def anonymous_ranges(maps: str) -> list[Range]:
    """Writable private anonymous mappings and the brk heap, from the text of /proc/<pid>/maps."""
    out = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[1].startswith("rw") or fields[1][3] != "p":
            continue
        name = fields[5] if len(fields) > 5 else ""
        if name and name != "[heap]":
            continue  # files, stacks, vdso: not ours to move
        start, end = (int(x, 16) for x in fields[0].split("-"))
        out.append((start, end))
    return sorted(out)


def new_ranges(before: list[Range], after: list[Range]) -> list[Range]:
    """Parts of `after` not covered by any range of `before` (a grown heap contributes its new tail)."""
    out = []
    for start, end in after:
        pieces = [(start, end)]
        for b_start, b_end in before:
            pieces = [p for s, e in pieces for p in ((s, min(e, b_start)), (max(s, b_end), e)) if p[0] < p[1]]
        out.extend(pieces)
    return out


def whole_huge_pages(start: int, end: int) -> Range | None:
    """The 2 MiB-aligned part of [start, end), or None if it holds no whole huge page."""
    lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    return (lo, hi) if hi > lo else None


def thp_unavailable() -> str | None:
    """Why this machine cannot or should not get huge pages from us, or None."""
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are Linux only, this is {sys.platform}"
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return "kernel without transparent huge pages"
    if "[never]" in setting:
        return "transparent huge pages set to never on this machine"
    return None


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def collapse(ranges: list[Range]) -> HugePages:
    """MADV_COLLAPSE every whole huge page inside `ranges`."""
    reason = thp_unavailable()
    if reason:
        return HugePages(skipped=reason)
    madvise, done, errors = _madvise(), HugePages(), set()
    for start, end in ranges:
        aligned = whole_huge_pages(start, end)
        if aligned is None:
            continue
        lo, hi = aligned
        if madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done.bytes += hi - lo
        else:
            done.failed_ranges += 1
            errors.add(ctypes.get_errno())
    if done.bytes == 0 and errors:
        done.skipped = ("this kernel refused MADV_COLLAPSE (it needs Linux 6.1+)" if errors == {errno.EINVAL}
                        else "madvise: " + ", ".join(os.strerror(e) for e in sorted(errors)))
    return done


def collapse_buffer(address: int, nbytes: int) -> HugePages:
    """One buffer (a tensor's storage) onto huge pages: its whole 2 MiB pages."""
    return collapse([(address, address + nbytes)])


def _maps() -> str:
    return Path("/proc/self/maps").read_text()


@contextmanager
def new_memory_on_huge_pages(skip: str | None = None):
    """`with new_memory_on_huge_pages() as hp: load()`: afterwards `hp` says what was collapsed.

    skip: a reason not to (e.g. "turned off"); it is what `hp.skipped` then says.
    """
    result = HugePages(skipped=skip or thp_unavailable())
    if result.skipped:
        yield result
        return
    before = anonymous_ranges(_maps())
    yield result
    done = collapse(new_ranges(before, anonymous_ranges(_maps())))
    result.bytes, result.failed_ranges, result.skipped = done.bytes, done.failed_ranges, done.skipped

"""Weights onto 2 MiB pages after loading: the mapping arithmetic, and the real madvise on this kernel."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from medblip_edge.runtime import hugepages as hp

MAPS = """\
55c88e7eb000-55c894a00000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
7f0000400000-7f0000401000 ---p 00000000 00:00 0
7f0000401000-7f0000500000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6
7f0000500000-7f0000600000 rw-p 00001000 08:01 1234                       /usr/lib/libc.so.6
7f0000600000-7f0000700000 rw-s 00000000 00:01 99                         /dev/shm/x
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_only_private_anonymous_writable_mappings_and_the_heap():
    assert hp.anonymous_ranges(MAPS) == [(0x55C88E7EB000, 0x55C894A00000), (0x7F0000000000, 0x7F0000400000)]


def test_new_ranges_are_what_appeared_or_grew():
    before = [(0, 100), (200, 300)]
    after = [(0, 150), (200, 300), (400, 500)]  # the first grew by 50, the third is new
    assert hp.new_ranges(before, after) == [(100, 150), (400, 500)]
    assert hp.new_ranges(after, after) == []
    assert hp.new_ranges([(120, 130)], [(100, 150)]) == [(100, 120), (130, 150)]


def test_only_whole_huge_pages_are_collapsed():
    mib = 1 << 20
    assert hp.whole_huge_pages(mib, 5 * mib) == (2 * mib, 4 * mib)
    assert hp.whole_huge_pages(mib, 3 * mib) is None
    assert hp.whole_huge_pages(0, 2 * mib) == (0, 2 * mib)


def _anonymous(nbytes: int) -> np.ndarray:
    """A fresh private anonymous mapping as a uint8 array (numpy's own allocations already ask for huge pages)."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(region, np.uint8)
    array[:] = np.arange(nbytes, dtype=np.uint64).astype(np.uint8)  # touch every page, a known pattern
    return array


def _huge_kib(array: np.ndarray) -> int:
    """AnonHugePages of the mapping holding the middle of `array`, from /proc/self/smaps (a collapse splits the
    mapping at 2 MiB boundaries, so its first bytes may sit in a small 4 KiB-page mapping of their own)."""
    address, inside = array.ctypes.data + array.nbytes // 2, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def _needs_collapse():
    reason = hp.thp_unavailable()
    if reason:
        pytest.skip(reason)
    probe = _anonymous(8 << 20)
    if hp.collapse_buffer(probe.ctypes.data, probe.nbytes).skipped:
        pytest.skip("this kernel does not collapse (MADV_COLLAPSE needs Linux 6.1+)")


def test_memory_made_inside_the_scope_moves_and_keeps_its_contents():
    _needs_collapse()
    old = _anonymous(16 << 20)  # made before: not ours to move
    with hp.new_memory_on_huge_pages() as moved:
        new = _anonymous(32 << 20)  # made while "loading"
    assert moved.skipped is None and moved.bytes >= 16 << 20, moved
    assert moved.bytes < (32 + 16) << 20, "the mapping made before the scope was moved too"
    assert _huge_kib(new) >= 16 << 10  # (the kernel may merge both into one mapping: it counts for both)
    np.testing.assert_array_equal(old, np.arange(16 << 20, dtype=np.uint64).astype(np.uint8))
    np.testing.assert_array_equal(new, np.arange(32 << 20, dtype=np.uint64).astype(np.uint8))
    assert "MiB of weights on 2 MiB pages" in moved.describe()


def test_turned_off_moves_nothing():
    with hp.new_memory_on_huge_pages("turned off") as moved:
        _anonymous(16 << 20)
    assert moved.bytes == 0 and moved.skipped == "turned off"
    assert moved.describe() == "weights on 4 KiB pages (turned off)"


def test_never_is_respected(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(hp, "THP_SETTING", setting)
    with hp.new_memory_on_huge_pages() as moved:
        pass
    assert moved.bytes == 0 and "never" in moved.skipped

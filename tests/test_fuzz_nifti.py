"""Fuzzing the NIfTI reader: any file gives a clean model input or a ScanError, nothing else.

Inputs start from a small block of a real T1 (nibabel's anatomical.nii) written as
NIfTI-1 and NIfTI-2 in both byte orders, then: header fields set to random or
extreme values, bytes flipped / inserted / deleted / cut off (before or after
gzip), or whole headers made from random dims, datatypes, vox_offset and scaling.
`load_volume` + `to_model_input` must return a float32 [1, 1, S, S, S] tensor with
finite values in [0, 1], or raise ScanError; any other exception fails.

Examples per test: 200 by default (bounded for CI); MEDBLIP_FUZZ_EXAMPLES raises it.
Each test prints (and records as a junit property) how many cases it tried and how
they ended. Most cases use S=32 to stay fast; one test runs a few at S=224.
"""

from __future__ import annotations

import collections
import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badinputs import nifti_bytes
from medblip_edge.errors import ScanError
from medblip_edge.preprocess import load_volume, to_model_input
from volumes import real_volume

# float64 data past float32's range warns while casting, then is rejected as out_of_range: expected here.
# Fuzzing is the slow tier's; the fast tier keeps the hand-made bad inputs (test_preprocess, test_bad_inputs).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"), pytest.mark.slow]

EXAMPLES = int(os.environ.get("MEDBLIP_FUZZ_EXAMPLES", "200"))
LIMITS = {"max_voxels": 1 << 18, "max_bytes": 1 << 23}  # keep every case small; the limits are parameters
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# NIfTI datatype codes: supported, unsupported (complex, RGB, float128, ...) and not codes at all.
DATATYPES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 32, 128, 1536, 1792, 2048, 2304, 0, 1, 3, 7, -1, 32767]


@pytest.fixture(scope="module")
def bases() -> dict:
    """(version, endian, dtype) -> uncompressed bytes of a real-derived 12x14x10 NIfTI file."""
    src = real_volume("anatomical")
    if src is None:
        pytest.skip("nibabel's anatomical.nii is not installed")
    block = np.asanyarray(nib.load(src).dataobj)[10:22, 12:26, 8:18].astype(np.int16)
    out = {}
    for version in (1, 2):
        for endian in "<>":
            for dtype in ("i2", "u1", "f4", "f8"):
                data = block if dtype == "i2" else (block * 0.5 if dtype[0] == "f" else np.clip(block // 8, 0, 255))
                out[(version, endian, dtype)] = nifti_bytes(data, endian + dtype, version=version, endian=endian,
                                                             slope=1.0, inter=0.0)
    return out


class Tally:
    """What the cases did: printed and recorded at the end of each test."""

    def __init__(self, name, record_property):
        self.name, self.record = name, record_property
        self.counts = collections.Counter()

    def check(self, path: Path, size: int = 32) -> None:
        try:
            vol = load_volume(path, **LIMITS)
            x = to_model_input(vol.array, size)
        except ScanError as e:
            assert e.code and str(e) and "\n" not in str(e)
            self.counts[e.code] += 1
            return
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (1, 1, size, size, size)
        assert bool(torch.isfinite(x).all()) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        self.counts["ok"] += 1

    def report(self) -> None:
        total = sum(self.counts.values())
        summary = ", ".join(f"{k} {v}" for k, v in self.counts.most_common())
        print(f"\n{self.name}: {total} cases tried ({summary})")
        self.record("cases_tried", total)
        self.record("outcomes", dict(self.counts))
        assert total > 0


def _header(raw: bytes, version: int, endian: str):
    cls = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    return cls(binaryblock=raw[: cls.sizeof_hdr], check=False)


def _set(hdr, field: str, value) -> None:
    """Put `value` into a header field, cast to the field's type (ints clipped to its range)."""
    dt = hdr.structarr.dtype.fields[field][0]
    base = dt.base
    if base.kind in "iu":
        info = np.iinfo(base)
        vals = [int(v) if np.isfinite(v) else 0 for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]
        value = np.array([min(max(v, int(info.min)), int(info.max)) for v in vals], dtype=base)
        value = value if dt.shape else value[0]
    elif base.kind == "f":
        value = np.asarray(value, dtype=np.float64).astype(base)
    hdr[field] = value


_FLOATS = st.one_of(st.floats(width=32), st.sampled_from([0.0, 1.0, -1.0, 352.0, 352.5, 544.0, 1e30, -1e30,
                                                          float("nan"), float("inf"), 3e38, 1e-30]))
_INTS = st.one_of(st.integers(-3, 40), st.sampled_from([0, 1, 2, 3, 4, 7, 8, 348, 540, 32767, -32768, 2**31 - 1]))
FIELDS = {
    "sizeof_hdr": st.sampled_from([348, 540, 0, -1, 347, 349, 1543569408, 2**31 - 1]),
    "dim": st.lists(_INTS, min_size=8, max_size=8),
    "dim0": st.integers(-2, 9),
    "datatype": st.sampled_from(DATATYPES),
    "bitpix": st.sampled_from([0, 8, 16, 32, 64, 7, -8, 128]),
    "vox_offset": _FLOATS,
    "scl_slope": _FLOATS,
    "scl_inter": _FLOATS,
    "magic": st.sampled_from([b"n+1", b"ni1", b"n+2", b"ni2", b"xyz", b""]),
    "pixdim": st.lists(_FLOATS, min_size=8, max_size=8),
    "intent_code": st.integers(-5, 3000),
}


def _mutate_header(raw: bytes, version: int, endian: str, changes) -> bytes:
    hdr = _header(raw, version, endian)
    for field, value in changes:
        if field == "dim0":
            dim = list(hdr["dim"])
            dim[0] = value
            _set(hdr, "dim", dim)
        else:
            _set(hdr, field, value)
    return hdr.binaryblock + raw[len(hdr.binaryblock):]


def _base_keys():
    return st.tuples(st.sampled_from([1, 2]), st.sampled_from("<>"), st.sampled_from(["i2", "u1", "f4", "f8"]))


def test_fuzz_header_fields(tmp_path, bases, record_property):
    tally = Tally("header fields", record_property)
    change = st.one_of(*[st.tuples(st.just(k), v) for k, v in FIELDS.items()])

    @SETTINGS
    @given(key=_base_keys(), changes=st.lists(change, min_size=1, max_size=4), gz=st.booleans(),
           cut=st.one_of(st.none(), st.integers(0, 4000)), extra=st.binary(max_size=64))
    def case(key, changes, gz, cut, extra):
        raw = _mutate_header(bases[key], key[0], key[1], changes)
        raw = raw[:cut] if cut is not None else raw + extra
        path = tmp_path / "h.nii.gz"
        path.write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)
        tally.check(path)

    case()
    tally.report()


_OPS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


def _apply(data: bytes, ops, header_bias: bool) -> bytes:
    buf = bytearray(data)
    for op, pos, arg in ops:
        n = len(buf)
        if n == 0:
            break
        pos = pos % (min(n, 560) if header_bias else n)
        if op == "flip":
            buf[pos] ^= arg
        elif op == "set":
            buf[pos] = arg
        elif op == "insert":
            buf[pos:pos] = arg
        elif op == "delete":
            del buf[pos : pos + arg]
        else:
            del buf[pos:]
    return bytes(buf)


def test_fuzz_bytes(tmp_path, bases, record_property):
    tally = Tally("bytes", record_property)

    @SETTINGS
    @given(key=_base_keys(), ops=st.lists(_OPS, min_size=1, max_size=6), where=st.sampled_from(["raw", "gz"]),
           header_bias=st.booleans())
    def case(key, ops, where, header_bias):
        raw = bases[key]
        if where == "gz":  # mutate the compressed stream: CRC, length, deflate blocks, gzip header
            data = _apply(gzip.compress(raw, compresslevel=6), ops, header_bias=False)
        else:
            data = _apply(raw, ops, header_bias)
        path = tmp_path / "b.nii"
        path.write_bytes(data)
        tally.check(path)

    case()
    tally.report()


def test_fuzz_random_headers(tmp_path, record_property):
    """Headers made from scratch: random dims, datatype, vox_offset and scaling over random data bytes."""
    tally = Tally("random headers", record_property)

    dims3 = st.tuples(*[st.integers(1, 24)] * 3).map(list)
    shapes = st.one_of(dims3, dims3, dims3.map(lambda s: s + [1]), st.lists(st.integers(1, 24), min_size=1, max_size=5))
    supported = st.sampled_from([2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280])
    scale = st.one_of(st.just(None), st.tuples(_FLOATS, _FLOATS))

    @SETTINGS
    @given(version=st.sampled_from([1, 2]), endian=st.sampled_from("<>"), shape=shapes,
           datatype=st.one_of(supported, supported, st.sampled_from(DATATYPES)),
           vox_offset=st.one_of(st.none(), st.none(), st.sampled_from([0.0, 400.0, 352.7, 1e9]), _FLOATS),
           scale=scale, seed=st.integers(0, 2**32 - 1), fill=st.one_of(st.just(1.0), st.just(1.0), st.floats(0, 1.5)))
    def case(version, endian, shape, datatype, vox_offset, scale, seed, fill):
        cls = nib.Nifti1Header if version == 1 else nib.Nifti2Header
        hdr = cls(endianness=endian)
        hdr.set_data_shape(shape)
        _set(hdr, "datatype", datatype)
        _set(hdr, "vox_offset", cls.sizeof_hdr + 4 if vox_offset is None else vox_offset)
        if scale is not None:
            _set(hdr, "scl_slope", scale[0])
            _set(hdr, "scl_inter", scale[1])
        rng = np.random.default_rng(seed)
        start = int(hdr["vox_offset"]) if 0 < float(hdr["vox_offset"]) < 4096 else cls.sizeof_hdr + 4
        n = max(0, start - cls.sizeof_hdr) + int(np.prod(shape)) * 16
        body = rng.integers(0, 256, size=int(n * fill), dtype=np.uint8).tobytes()
        path = tmp_path / "r.nii"
        path.write_bytes(hdr.binaryblock + body)
        tally.check(path)

    case()
    tally.report()


def test_fuzz_header_fields_at_224(tmp_path, bases, record_property):
    """A few cases at the model's real size, 224^3."""
    tally = Tally("header fields at 224", record_property)
    change = st.one_of(*[st.tuples(st.just(k), FIELDS[k]) for k in ("scl_slope", "scl_inter", "datatype", "dim")])

    @settings(SETTINGS, max_examples=max(5, EXAMPLES // 40))
    @given(key=_base_keys(), changes=st.lists(change, max_size=2))
    def case(key, changes):
        path = tmp_path / "h224.nii"
        path.write_bytes(_mutate_header(bases[key], key[0], key[1], changes))
        tally.check(path, size=224)

    case()
    tally.report()


def test_unmodified_bases_are_read(tmp_path, bases, record_property):
    """The starting files themselves are accepted (so the fuzz starts from valid inputs)."""
    tally = Tally("bases", record_property)
    for key, raw in bases.items():
        (tmp_path / "ok.nii").write_bytes(raw)
        tally.check(tmp_path / "ok.nii")
        (tmp_path / "ok.nii.gz").write_bytes(gzip.compress(raw))
        tally.check(tmp_path / "ok.nii.gz")
    assert tally.counts == {"ok": 2 * len(bases)}
    tally.report()

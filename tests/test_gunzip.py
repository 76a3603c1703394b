"""preprocess/gunzip.py against the standard library's gzip.GzipFile: the same bytes, and a failure exactly where
gzip fails, over crafted and randomly damaged streams, with zlib-ng's decoder and with the standard zlib."""

from __future__ import annotations

import gzip
import io
import random
import struct
import zlib

import pytest

from medblip_edge.preprocess import gunzip
from medblip_edge.preprocess.gunzip import GunzipReader

MODULES = [pytest.param(zlib, id="zlib")]
if gunzip._fast is not None:
    MODULES.insert(0, pytest.param(gunzip._fast, id="zlib-ng"))
FAILURES = (EOFError, gzip.BadGzipFile, zlib.error)  # nifti._read turns each into corrupt_gzip


def _drain(reader, chunk: int) -> bytes:
    out = bytearray()
    buf = bytearray(chunk)
    while True:
        n = reader.readinto(memoryview(buf))
        if not n:
            return bytes(out)
        out += buf[:n]


def _outcome(make, data: bytes, chunk: int = 65536):
    """('ok', bytes) or ('fail', None)."""
    try:
        return "ok", _drain(make(io.BytesIO(data)), chunk)
    except FAILURES:
        return "fail", None


def _same(module, data: bytes, chunk: int = 65536):
    ours = _outcome(lambda f: GunzipReader(f, module), data, chunk)
    theirs = _outcome(lambda f: gzip.GzipFile(fileobj=f, mode="rb"), data, chunk)
    assert ours == theirs, (ours[0], theirs[0])
    return ours


def _with_name_and_extra(payload: bytes) -> bytes:
    """A member with FEXTRA, FNAME, FCOMMENT and FHCRC set (gzip.compress writes none of them)."""
    flags = 0x02 | 0x04 | 0x08 | 0x10
    head = b"\x1f\x8b\x08" + bytes([flags]) + struct.pack("<I", 0) + b"\x00\x03"
    head += struct.pack("<H", 4) + b"abcd" + b"scan.nii\x00" + b"a comment\x00"
    head += struct.pack("<H", zlib.crc32(head) & 0xFFFF)
    body = zlib.compressobj(6, zlib.DEFLATED, -15)
    deflated = body.compress(payload) + body.flush()
    return head + deflated + struct.pack("<II", zlib.crc32(payload), len(payload) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def payload() -> bytes:
    rng = random.Random(0)
    # compressible but not trivial: inputs span several of the reader's 256 KiB input chunks
    words = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(500)]
    return b"".join(rng.choice(words) for _ in range(200_000))


@pytest.mark.parametrize("module", MODULES)
def test_well_formed_streams_give_gzips_bytes(module, payload):
    one = gzip.compress(payload)
    cases = {
        "one member": one,
        "two members": one + gzip.compress(payload[:1000]),
        "zero padding": one + b"\x00" * 5000,
        "padding then a member": one + b"\x00" * 7 + gzip.compress(b"more"),
        "header fields": _with_name_and_extra(payload[:100_000]),
        "empty payload": gzip.compress(b""),
        "stored blocks": gzip.compress(payload[:50_000], compresslevel=0),
    }
    for name, data in cases.items():
        for chunk in (1, 4096, 1 << 20, 1 << 23):
            if chunk == 1 and len(data) > 200_000:
                continue
            status, out = _same(module, data, chunk)
            assert status == "ok", name
            assert out == gzip.decompress(data), name


@pytest.mark.parametrize("module", MODULES)
def test_broken_streams_fail_where_gzip_fails(module, payload):
    one = gzip.compress(payload[:300_000])
    crc_off = len(one) - 8
    cases = {
        "truncated in the header": one[:5],
        "truncated in the data": one[: len(one) // 2],
        "truncated in the trailer": one[:-3],
        "bad CRC": one[:crc_off] + bytes([one[crc_off] ^ 1]) + one[crc_off + 1:],
        "bad length": one[:-1] + bytes([one[-1] ^ 1]),
        "bad method": one[:2] + b"\x07" + one[3:],
        "garbage after": one + b"garbage",
        "one stray byte after": one + b"\x01",
        "half a magic after": one + b"\x1f",
        "not gzip after the magic": b"\x1f\x8b" + b"\xff" * 100,
    }
    for name, data in cases.items():
        status, _ = _same(module, data)
        assert status == "fail", name


@pytest.mark.parametrize("module", MODULES)
def test_random_damage_is_judged_as_gzip_judges_it(module, payload):
    good = gzip.compress(payload[:200_000])
    rng = random.Random(1)
    fails = 0
    for _ in range(150):
        data = bytearray(good)
        kind = rng.randrange(3)
        if kind == 0:  # flip bytes
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # cut
            data = data[: rng.randrange(len(data))]
        else:  # append zeros (padding gzip accepts) or other bytes
            zeros = rng.random() < 0.5
            data += bytes(0 if zeros else rng.randrange(256) for _ in range(rng.randrange(1, 20)))
        status, _ = _same(module, bytes(data), chunk=rng.choice([4096, 1 << 20]))
        fails += status == "fail"
    assert 0 < fails < 150  # the damage found both kinds of stream


def test_the_fast_decoder_is_the_default_when_installed():
    assert gunzip.inflater() is (gunzip._fast or zlib)
    assert gunzip.inflater(use_fast=False) is zlib

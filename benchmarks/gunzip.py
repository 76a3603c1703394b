"""Gzip inflate of a scan with each decoder, and the whole NIfTI read with each, in one run.

    python -m medblip_edge.benchmarks.gunzip [--scan FILE.nii.gz] [--iters 20]

Rows: the standard zlib and zlib-ng (when installed) through preprocess/gunzip.py's reader, then
`load_volume` (header, inflate, voxels to float32) with each; p50 ms, and whether the bytes agree.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

from ..preprocess import gunzip
from ..preprocess.gunzip import GunzipReader
from ..preprocess.nifti import load_volume
from .machine import machine_info
from .timing import p50_ms


def _inflate(path: Path, module, keep: bool = False) -> bytes | None:
    """The file's decompressed bytes (keep) or nothing (timing: decoded into one reused buffer)."""
    with open(path, "rb") as f:
        reader, buf, out = GunzipReader(f, module), bytearray(1 << 22), bytearray()
        view = memoryview(buf)
        while n := reader.readinto(view):
            if keep:
                out += view[:n]
        return bytes(out) if keep else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scan", type=Path, default=None, help="default: the MNI152 T1 in nilearn's wheel")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    if args.scan is None:
        from ..demo_scan import mni_t1_path

        args.scan = Path(mni_t1_path())
    fast = gunzip.inflater()
    decoders = {"zlib": zlib, **({"zlib-ng": fast} if fast is not zlib else {})}
    m = machine_info()
    print(f"{args.scan.name} ({args.scan.stat().st_size / 2**20:.1f} MiB), {m['cpu']['model']} "
          f"({', '.join(m['cpu']['flags'])}), {m['cores']['usable']} cores, {m.get('date', '')}")
    print("| decoder | inflate p50 ms | load_volume p50 ms | same bytes as zlib |")
    print("| --- | ---: | ---: | --- |")
    reference = _inflate(args.scan, zlib, keep=True)
    for name, module in decoders.items():
        inflate, _ = p50_ms(lambda: _inflate(args.scan, module), iters=args.iters)
        load, _ = p50_ms(lambda: load_volume(args.scan, inflate=module), iters=args.iters)
        print(f"| {name} | {inflate} | {load} | {_inflate(args.scan, module, keep=True) == reference} |")
    print("\ncommand: python -m medblip_edge.benchmarks.gunzip " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()

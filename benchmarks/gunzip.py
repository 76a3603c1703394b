"""`medblip-bench gunzip`: gzip inflate of a scan with each decoder, and the whole NIfTI read with each, in one run.

Rows: the standard zlib and zlib-ng (when installed) through preprocess/gunzip.py's reader, then
`load_volume` (header, inflate, voxels to float32) with each; p50 ms, and whether the bytes agree.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import click

from ..errors import MedblipError
from ..preprocess import gunzip
from ..preprocess.gunzip import GunzipReader
from ..preprocess.nifti import load_volume
from .suite import Outcome, Run, suite
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


def measure(scan: Path, iters: int) -> dict:
    fast = gunzip.inflater()
    decoders = {"zlib": zlib, **({"zlib-ng": fast} if fast is not zlib else {})}
    reference = _inflate(scan, zlib, keep=True)
    rows = []
    for name, module in decoders.items():
        inflate, _ = p50_ms(lambda: _inflate(scan, module), iters=iters)
        load, _ = p50_ms(lambda: load_volume(scan, inflate=module), iters=iters)
        rows.append({"decoder": name, "inflate_p50_ms": inflate, "load_volume_p50_ms": load,
                     "same_bytes_as_zlib": _inflate(scan, module, keep=True) == reference})
    return {"scan": {"name": scan.name, "bytes": scan.stat().st_size, "inflated_bytes": len(reference)},
            "iters": iters, "rows": rows}


def report(res: dict) -> str:
    s = res["scan"]
    lines = [f"{s['name']} ({s['bytes'] / 2**20:.1f} MiB, {s['inflated_bytes'] / 2**20:.1f} MiB inflated), p50 of "
             f"{res['iters']}:", "",
             "| decoder | inflate p50 ms | load_volume p50 ms | same bytes as zlib |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {r['decoder']} | {r['inflate_p50_ms']} | {r['load_volume_p50_ms']} | {r['same_bytes_as_zlib']} |"
              for r in res["rows"]]
    return "\n".join(lines)


@suite("gunzip")
@click.option("--scan", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A .nii.gz file [default: the MNI152 T1 in nilearn's wheel].")
@click.option("--iters", type=int, default=20, show_default=True, help="Timed reads per decoder (p50 reported).")
def command(run: Run, scan: Path | None, iters: int) -> Outcome:
    """Time the gzip inflate of a scan with the standard zlib and with zlib-ng (when installed), through the
    reader preprocess/gunzip.py uses, and the whole NIfTI read (`load_volume`: header, inflate, voxels to
    float32) with each; check that both give the same bytes.
    """
    if scan is None:
        from ..demo_scan import mni_t1_path

        scan = mni_t1_path()
        if scan is None:
            raise MedblipError("no --scan and no nilearn: pip install nilearn (or medblip-edge[demo])",
                               code="missing_dependency")
    return Outcome("Gzip inflate and NIfTI read per decoder", measure(scan, iters), report)


if __name__ == "__main__":  # the old module path
    from .moved import forward

    forward("gunzip")

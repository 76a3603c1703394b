"""The bad-input corpus: ONE table of cases, used by tests/test_bad_inputs.py and rendered into the docs.

Each case builds its input from a real volume (tests/volumes.py) into a folder and
says what `medblip-infer` must do with it: an error row with a stable code, or a
result ("ok"), or a result whose `warnings` is not empty ("ok+warning").
`markdown_table()` renders the table that docs/inputs/bad-inputs.md carries between
`<!-- bad-inputs:start -->` and `<!-- bad-inputs:end -->`; a test keeps them equal, and the
docs build (docs/hooks.py) renders it afresh.

    python tests/badinputs.py   # prints the table
"""

from __future__ import annotations

import ctypes
import gzip
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dicom_fixtures as dfx  # noqa: E402
from volumes import real_volume  # noqa: E402

README_START = "<!-- bad-inputs:start -->"
README_END = "<!-- bad-inputs:end -->"


class MissingVolume(Exception):
    """A real volume this case is built from is not installed."""


# ---------------------------------------------------------------- writing NIfTI files


def need(name: str) -> Path:
    path = real_volume(name)
    if path is None:
        raise MissingVolume(name)
    return path


def raw_bytes(path) -> bytes:
    """A NIfTI file's bytes, gunzipped if it is gzip."""
    data = Path(path).read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def nifti_bytes(data, dtype, *, version: int = 1, endian: str = "<", shape=None, slope=None, inter=None) -> bytes:
    """Header (nibabel-made) + `data` (nibabel i,j,k order) raw and unscaled, as an uncompressed .nii."""
    hdr = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)(endianness=endian)
    hdr.set_data_shape(shape or np.shape(data))
    hdr.set_data_dtype(dtype)
    if slope is not None:
        hdr["scl_slope"], hdr["scl_inter"] = slope, inter
    buf = io.BytesIO()
    hdr.write_to(buf)  # header + the 4 extension-flag bytes
    buf.write(np.asarray(data).astype(np.dtype(dtype).newbyteorder(endian)).tobytes(order="F"))
    return buf.getvalue()


def write_nifti(path, data, dtype, *, gz: bool | None = None, **kw) -> Path:
    path = Path(path)
    raw = nifti_bytes(data, dtype, **kw)
    gz = path.name.endswith(".gz") if gz is None else gz
    path.write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)
    return path


def anat() -> np.ndarray:
    """nibabel's anatomical.nii: a real T1, 33x41x25 int16 (i, j, k)."""
    return np.asanyarray(nib.load(need("anatomical")).dataobj).astype(np.int16)


def first_volume(src: Path, dst: Path, shape, header_cls=nib.Nifti1Header) -> Path:
    """A real 4D file cut to its first volume with header shape `shape`; every other header byte kept."""
    raw = raw_bytes(src)
    n = header_cls.sizeof_hdr
    hdr = header_cls(binaryblock=raw[:n], check=False)
    hdr.set_data_shape(shape)
    end = int(hdr["vox_offset"]) + int(np.prod(shape)) * hdr.get_data_dtype().itemsize
    out = bytes(hdr.binaryblock) + raw[n:end]
    dst.write_bytes(gzip.compress(out) if dst.name.endswith(".gz") else out)
    return dst


# ---------------------------------------------------------------- builders: folder -> the path to give the CLI


def _truncated_gz(d: Path) -> Path:
    data = need("mni_t1").read_bytes()
    (p := d / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    return p


def _bad_crc(d: Path) -> Path:
    data = bytearray(need("standard").read_bytes())
    data[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    (p := d / "bad_crc.nii.gz").write_bytes(bytes(data))
    return p


def _plain_named_gz(d: Path) -> Path:
    shutil.copy(need("anatomical"), p := d / "plain_named_gz.nii.gz")
    return p


def _gz_named_nii(d: Path) -> Path:
    (p := d / "gzip_named.nii").write_bytes(gzip.compress(need("anatomical").read_bytes()))
    return p


def _header_only(d: Path) -> Path:
    (p := d / "header_only.nii").write_bytes(need("anatomical").read_bytes()[:352])
    return p


def _data_short(d: Path) -> Path:
    (p := d / "data_short.nii").write_bytes(need("anatomical").read_bytes()[:-100])
    return p


def _zeros(d: Path) -> Path:
    (p := d / "zeros.nii.gz").write_bytes(bytes(4096))
    return p


def _empty(d: Path) -> Path:
    (p := d / "empty.nii").write_bytes(b"")
    return p


def _analyze(d: Path) -> Path:
    shutil.copy(need("analyze_hdr"), p := d / "analyze.hdr")
    return p


def _pair(d: Path) -> Path:
    shutil.copy(need("nifti1_pair_hdr"), p := d / "pair.hdr")
    return p


def _image_2d(d: Path) -> Path:
    return write_nifti(d / "image_2d.nii", anat()[:, :, 12], "<i2")


def _four_d(d: Path) -> Path:
    shutil.copy(need("functional"), p := d / "functional_t20.nii")
    return p


def _xyz1(d: Path) -> Path:
    return write_nifti(d / "xyz1.nii.gz", anat()[..., None], ">i2", endian=">")


def _constant(d: Path) -> Path:
    return write_nifti(d / "constant.nii", np.full(anat().shape, 7, np.int16), "<i2")


def _all_nan(d: Path) -> Path:
    return write_nifti(d / "all_nan.nii", np.full(anat().shape, np.nan, np.float32), "<f4")


def _partly_nan(d: Path) -> Path:
    shutil.copy(need("resampled"), p := d / "partly_nan.nii")  # a real resampled map with 153 NaN voxels
    return p


def _nifti2(d: Path) -> Path:
    return first_volume(need("example_nifti2"), d / "nifti2.nii.gz", (32, 20, 12, 1), nib.Nifti2Header)


def _huge(d: Path) -> Path:
    hdr = nib.Nifti1Header.from_header(nib.load(need("anatomical")).header)
    hdr.set_data_shape((4000, 4000, 4000))
    hdr.set_data_dtype(np.float32)
    buf = io.BytesIO()
    hdr.write_to(buf)
    (p := d / "huge_declared.nii.gz").write_bytes(gzip.compress(buf.getvalue() + bytes(1000)))
    return p


def _complex(d: Path) -> Path:
    return write_nifti(d / "complex.nii", anat().astype(np.complex64), "<c8")


def _vox_offset(d: Path) -> Path:
    p = write_nifti(d / "vox_offset.nii", anat(), "<i2")
    raw = bytearray(p.read_bytes())
    raw[108:112] = np.float32(100).tobytes()  # vox_offset inside the 348-byte header
    p.write_bytes(bytes(raw))
    return p


def _overflow(d: Path) -> Path:
    return write_nifti(d / "overflow.nii", anat(), "<i2", slope=3e38, inter=0.0)


def _directory(d: Path) -> Path:
    (p := d / "folder.nii.gz").mkdir()
    return p


def _fifo(d: Path) -> Path:
    os.mkfifo(p := d / "fifo.nii")
    return p


def _missing(d: Path) -> Path:
    return d / "missing.nii.gz"


def _unreadable(d: Path) -> Path:
    shutil.copy(need("standard"), p := d / "locked.nii.gz")
    p.chmod(0)
    return p


def _symlink_loop(d: Path) -> Path:
    (d / "loop_a.nii").symlink_to(d / "loop_b.nii")
    (d / "loop_b.nii").symlink_to(d / "loop_a.nii")
    return d / "loop_a.nii"


def _non_ascii(d: Path) -> Path:
    shutil.copy(need("anatomical"), p := d / "Gehirn_Ωmega_脑.nii")
    return p


def _newline_name(d: Path) -> Path:
    shutil.copy(need("anatomical"), p := d / "two\nlines.nii")
    return p


# ---------------------------------------------------------------- DICOM (tests/dicom_fixtures.py)


def _dicom_good(d: Path) -> Path:
    """One good int16 series from the marked MNI template, written once per corpus folder (not itself a case)."""
    good = d / "_dicom_source" / "good"
    if not good.exists():
        try:
            dfx.write_series(dfx.marked_mni(), good)
        except dfx.Missing as e:
            raise MissingVolume(str(e)) from None
    return good


def _pydicom(rel: str) -> Path:
    try:
        return dfx.pydicom_file(rel)
    except dfx.Missing as e:
        raise MissingVolume(str(e)) from None


def _variant(make, name: str):
    return lambda d: make(_dicom_good(d), d / name)


def _dicom_series(d: Path) -> Path:
    return dfx.copy_series(_dicom_good(d), d / "T1_series")


def _dicom_multiframe(d: Path) -> Path:
    return dfx.multiframe(_dicom_good(d), d / "enhanced_mr.dcm")


def _dicom_copy(rel: str, name: str):
    def build(d: Path) -> Path:
        src = _pydicom(rel)
        if src.is_dir():
            return Path(shutil.copytree(src, d / name))
        shutil.copy(src, d / name)
        return d / name
    return build


def _dicom_corrupt(d: Path) -> Path:
    j2k = dfx.write_series(dfx.marked_mni(), d / "_dicom_source" / "j2k", compressor="JPEG2000")
    return dfx.corrupt_fragments(j2k, d / "corrupt_j2k")


def _dicom_unknown_syntax(d: Path) -> Path:
    import pydicom
    from pydicom.encaps import encapsulate

    folder = dfx.copy_series(_dicom_good(d), d / "mpeg_slice")
    f = dfx.files(folder)[3]
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(f, enforce_file_format=False)
    return folder


def _dicom_csv(folder_name: str, fill):
    """A CSV whose one row names a folder given as one scan."""
    def build(d: Path) -> Path:
        folder = fill(d, d / folder_name)
        (p := d / f"{folder_name}_list.csv").write_text(f"scan\n{folder.name}\n")
        return p
    return build


def _two_series(d: Path, dst: Path) -> Path:
    good = _dicom_good(d)
    other = dfx.write_series(dfx.marked_mni()[:, :, 10:20], d / "_dicom_source" / "other")
    return dfx.two_series(good, other, dst)


def _only_sr(d: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(_pydicom("test-SR.dcm"), dst / "report.dcm")
    return dst


def _no_fifo() -> str | None:
    return None if hasattr(os, "mkfifo") else "no FIFOs on this system"


def _root_reads_all() -> str | None:
    if hasattr(os, "geteuid") and os.geteuid() == 0 and not can_drop_root_read():
        return "running as root, which reads any file, and the DAC capabilities cannot be dropped here"
    return None


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class BadInput:
    name: str  # case id
    input: str  # what the input is (table column 1)
    expect: str  # error code, "ok" or "ok+warning"
    does: str  # what medblip-infer does with it (table column 3)
    build: Callable[[Path], Path]
    skip: Callable[[], str | None] = lambda: None  # a reason this case cannot be made here
    shown: str | None = None  # the row's `scan` when it is not the built path's name (a folder named in a CSV)
    hashed: bool | None = None  # whether the row has a SHA-256 (default: the built path is a readable file)

    @property
    def ok(self) -> bool:
        return self.expect in ("ok", "ok+warning")


CASES: list[BadInput] = [
    BadInput("truncated_gz", "`.nii.gz` cut in half", "corrupt_gzip",
             "error row; never zero-filled (SimpleITK would fill the rest with zeros)", _truncated_gz),
    BadInput("gzip_bad_crc", "`.nii.gz` with a wrong CRC32 in its gzip trailer", "corrupt_gzip",
             "error row: the whole stream is decompressed and checked", _bad_crc),
    BadInput("plain_named_gz", "uncompressed NIfTI named `.nii.gz`", "ok",
             "read: compression is decided by the gzip magic bytes, not the name", _plain_named_gz),
    BadInput("gzip_named_nii", "gzipped NIfTI named `.nii`", "ok", "read, as above", _gz_named_nii),
    BadInput("header_only", "NIfTI header with no data (352 bytes)", "truncated",
             "error row: the header's size is checked against the file before reading", _header_only),
    BadInput("data_short", "data 100 bytes shorter than the header says", "truncated", "error row", _data_short),
    BadInput("zeros", "4 KiB of zero bytes", "not_nifti", "error row: no NIfTI-1/2 header", _zeros),
    BadInput("empty", "empty file", "not_nifti", "error row", _empty),
    BadInput("analyze", "Analyze 7.5 `.hdr`", "not_nifti", "error row: only NIfTI-1/2 is read", _analyze),
    BadInput("nifti_pair", "NIfTI-1 `.hdr`/`.img` pair", "unsupported_format",
             "error row: convert to one `.nii`/`.nii.gz` file", _pair),
    BadInput("image_2d", "2D image", "bad_dims", "error row: a 3D volume is needed", _image_2d),
    BadInput("four_d", "4D series, 20 volumes (X,Y,Z,T)", "bad_dims",
             "error row: exactly one volume is needed; pick one first", _four_d),
    BadInput("xyz1", "4D with one volume (X,Y,Z,1)", "ok", "read as the 3D volume (trailing 1s dropped)", _xyz1),
    BadInput("constant", "constant volume", "constant_volume",
             "error row: min-max normalisation would divide by zero", _constant),
    BadInput("all_nan", "every voxel NaN", "no_finite_data", "error row", _all_nan),
    BadInput("partly_nan", "float volume with 153 NaN voxels", "ok+warning",
             "NaN/Inf voxels set to 0 as SimpleITK does; the row's `warnings` gives the count", _partly_nan),
    BadInput("nifti2", "NIfTI-2 single file", "ok+warning",
             "read with the NIfTI-1 voxel rules; warns that SimpleITK (the training loader) cannot read it", _nifti2),
    BadInput("huge_declared", "header declaring 4000x4000x4000 float32", "too_large",
             "error row decided from the header alone: nothing is allocated", _huge),
    BadInput("complex_dtype", "complex64 data", "unsupported_dtype", "error row", _complex),
    BadInput("vox_offset_in_header", "`vox_offset` pointing inside the header", "bad_header", "error row",
             _vox_offset),
    BadInput("scaling_overflow", "`scl_slope` 3e38 on int16 data", "out_of_range",
             "error row: scaled values leave the float32 range", _overflow),
    BadInput("directory", "folder named `folder.nii.gz` given as a scan", "not_a_file",
             "error row (a folder given without a scan-like name is expanded instead)", _directory),
    BadInput("fifo", "FIFO named `.nii`", "not_a_file", "error row without opening it (opening would block)",
             _fifo, _no_fifo),
    BadInput("missing", "path that does not exist", "not_found", "error row; the other scans still run", _missing),
    BadInput("unreadable", "file without read permission", "unreadable", "error row", _unreadable,
             _root_reads_all),
    BadInput("symlink_loop", "symlink loop", "unreadable", "error row", _symlink_loop),
    BadInput("non_ascii_name", "non-ASCII file name (`Gehirn_Ωmega_脑.nii`)", "ok",
             "read; the name is kept in the row (JSON-escaped)", _non_ascii),
    BadInput("newline_in_name", "file name containing a newline", "ok",
             "read; rows and messages stay one line (JSON escapes it)", _newline_name),
    BadInput("dicom_series", "DICOM: folder holding one MR series of single-frame files", "ok",
             "read as SimpleITK's series reader reads it; the row adds `series` (a hash of the series UID)",
             _dicom_series, hashed=True),
    BadInput("dicom_multiframe", "DICOM: Enhanced MR multi-frame file, frames stored out of order", "ok",
             "read, frames ordered by their positions", _dicom_multiframe),
    BadInput("dicom_missing_slice", "DICOM: series with one slice deleted", "slice_gap",
             "error row: a gap more than 10% off the series' median spacing (SimpleITK only warns)",
             _variant(dfx.delete_slice, "missing_slice"), hashed=True),
    BadInput("dicom_duplicate_slice", "DICOM: series with one slice copied", "duplicate_slices",
             "error row: two slices at one position (SimpleITK only warns)",
             _variant(dfx.duplicate_slice, "duplicate_slice"), hashed=True),
    BadInput("dicom_reoriented_slice", "DICOM: one slice in another plane", "mixed_orientation",
             "error row (SimpleITK only warns)", _variant(dfx.reorient_slice, "reoriented_slice"), hashed=True),
    BadInput("dicom_localizer", "DICOM: a real 7-plane localizer (pydicom's `MR700`)", "mixed_orientation",
             "error row: not one volume", _dicom_copy("dicomdirtests/98892003/MR700", "MR700"), hashed=True),
    BadInput("dicom_mixed_spacing", "DICOM: one slice with another pixel spacing", "mixed_geometry",
             "error row", _variant(dfx.respace_slice, "respaced_slice"), hashed=True),
    BadInput("dicom_no_position", "DICOM: one slice without Image Position (Patient)", "missing_geometry",
             "error row: the slices cannot be placed", _variant(dfx.drop_position, "no_position"), hashed=True),
    BadInput("dicom_single_slice", "DICOM: a single 2D slice (pydicom's `MR_small.dcm`)", "bad_dims",
             "error row: a 3D volume is needed", _dicom_copy("MR_small.dcm", "MR_small.dcm")),
    BadInput("dicom_truncated", "DICOM: last file of a series cut short", "truncated",
             "error row decided from the header and the file size, before any pixel is decoded",
             _variant(dfx.truncate_last, "truncated_series"), hashed=True),
    BadInput("dicom_corrupt", "DICOM: JPEG 2000 codestream overwritten with noise", "corrupt_pixel_data",
             "error row", _dicom_corrupt, hashed=True),
    BadInput("dicom_unknown_syntax", "DICOM: slice in a transfer syntax nothing decodes (MPEG2)",
             "unsupported_transfer_syntax", "error row", _dicom_unknown_syntax, hashed=True),
    BadInput("dicom_ct", "DICOM: CT series (pydicom's `CT2`)", "not_mr", "error row: the model reads MRI only",
             _dicom_copy("dicomdirtests/77654033/CT2", "CT2"), hashed=True),
    BadInput("dicom_two_series", "DICOM: CSV row naming a folder that holds two series", "several_series",
             "error row (SimpleITK silently reads the first); given on the command line instead, the folder gives "
             "one row per series", _dicom_csv("two_series", _two_series), shown="two_series", hashed=False),
    BadInput("dicom_no_images", "DICOM: CSV row naming a folder with only a structured report", "no_images",
             "error row; in a folder walk such objects are skipped and counted", _dicom_csv("only_sr", _only_sr),
             shown="only_sr", hashed=False),
]

BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES)


def _outcome(expect: str) -> str:
    if expect == "ok":
        return "result"
    if expect == "ok+warning":
        return "result + warning"
    return f"error `{expect}`"


def markdown_table() -> str:
    """The docs table: one line per case (input, outcome, what the tool does), ending with a newline."""
    lines = ["| Input | Row | What `medblip-infer` does |", "|---|---|---|"]
    for c in CASES:
        lines.append(f"| {c.input} | {_outcome(c.expect)} | {c.does} |")
    return "\n".join(lines) + "\n"


def build_all(folder: Path) -> dict[str, Path | str]:
    """Build every case into `folder`: name -> the path to give the CLI, or a str: the reason it was skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path | str] = {}
    for c in CASES:
        reason = c.skip()
        if reason is None:
            try:
                out[c.name] = c.build(folder)
                continue
            except (MissingVolume, dfx.Missing) as e:
                reason = f"real volume {e} is not installed"
        out[c.name] = reason
    return out


# ---------------------------------------------------------------- running as root: drop the DAC capabilities


_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


def drop_root_read() -> None:
    """preexec_fn: remove CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH from the bounding set, so that after exec
    even root obeys file permissions (a chmod 000 file is unreadable). Linux only."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


_CAN_DROP: bool | None = None


def can_drop_root_read() -> bool:
    """Whether `drop_root_read` makes a chmod 000 file unreadable to a child process here."""
    global _CAN_DROP
    if _CAN_DROP is None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "locked"
            p.write_bytes(b"x")
            p.chmod(0)
            try:
                r = subprocess.run([sys.executable, "-c", f"open({str(p)!r}, 'rb').read()"],
                                   preexec_fn=drop_root_read, capture_output=True, text=True, timeout=60)
                _CAN_DROP = r.returncode != 0 and "PermissionError" in r.stderr
            except (OSError, subprocess.SubprocessError):
                _CAN_DROP = False
    return _CAN_DROP


def child_preexec():
    """The preexec_fn for the CLI subprocess: drop root's read-anything capabilities when running as root."""
    if hasattr(os, "geteuid") and os.geteuid() == 0 and can_drop_root_read():
        return drop_root_read
    return None


if __name__ == "__main__":
    sys.stdout.write(markdown_table())

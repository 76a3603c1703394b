"""Read one NIfTI volume eagerly, with the numbers SimpleITK's reader gives (the training loader).

`load_volume(path).array` equals
`sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(float).astype(np.float32)`
bit for bit for every file both accept, using nibabel only to decode the header.
What SimpleITK (ITK 5.4 NiftiImageIO over nifti1_io) does, and this module copies:

- NaN/Inf voxels of float32/float64 data become 0, before any scaling.
- scl_slope/scl_inter: a non-finite value counts as 0; slope 0 then means 1, but
  the intercept is still added (nibabel instead ignores both when slope is 0).
  Slope 1 with intercept 0 means no scaling. Integer data is cast to float32,
  scaled in float64, stored as float32; float64 data stays float64.
- data starts at int(vox_offset); trailing singleton dims past 3 are dropped.
- axes come out reversed: nibabel's (i, j, k) array is this (k, j, i) array.
  Nothing is reoriented by the affine.

Where this module deliberately differs from SimpleITK:

- a truncated or corrupt file is an error (SimpleITK zero-fills it).
- compression is decided by the gzip magic bytes, not the name: a plain .nii
  named .nii.gz is accepted (SimpleITK accepts it too), and so is a gzipped
  file named .nii (SimpleITK cannot read it).
- NIfTI-2 single files are accepted with the same voxel rules (SimpleITK 2.5
  cannot read NIfTI-2 at all); .hdr/.img pairs and Analyze are not.
- vox_offset below the header size is rejected (SimpleITK reads from byte 348).
- values that are not finite in float32 after scaling are rejected.

ScanError codes: not_found (no such path), not_a_file (a directory, FIFO or
device), unreadable (permission, symlink loop, I/O error), corrupt_gzip (gzip
stream truncated, bad CRC or bad deflate data), not_nifti (no NIfTI-1/2
header: empty, zeros, Analyze, anything else), unsupported_format (.hdr/.img
pair), bad_header (vox_offset inside the header), bad_dims (fewer than 3 dims,
more than one volume, dims < 1), unsupported_dtype (complex, RGB, float128,
...), too_large (header declares more than max_voxels voxels or max_bytes
bytes; checked before any data is read), truncated (file ends inside the
header or the data), no_finite_data (every voxel NaN/Inf), out_of_range
(values not finite in float32: past its range after scaling, or NaN/Inf in an
array given to to_model_input), constant_volume (min == max: nothing to
normalise).
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import stat
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ..errors import ScanError
from .gunzip import GunzipReader
from .loaded import Geometry, LoadedVolume

DEFAULT_MAX_VOXELS = 512**3
DEFAULT_MAX_BYTES = 2 * 1024**3

# NIfTI header sizes; sizeof_hdr (first int32, either byte order) tells them apart.
_HEADERS = {348: (nib.Nifti1Header, b"n+1", b"ni1", 1), 540: (nib.Nifti2Header, b"n+2", b"ni2", 2)}
_SUPPORTED = {np.dtype(t).str[1:] for t in ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8")}
_CHUNK = 1 << 20


def _show(path) -> str:
    """The file name for a one-line message: control characters escaped, the rest as is.

    Only the name, never the directories: folders often carry patient names or IDs,
    and messages end up in output rows and logs (see the privacy rule in docs/guides/infer.md, Privacy).
    """
    s = os.fsdecode(path).rstrip("/" + os.sep) or os.fsdecode(path)
    s = os.path.basename(s) or s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _open(path):
    """Open a regular file for reading; every OS failure becomes a ScanError."""
    p = _show(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ScanError(f"no such file: {p}", code="not_found") from None
    except OSError as e:
        raise ScanError(f"cannot read {p}: {e.strerror or e}", code="unreadable") from None
    if stat.S_ISDIR(st.st_mode):
        raise ScanError(f"is a directory, not a NIfTI file: {p}", code="not_a_file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device could block or never end
        raise ScanError(f"not a regular file: {p}", code="not_a_file")
    try:
        return open(path, "rb")
    except OSError as e:
        if e.errno == errno.EISDIR:
            raise ScanError(f"is a directory, not a NIfTI file: {p}", code="not_a_file") from None
        raise ScanError(f"cannot read {p}: {e.strerror or e}", code="unreadable") from None


def _read(stream, n: int, p: str) -> bytearray:
    """Read exactly up to n bytes (fewer only at end of stream); decode errors become ScanError."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    try:
        while got < n:
            k = stream.readinto(view[got:])
            if not k:
                break
            got += k
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ScanError(f"corrupt or truncated gzip data in {p}: {e}", code="corrupt_gzip") from None
    except OSError as e:
        raise ScanError(f"cannot read {p}: {e.strerror or e}", code="unreadable") from None
    del view
    return buf if got == n else buf[:got]


def _drain(stream, p: str) -> None:
    """Decompress the rest of a gzip stream so its CRC and length are checked."""
    while _read(stream, _CHUNK, p):
        pass


def _fixed(x) -> float:
    """nifti1_io's FIXED_FLOAT: a non-finite header float counts as 0."""
    x = float(x)
    return x if math.isfinite(x) else 0.0


def nifti_geometry(hdr) -> Geometry | None:
    """The header's voxel-to-patient transform as SimpleITK picks it, in LPS+ (None when degenerate).

    The sform wins when its code is set and the qform's is not, or when it is scanner-based
    (code 1); otherwise a set qform wins; with neither, SimpleITK's identity at the origin.
    """
    q, s = int(hdr["qform_code"]), int(hdr["sform_code"])
    if q <= 0 and s <= 0:
        zooms = [abs(float(z)) or 1.0 for z in hdr.get_zooms()[:3]]
        return Geometry((0.0, 0.0, 0.0), tuple(zooms), tuple(np.eye(3).ravel()))
    affine = hdr.get_sform() if s > 0 and (q <= 0 or s == 1) else hdr.get_qform()
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3]
    norms = np.linalg.norm(lps[:, :3], axis=0)
    if not (np.all(np.isfinite(lps)) and np.all(norms > 0)):
        return None
    return Geometry(tuple(lps[:, 3]), tuple(norms), tuple((lps[:, :3] / norms).ravel()))


@dataclass(frozen=True)
class _Header:
    """What the header says, checked: the volume's shape (3 to 7 dims, the extra ones 1), dtype and data offset."""

    hdr: object  # nibabel Nifti1Header / Nifti2Header
    size: int  # sizeof_hdr: 348 or 540
    version: int  # 1 or 2
    shape: tuple
    dtype: np.dtype
    offset: int  # vox_offset: where the voxels start

    @property
    def nvox(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.nvox * self.dtype.itemsize


def read_header(stream, p: str):
    """The NIfTI-1/2 header block at the start of `stream` -> (nibabel header, sizeof_hdr, version)."""
    head = _read(stream, 4, p)
    if len(head) < 4:
        raise ScanError(f"not a NIfTI file (empty or a few bytes): {p}", code="not_nifti")
    sizes = (int.from_bytes(head, "little"), int.from_bytes(head, "big"))
    sizeof_hdr = next((s for s in sizes if s in _HEADERS), None)
    if sizeof_hdr is None:
        raise ScanError(f"not a NIfTI-1/2 file (no NIfTI header): {p}", code="not_nifti")
    header_cls, magic_one, magic_pair, version = _HEADERS[sizeof_hdr]
    block = head + _read(stream, sizeof_hdr - 4, p)
    if len(block) < sizeof_hdr:
        raise ScanError(f"file ends inside the NIfTI header: {p}", code="truncated")
    hdr = header_cls(binaryblock=bytes(block), check=False)
    magic = bytes(hdr["magic"])[:3]
    if magic == magic_pair:
        raise ScanError(
            f"NIfTI .hdr/.img pairs are not supported, convert to one .nii/.nii.gz file: {p}", code="unsupported_format"
        )
    if magic != magic_one:
        raise ScanError(f"not a NIfTI-{version} file (bad magic {magic!r}, Analyze?): {p}", code="not_nifti")
    return hdr, sizeof_hdr, version


def check_header(hdr, sizeof_hdr: int, version: int, p: str, *, max_voxels: int, max_bytes: int,
                 size_on_disk: int | None) -> _Header:
    """Dimensions, datatype and sizes from the header alone, before any voxel is read or allocated.
    `size_on_disk`: the file's size when it is not compressed (None for gzip)."""
    dim = [int(d) for d in hdr["dim"]]
    if not 1 <= dim[0] <= 7:
        raise ScanError(f"invalid NIfTI dim[0]={dim[0]} (must be 1..7): {p}", code="bad_dims")
    shape = tuple(dim[1 : dim[0] + 1])
    if any(d < 1 for d in shape):
        raise ScanError(f"invalid NIfTI dimensions {shape}: {p}", code="bad_dims")
    if len(shape) < 3:
        raise ScanError(f"image is {len(shape)}D {shape}, a 3D volume is needed: {p}", code="bad_dims")
    if any(d != 1 for d in shape[3:]):
        raise ScanError(
            f"image has shape {shape}: {math.prod(shape[3:])} volumes, exactly one 3D volume is needed: {p}",
            code="bad_dims",
        )
    try:
        dtype = hdr.get_data_dtype()
    except Exception:  # nibabel raises its own types for unknown datatype codes
        dtype = None
    if dtype is None or dtype.str[1:] not in _SUPPORTED:
        name = "unknown" if dtype is None else str(dtype)
        code = int(hdr["datatype"])
        raise ScanError(f"unsupported NIfTI datatype {code} ({name}): {p}", code="unsupported_dtype")

    vox_offset = float(hdr["vox_offset"])
    h = _Header(hdr, sizeof_hdr, version, shape, dtype, int(vox_offset) if math.isfinite(vox_offset) else -1)
    if h.nvox > max_voxels or h.offset + h.nbytes > max_bytes:
        raise ScanError(
            f"volume {shape} ({h.nvox} voxels, {h.nbytes} bytes) exceeds the limit of "
            f"{max_voxels} voxels / {max_bytes} bytes: {p}",
            code="too_large",
        )
    if h.offset < sizeof_hdr + 4:  # the 4 extension-flag bytes always follow the header
        raise ScanError(f"invalid vox_offset {vox_offset} (below {sizeof_hdr + 4}): {p}", code="bad_header")
    if size_on_disk is not None and size_on_disk < h.offset + h.nbytes:
        raise ScanError(
            f"file has {size_on_disk} bytes but the header needs {h.offset + h.nbytes}: {p}", code="truncated"
        )
    return h


def read_voxels(stream, h: _Header, p: str, is_gz: bool) -> np.ndarray:
    """The voxel bytes after the header and its extensions -> the on-disk dtype as SimpleITK's [k, j, i] array
    (on-disk order is i fastest: C order with the dims reversed). A gzip stream is read to its end, so its CRC
    and length are checked."""
    skipped = _read(stream, h.offset - h.size, p)  # extension flag and extensions: unused
    data = _read(stream, h.nbytes, p) if len(skipped) == h.offset - h.size else bytearray()
    if len(data) < h.nbytes:
        raise ScanError(f"data ends early: header needs {h.offset + h.nbytes} bytes: {p}", code="truncated")
    if is_gz:
        _drain(stream, p)
    return np.frombuffer(data, dtype=h.dtype).reshape(tuple(reversed(h.shape[:3])))


def zero_nonfinite(arr: np.ndarray, p: str, warnings: list[str]) -> tuple[np.ndarray, int]:
    """SimpleITK's rule for float data: every NaN / Inf voxel becomes 0 (all of them: an error). -> (array, count)."""
    if arr.dtype.kind != "f":
        return arr, 0
    arr = arr.astype(arr.dtype.newbyteorder("="))  # native and writable
    bad = ~np.isfinite(arr)
    nonfinite = int(np.count_nonzero(bad))
    if nonfinite == arr.size:
        raise ScanError(f"no finite voxels (all {arr.size} are NaN/Inf): {p}", code="no_finite_data")
    if nonfinite:
        arr[bad] = 0
        warnings.append(f"{nonfinite} non-finite voxels set to 0")
    return arr, nonfinite


def apply_scaling(arr: np.ndarray, hdr, warnings: list[str]) -> tuple[np.ndarray, float, float]:
    """SimpleITK's scl_slope / scl_inter rule: a zero slope reads as 1; scaling in float64 over the data cast to
    float32 (float64 data stays float64), stored back in that type. -> (array, slope, inter) as applied."""
    slope, inter = _fixed(hdr["scl_slope"]), _fixed(hdr["scl_inter"])
    if slope == 0.0:
        if inter != 0.0:
            warnings.append(f"scl_slope {float(hdr['scl_slope'])} read as 1 with scl_inter {inter} (SimpleITK rule)")
        slope = 1.0
    if slope != 1.0 or inter != 0.0:
        work = np.float64 if arr.dtype.str[1:] == "f8" else np.float32
        with np.errstate(over="ignore"):  # overflow to Inf is reported as out_of_range
            arr = (arr.astype(work, copy=False).astype(np.float64) * slope + inter).astype(work)
    return arr, slope, inter


def as_float32(arr: np.ndarray, p: str, slope: float, inter: float) -> np.ndarray:
    """The training code's .astype(float) then float32 (large integers round through float64 first); a volume
    past float32's range or with one value only is an error."""
    wide_int = arr.dtype.kind in "iu" and arr.dtype.itemsize >= 4
    with np.errstate(over="ignore"):  # float64 past float32's range becomes Inf: reported below as out_of_range
        out = (arr.astype(np.float64) if wide_int else arr).astype(np.float32, copy=False)
    lo, hi = float(out.min()), float(out.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ScanError(
            f"voxel values exceed the float32 range (scl_slope {slope}, scl_inter {inter} applied): {p}", code="out_of_range"
        )
    if lo == hi:
        raise ScanError(f"constant volume (every voxel is {lo}), nothing to normalise: {p}", code="constant_volume")
    return out


def load_volume(path, *, max_voxels: int = DEFAULT_MAX_VOXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                inflate=None) -> LoadedVolume:
    """Read a .nii / .nii.gz file into float32 [Z, Y, X]; raise ScanError (one line, stable code) if unusable.

    inflate: the zlib-compatible module that decompresses a .nii.gz (default: gunzip.inflater(), zlib-ng when
    installed)."""
    p = _show(path)
    with _open(path) as raw:
        is_gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        size_on_disk = os.fstat(raw.fileno()).st_size
        stream = GunzipReader(raw, inflate) if is_gz else raw
        hdr, sizeof_hdr, version = read_header(stream, p)
        h = check_header(hdr, sizeof_hdr, version, p, max_voxels=max_voxels, max_bytes=max_bytes,
                         size_on_disk=None if is_gz else size_on_disk)
        arr = read_voxels(stream, h, p, is_gz)
    warnings: list[str] = []
    arr, nonfinite = zero_nonfinite(arr, p, warnings)
    arr, slope, inter = apply_scaling(arr, hdr, warnings)
    out = as_float32(arr, p, slope, inter)
    del arr
    if version == 2:
        warnings.append("NIfTI-2 file: the training loader (SimpleITK) cannot read NIfTI-2; read with NIfTI-1 rules")
    return LoadedVolume(out, nonfinite, warnings, h.shape, h.dtype.str, nifti_geometry(hdr))

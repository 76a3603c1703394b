"""Read one DICOM MR series into float32 [Z, Y, X] with the values SimpleITK's series reader gives, strictly.

`load_series(series).array` equals
`sitk.GetArrayFromImage(sitk.ReadImage(GetGDCMSeriesFileNames(folder))).astype(float).astype(np.float32)`
for every series both accept: slices ordered by their position along the slice normal
(the cross product of the row and column directions), rows and columns as stored, each
frame's rescale slope and intercept applied in float64. A multi-frame file (Enhanced or
Legacy Converted Enhanced MR) is ordered by its per-frame positions, as the series
reader would order the same frames stored as single files, not by stored frame order.
pydicom reads the files, one at a time; SimpleITK is only the tests' oracle.

What is a volume: at least two frames, all with the same rows x columns, the same
orientation (direction cosines within 1e-3) and pixel spacing (within 0.1%), at
distinct positions whose gaps along the normal are all within 10% of their median.
Where SimpleITK warns and reads anyway (or silently picks), this is an error:

- too_large: more than max_slices files or frames, or voxels, decided from the file
  list and headers before any pixel is read
- bad_dims: one frame only (a 2D image, e.g. a single localizer)
- mixed_orientation: frames in different planes (a three-plane localizer, say)
- mixed_geometry: different rows x columns or pixel spacings
- duplicate_slices: two frames at one position (a repeated acquisition, a copied file)
- slice_gap: a gap between neighbouring positions off the median by more than 10% (a
  missing slice)
- corrupt_pixel_data: a frame that does not decode to rows x columns
- constant_volume, out_of_range: as for NIfTI
- several_series, no_images: a folder given as one scan (see `load_dicom`)
and per file those of dicom_files.py.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import ScanError
from .dicom_files import FileHeader, Frame, quiet_pydicom, read_header
from .dicom_series import DicomSeries, describe_skipped, find_series
from .loaded import Geometry, LoadedVolume

DEFAULT_MAX_SLICES = 2048
ORIENTATION_TOL = 1e-3  # absolute, per direction cosine
SPACING_TOL = 1e-3  # relative
GAP_TOL = 0.1  # relative to the median gap between neighbouring slices


def _what(i: int, n: int) -> str:
    return "the file" if n == 1 else f"file {i + 1} of {n} (by name)"


def _stack(frames: list[Frame], headers: list[FileHeader]) -> tuple[list[Frame], Geometry]:
    """Frames of one series -> (frames in volume order, geometry); raises ScanError unless they form a volume."""
    sizes = {(h.rows, h.cols) for h in headers}
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise ScanError(f"series mixes image sizes ({shown}): not one volume", code="mixed_geometry")
    ref = frames[0]
    for f in frames[1:]:
        if max(abs(a - b) for a, b in zip(f.orientation, ref.orientation)) > ORIENTATION_TOL:
            raise ScanError(f"series mixes slice orientations ({_where(f, headers)} lies in another plane): not one "
                            "volume (a localizer?)", code="mixed_orientation")
        if max(abs(a - b) / max(a, b) for a, b in zip(f.spacing, ref.spacing)) > SPACING_TOL:
            raise ScanError(f"series mixes pixel spacings ({_where(f, headers)} differs): not one volume",
                            code="mixed_geometry")
    if len(frames) == 1:
        raise ScanError("series has one slice: a 2D image, a 3D volume is needed", code="bad_dims")
    row, col = np.array(ref.orientation[:3]), np.array(ref.orientation[3:])
    normal = np.cross(row, col)
    order = sorted(frames, key=lambda f: (float(normal @ np.array(f.position)), f.file, f.index))
    dist = np.array([normal @ np.array(f.position) for f in order])
    gaps = np.diff(dist)
    median = float(np.median(gaps))
    same = int(np.count_nonzero(gaps <= GAP_TOL * median)) if median > 1e-6 else len(gaps)
    if same:
        raise ScanError(f"{same} pair{'s' if same != 1 else ''} of neighbouring slices share a position: not one "
                        "volume (a repeated acquisition or a copied file?)", code="duplicate_slices")
    off = np.flatnonzero(np.abs(gaps - median) > GAP_TOL * median)
    if off.size:
        k = int(off[0])
        raise ScanError(f"slices {k + 1} and {k + 2} of {len(order)} are {gaps[k]:.3g} mm apart where the series' "
                        f"spacing is {median:.3g} mm (tolerance {GAP_TOL:.0%}): a missing slice?", code="slice_gap")
    z = float(dist[-1] - dist[0]) / (len(order) - 1)
    direction = np.stack([row, col, normal], axis=1)  # columns: x, y, z axes
    geometry = Geometry(order[0].position, (ref.spacing[1], ref.spacing[0], z), tuple(direction.ravel()))
    return order, geometry


def _where(f: Frame, headers: list[FileHeader]) -> str:
    n = len(headers)
    return f"{_what(f.file, n)}, frame {f.index + 1}" if headers[f.file].frames > 1 else _what(f.file, n)


@quiet_pydicom()
def _read_pixels(path: Path, header: FileHeader, frames: list[Frame], zs: list[int], out: np.ndarray,
                 what: str) -> None:
    """Decode one file's frames into their slices of `out`, rescaled in float64 then stored as float32."""
    from pydicom.pixels import iter_pixels

    got = 0
    try:
        for k, pixels in enumerate(iter_pixels(path)):
            if k >= header.frames or pixels.shape != out.shape[1:]:
                raise ValueError("unexpected frame shape or count")
            f = frames[k]
            values = pixels.astype(np.float64)
            if f.slope != 1.0 or f.intercept != 0.0:
                values = values * f.slope + f.intercept
            with np.errstate(over="ignore"):  # past float32's range: reported as out_of_range
                out[zs[k]] = values
            got += 1
    except ScanError:
        raise
    except MemoryError:
        raise
    except OSError as e:
        raise ScanError(f"cannot read {what}: {e.strerror or type(e).__name__}", code="unreadable") from None
    except Exception as e:  # a decoder's failure; its message may quote the file path, so it is not shown
        raise ScanError(f"{what}: pixel data cannot be decoded ({type(e).__name__})", code="corrupt_pixel_data") \
            from None
    if got != header.frames:
        raise ScanError(f"{what}: {got} of {header.frames} frames decoded", code="corrupt_pixel_data")


def load_series(series: DicomSeries, *, max_voxels: int | None = None,
                max_slices: int = DEFAULT_MAX_SLICES) -> LoadedVolume:
    """One series -> float32 [Z, Y, X] as SimpleITK's series reader gives it; raises ScanError (stable code)."""
    from .nifti import DEFAULT_MAX_VOXELS

    max_voxels = DEFAULT_MAX_VOXELS if max_voxels is None else max_voxels
    n = len(series.files)
    if n > max_slices:
        raise ScanError(f"series has {n} files, more than the limit of {max_slices} slices", code="too_large")
    headers: list[FileHeader] = []
    frames: list[Frame] = []
    for i, path in enumerate(series.files):
        header, got = read_header(path, i, _what(i, n))
        headers.append(header)
        frames.extend(got)
        if len(frames) > max_slices:
            raise ScanError(f"series has more than {max_slices} frames, the limit", code="too_large")
    order, geometry = _stack(frames, headers)
    shape = (len(order), headers[0].rows, headers[0].cols)
    if math.prod(shape) > max_voxels:
        raise ScanError(f"volume {shape} ({math.prod(shape)} voxels) exceeds the limit of {max_voxels} voxels",
                        code="too_large")

    out = np.empty(shape, dtype=np.float32)
    z_of = {(f.file, f.index): z for z, f in enumerate(order)}
    by_file: dict[int, list[Frame]] = {}
    for f in frames:
        by_file.setdefault(f.file, []).append(f)
    for i, path in enumerate(series.files):
        mine = sorted(by_file[i], key=lambda f: f.index)
        _read_pixels(path, headers[i], mine, [z_of[(f.file, f.index)] for f in mine], out, _what(i, n))

    lo, hi = float(out.min()), float(out.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ScanError("rescaled values exceed the float32 range", code="out_of_range")
    if lo == hi:
        raise ScanError(f"constant volume (every voxel is {lo}), nothing to normalise", code="constant_volume")
    technical = {**(headers[0].technical or {}), "slice_count": len(order)}
    return LoadedVolume(out, 0, [], shape, headers[0].stored_dtype, geometry, series.uid_hash, technical)


def only_series(path) -> tuple[DicomSeries, Counter]:
    """The one image series in a folder tree (or multi-frame file) given as one scan; raises ScanError otherwise."""
    skipped: Counter = Counter()
    found = find_series(path, skipped)
    if not found:
        extra = f" ({describe_skipped(skipped)} skipped)" if skipped else ""
        raise ScanError(f"no DICOM image series found{extra}", code="no_images")
    if len(found) > 1:
        raise ScanError(f"{len(found)} image series found where one scan was expected: give one series per scan, or "
                        "give the folder itself to medblip-infer for one row per series", code="several_series")
    return found[0], skipped


def load_dicom(path, **limits) -> LoadedVolume:
    """A DICOM folder (one series) or multi-frame file -> LoadedVolume; non-image files skipped, said in warnings."""
    series, skipped = only_series(path)
    vol = load_series(series, **limits)
    if skipped:
        vol.warnings.append(f"skipped: {describe_skipped(skipped)}")
    return vol

"""The loaded-volume type every reader returns (NIfTI, DICOM), and where its voxels lie in the patient.

Geometry is in DICOM's patient frame (LPS+: x to the patient's left, y to the back, z
to the head), as SimpleITK reports it. `orientation` is SimpleITK's 3-letter code
(`DICOMOrientImageFilter.GetOrientationFromDirectionCosines`): one letter per array axis,
x (columns, the last array axis) first, naming the direction in which that index
increases. `LPS` is a DICOM axial stack as scanners store it; a NIfTI in RAS storage
reads as `RAS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# +x, -x / +y, -y / +z, -z of the LPS+ frame
_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))


def orientation_code(direction) -> str:
    """A 3x3 direction matrix (row-major, column c = array axis c in LPS+) -> e.g. 'LPS'.

    Oblique axes take the letter of their largest component, assigned greedily from the
    largest component of the whole matrix down so that no two axes share a letter pair
    (the rule SimpleITK uses).
    """
    m = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    code = [""] * 3
    free_rows, free_cols = {0, 1, 2}, {0, 1, 2}
    for _, r, c in sorted(((abs(m[r, c]), r, c) for r in range(3) for c in range(3)), reverse=True):
        if r in free_rows and c in free_cols:
            code[c] = _LETTERS[r][0 if m[r, c] > 0 else 1]
            free_rows.discard(r)
            free_cols.discard(c)
    return "".join(code)


@dataclass(frozen=True)
class Geometry:
    """Where array [Z, Y, X] lies in LPS+ space: origin of voxel 0 (mm), spacing (x, y, z) in mm, and the
    direction matrix, row-major, whose columns are the x, y, z axes (SimpleITK's GetOrigin/GetSpacing/GetDirection)."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def orientation(self) -> str:
        return orientation_code(self.direction)


@dataclass
class LoadedVolume:
    """One scan as the model loader sees it: `array` float32 [Z, Y, X] (SimpleITK axis order)."""

    array: np.ndarray
    nonfinite_count: int = 0
    warnings: list[str] = field(default_factory=list)
    shape_on_disk: tuple[int, ...] = ()  # NIfTI: header dims in nibabel (i, j, k, ...) order; DICOM: (frames, rows, cols)
    dtype_on_disk: str = ""  # numpy dtype string, byte order included, e.g. ">i2"
    geometry: Geometry | None = None
    series: str | None = None  # DICOM: short hash of the SeriesInstanceUID (never the UID itself)
    technical: dict | None = None  # DICOM: the technical fields the input checks read (preprocess/dicom_technical.py)

    @property
    def orientation(self) -> str:
        """SimpleITK's orientation code of the array, e.g. 'LPS'; '' when the source has no geometry."""
        return self.geometry.orientation if self.geometry is not None else ""

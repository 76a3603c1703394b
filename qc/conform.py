"""The opt-in conform step, run before the published loader: resample to isotropic voxels in the scan's own axes
(`iso1mm`), and optionally reorient (`iso1mm,LIA`), so that the loader's resize by voxel counts keeps the
scan's physical aspect and the model sees the brain the way the site's training files lay.

Arrays are SimpleITK's [Z, Y, X] (preprocess/loaded.py). Resampling is trilinear (scipy.ndimage, order 1) on
the grid that starts at voxel 0 and steps `mm` along each axis up to the last voxel (no extrapolation); this is
what SimpleITK's Resample with an identity transform and a linear interpolator computes on that grid (the
tests' oracle). There is no anti-aliasing filter: a finer scan is sampled, not averaged. Reorienting only
permutes and flips axes (nibabel.orientations): no interpolation. Orientation codes name, per axis x, y, z,
the direction in which the index increases (nibabel's axcodes; FreeSurfer's conformed space is LIA).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..errors import MedblipError, ScanError
from ..preprocess.loaded import Geometry

NONE = "none"
_ISO = re.compile(r"^iso(\d+(?:\.\d+)?)mm$")
_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


@dataclass(frozen=True)
class ConformSpec:
    """`iso1mm` or `iso1mm,ORIENT`; `mm` None means no conform step (the published loader alone)."""

    mm: float | None = None
    orientation: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "ConformSpec":
        """'none' / '' / None -> no step; 'iso1mm' ; 'iso1mm,LIA'. A bad spec raises MedblipError (code bad_conform)."""
        if text is None or text.strip().lower() in ("", NONE):
            return cls()
        parts = [p.strip() for p in text.split(",")]
        m = _ISO.match(parts[0].lower())
        if not m or len(parts) > 2 or not 0.2 <= float(m.group(1)) <= 5:
            raise MedblipError(f"conform spec {text!r}: expected isoNmm or isoNmm,ORIENT (e.g. iso1mm, iso1mm,LIA)",
                               code="bad_conform")
        orient = parts[1].upper() if len(parts) == 2 else None
        if orient is not None and not (len(orient) == 3 and all(any(c in p for c in orient) and
                                                                sum(c in p for c in orient) == 1 for p in _PAIRS)):
            raise MedblipError(f"conform orientation {parts[1]!r}: three letters, one of L/R, one of A/P, one of S/I "
                               "(e.g. LIA, RAS, LPS)", code="bad_conform")
        return cls(float(m.group(1)), orient)

    @property
    def active(self) -> bool:
        return self.mm is not None

    def __str__(self) -> str:
        if not self.active:
            return NONE
        return f"iso{self.mm:g}mm" + (f",{self.orientation}" if self.orientation else "")


def resample_iso(array: np.ndarray, geometry: Geometry, mm: float) -> tuple[np.ndarray, Geometry]:
    """[Z, Y, X] with spacing (x, y, z) -> the same field on a grid of `mm` voxels, same origin and axes."""
    from scipy import ndimage

    spacing_zyx = np.array(geometry.spacing[::-1], dtype=np.float64)
    n = np.array(array.shape)
    new = [int(math.floor((k - 1) * s / mm + 1e-6)) + 1 for k, s in zip(n, spacing_zyx)]
    step = mm / spacing_zyx  # source index per output index, per axis
    if np.allclose(step, 1.0, rtol=0, atol=1e-6):
        return array, geometry
    out = ndimage.affine_transform(array.astype(np.float32, copy=False), step, output_shape=tuple(new), order=1,
                                   mode="nearest", output=np.float32, prefilter=False)
    return out, Geometry(geometry.origin, (mm, mm, mm), geometry.direction)


def reorient(array: np.ndarray, geometry: Geometry, target: str) -> tuple[np.ndarray, Geometry]:
    """Permute and flip [Z, Y, X] so that its axes x, y, z point to `target` (e.g. 'LIA'); geometry follows."""
    from nibabel.orientations import axcodes2ornt, ornt_transform

    current = geometry.orientation
    if current == target:
        return array, geometry
    ornt = ornt_transform(axcodes2ornt(tuple(current)), axcodes2ornt(tuple(target)))
    xyz = array.T  # nibabel's (i, j, k) = (x, y, z)
    d = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    origin = np.asarray(geometry.origin, dtype=np.float64)
    new_dir, new_spacing = np.zeros((3, 3)), np.zeros(3)
    for axis, (dest, flip) in enumerate(ornt.astype(int)):
        if flip < 0:
            origin = origin + (xyz.shape[axis] - 1) * spacing[axis] * d[:, axis]
            xyz = np.flip(xyz, axis)
        new_dir[:, dest] = flip * d[:, axis]
        new_spacing[dest] = spacing[axis]
    order = [int(a) for a, _ in sorted(enumerate(ornt[:, 0].astype(int)), key=lambda t: t[1])]
    xyz = np.transpose(xyz, order)
    out = np.ascontiguousarray(xyz.T)
    return out, Geometry(tuple(origin), tuple(new_spacing), tuple(new_dir.ravel()))


def conform(array: np.ndarray, geometry: Geometry | None, spec: ConformSpec) -> tuple[np.ndarray, Geometry | None]:
    """Apply `spec` to a loaded volume [Z, Y, X]; ScanError (code conform_failed) when the scan has no geometry."""
    if not spec.active:
        return array, geometry
    if geometry is None:
        raise ScanError(f"--conform {spec}: the scan has no usable voxel spacing and orientation", code="conform_failed")
    array, geometry = resample_iso(array, geometry, spec.mm)
    if spec.orientation:
        array, geometry = reorient(array, geometry, spec.orientation)
    return array, geometry

"""Input checks: the `qc` block of a row, and the stable warning codes of the checks a scan fails.

Every figure is in (x, y, z) order: the NIfTI (i, j, k) axes, a DICOM series' columns, rows and slices.
Geometry checks (voxel anisotropy, the loader's aspect distortion) judge the volume the published loader is
given, so after `--conform` when it runs; resolution and coverage checks (thick slices, coarse voxels, field of
view, slice count) and the DICOM fields judge the scan as acquired, which no resampling restores. The
thresholds and their sources are in thresholds.py and docs/inputs/qc.md.
"""

from __future__ import annotations

import numpy as np

from ..preprocess.loaded import Geometry
from . import thresholds as T

# Every code a check can add to a row's `warnings`, with what it means (docs/inputs/qc.md lists the same).
CODES = {
    "anisotropic_voxels": "largest / smallest voxel spacing of the loader's input above the training data's",
    "aspect_distorted": "the loader's resize changes the brain's physical aspect",
    "thick_slices": "slices thicker than the training data's 1 mm",
    "coarse_voxels": "every axis coarser than the training data's 1 mm",
    "small_field_of_view": "an axis covers less than the training data's fields of view",
    "few_slices": "fewer voxels along an axis than any training volume had",
    "unknown_spacing": "the scan has no usable voxel spacing: geometry checks cannot run",
    "not_3d_acquisition": "DICOM MRAcquisitionType is 2D (the training volumes are 3D acquisitions)",
    "derived_image": "DICOM ImageType is DERIVED or SECONDARY (a reformat, map or screen capture)",
    "localizer": "DICOM ImageType names a LOCALIZER (a scout, not a diagnostic series)",
    "contrast_enhanced": "DICOM names a contrast agent (the training volumes are unenhanced)",
    "slice_gaps": "DICOM slices spaced further apart than they are thick",
    "out_of_distribution": "visual tokens far from the reference profile's (see ood)",
}


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def loader_resize(shape_zyx, size: int) -> tuple[int, ...]:
    """The published loader's resized size per array axis (preprocess/volume.py: int() truncation)."""
    m = max(shape_zyx)
    return tuple(int(size * n / m) for n in shape_zyx)


def aspect_distortion(shape_xyz, spacing_xyz, size: int) -> list[float]:
    """Per axis: mm per model-input voxel over the smallest axis' (1.0 everywhere: the aspect is kept).

    align_corners=True maps the first and last voxel centres onto the resized ones, so an axis of n voxels
    spanning (n - 1) * spacing mm lands on new - 1 steps."""
    new = loader_resize(tuple(shape_xyz)[::-1], size)[::-1]
    mm = [(n - 1) * s / max(k - 1, 1) for n, s, k in zip(shape_xyz, spacing_xyz, new)]
    low = min(mm) or 1.0
    return [_r(v / low, 4) for v in mm]


def intensity_summary(array: np.ndarray) -> dict:
    """Min, max, percentiles and the fraction of voxels above 10 % of the range (on every 2nd voxel past 8M)."""
    sample = array[::2, ::2, ::2] if array.size > 8_000_000 else array
    lo, hi = float(array.min()), float(array.max())
    p1, p50, p99 = (float(v) for v in np.percentile(sample, [1, 50, 99]))
    fg = float(np.count_nonzero(sample > lo + 0.1 * (hi - lo))) / sample.size
    return {"min": _r(lo, 4), "p1": _r(p1, 4), "p50": _r(p50, 4), "p99": _r(p99, 4), "max": _r(hi, 4),
            "foreground_fraction": _r(fg, 4)}


def _geometry_block(array: np.ndarray, geometry: Geometry | None) -> dict:
    shape = list(array.shape[::-1])
    if geometry is None:
        return {"shape": shape, "spacing_mm": None, "field_of_view_mm": None, "anisotropy": None, "orientation": ""}
    spacing = [_r(s, 4) for s in geometry.spacing]
    return {"shape": shape, "spacing_mm": spacing, "field_of_view_mm": [_r(n * s, 1) for n, s in zip(shape, spacing)],
            "anisotropy": _r(max(spacing) / min(spacing), 3), "orientation": geometry.orientation}


def assess(source, loader_array: np.ndarray, loader_geometry: Geometry | None, size: int,
           conformed: bool = False) -> tuple[dict, list[str]]:
    """A loaded scan (preprocess.LoadedVolume) and the array the loader gets -> (qc block, warning codes)."""
    src = _geometry_block(source.array, source.geometry)
    qc = dict(src)
    findings: dict[str, str] = {}
    if conformed:
        qc["conformed"] = _geometry_block(loader_array, loader_geometry)
    loader = qc["conformed"] if conformed else src
    new = loader_resize(loader_array.shape, size)
    qc["input_fill"] = _r(float(np.prod(new)) / size**3, 4)
    qc["intensity"] = intensity_summary(source.array)
    if loader["spacing_mm"] is None:
        findings["unknown_spacing"] = "no voxel spacing in the header"
    else:
        qc["aspect_distortion"] = aspect_distortion(loader["shape"], loader["spacing_mm"], size)
        if loader["anisotropy"] > T.MAX_ANISOTROPY:
            findings["anisotropic_voxels"] = f"spacing ratio {loader['anisotropy']:g} > {T.MAX_ANISOTROPY:g}"
        if max(qc["aspect_distortion"]) > T.MAX_ASPECT_DISTORTION:
            findings["aspect_distorted"] = f"aspect changed {max(qc['aspect_distortion']):g}x > {T.MAX_ASPECT_DISTORTION:g}"
    tech = source.technical
    if src["spacing_mm"] is not None:
        largest, smallest = max(src["spacing_mm"]), min(src["spacing_mm"])
        if largest > T.MAX_SPACING_MM and src["anisotropy"] > T.MAX_ANISOTROPY:
            findings["thick_slices"] = f"{largest:g} mm slices > {T.MAX_SPACING_MM:g} mm"
        if smallest > T.MAX_SPACING_MM:
            findings["coarse_voxels"] = f"finest spacing {smallest:g} mm > {T.MAX_SPACING_MM:g} mm"
        if min(src["field_of_view_mm"]) < T.MIN_FIELD_OF_VIEW_MM:
            findings["small_field_of_view"] = f"{min(src['field_of_view_mm']):g} mm < {T.MIN_FIELD_OF_VIEW_MM:g} mm"
    if min(src["shape"]) < T.MIN_SLICES:
        findings["few_slices"] = f"{min(src['shape'])} voxels along an axis < {T.MIN_SLICES}"
    if tech:
        qc["dicom"] = dict(tech)
        _dicom_checks(tech, src, findings)
    codes = [c for c in CODES if c in findings]  # a fixed order
    qc["checks"] = {c: findings[c] for c in codes}
    return qc, codes


def _dicom_checks(tech: dict, src: dict, findings: dict) -> None:
    thickness = tech.get("slice_thickness_mm")
    if thickness and thickness > T.MAX_SPACING_MM and "thick_slices" not in findings:
        findings["thick_slices"] = f"slice thickness {thickness:g} mm > {T.MAX_SPACING_MM:g} mm"
    gap = src["spacing_mm"][2] if src["spacing_mm"] else tech.get("spacing_between_slices_mm")
    if thickness and gap and gap > thickness * T.MAX_GAP_RATIO:
        findings["slice_gaps"] = f"slices {gap:g} mm apart, {thickness:g} mm thick"
    if tech.get("mr_acquisition_type") == "2D":
        findings["not_3d_acquisition"] = "MRAcquisitionType 2D"
    image_type = tech.get("image_type") or []
    if image_type[:1] == ["DERIVED"] or image_type[1:2] == ["SECONDARY"]:
        findings["derived_image"] = "ImageType " + "\\".join(image_type[:2])
    if "LOCALIZER" in image_type:
        findings["localizer"] = "ImageType LOCALIZER"
    if tech.get("contrast_agent"):
        findings["contrast_enhanced"] = "a contrast agent is named"

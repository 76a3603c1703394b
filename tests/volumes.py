"""Real NIfTI volumes shipped inside installed wheels (nilearn, nibabel), found without importing their test code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# name -> (package, path inside the package, what it is)
REAL_VOLUMES = {
    "mni_t1": (
        "nilearn",
        "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "T1 brain template, 197x233x189 uint8",
    ),
    "mni_gm": ("nilearn", "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz", "grey-matter map, uint8"),
    "mni_wm": ("nilearn", "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz", "white-matter map, uint8"),
    "stat_map": ("nilearn", "datasets/data/image_10426.nii.gz", "statistical map, 53x63x46 float32"),
    "anatomical": ("nibabel", "tests/data/anatomical.nii", "T1, 33x41x25 big-endian int16"),
    "standard": ("nibabel", "tests/data/standard.nii.gz", "4x5x7 uint8"),
    "reoriented": ("nibabel", "tests/data/reoriented_anat_moved.nii", "21x26x22 big-endian float32"),
    "resampled": ("nibabel", "tests/data/resampled_anat_moved.nii", "17x21x3 big-endian float32 with 153 NaNs"),
    "functional": ("nibabel", "tests/data/functional.nii", "17x21x3x20 scaled int16 (4D)"),
    "example4d": ("nibabel", "tests/data/example4d.nii.gz", "128x96x24x2 int16 (4D)"),
    "example_nifti2": ("nibabel", "tests/data/example_nifti2.nii.gz", "NIfTI-2, 32x20x12x2 int16 (4D)"),
    "analyze_hdr": ("nibabel", "tests/data/analyze.hdr", "Analyze 7.5 header"),
    "nifti1_pair_hdr": ("nibabel", "tests/data/nifti1.hdr", "NIfTI-1 pair header (.hdr/.img)"),
}


def package_dir(package: str) -> Path | None:
    """The installed folder of a top-level package, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def real_volume(name: str) -> Path | None:
    """Path of a real volume from REAL_VOLUMES, or None when its wheel (or the file) is not installed."""
    package, rel, _ = REAL_VOLUMES[name]
    root = package_dir(package)
    path = root / rel if root is not None else None
    return path if path is not None and path.is_file() else None

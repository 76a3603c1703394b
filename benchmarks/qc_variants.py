"""Variants of a synthetic held-out scan for the `qc` suite: the same brain stored anisotropic or with permuted
axes (the conform step's cases), and inputs the model never saw (the OOD score's cases)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _zoom(vol: np.ndarray, affine: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Resample (trilinear) a volume on an isotropic grid to voxels of `spacing` mm, same origin and axes."""
    from scipy import ndimage

    old = np.linalg.norm(affine[:3, :3], axis=0)
    factors = old / np.asarray(spacing, dtype=np.float64)
    out = ndimage.zoom(vol.astype(np.float32), factors, order=1, mode="nearest", grid_mode=False)
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] / old * np.asarray(spacing, dtype=np.float64)
    return out, new


def aniso(spacing):
    def make(vol, affine):
        return _zoom(vol, affine, spacing)

    return make


def permuted(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy stored with its axes in (k, i, j) order: a viewer shows the same brain, the loader a
    rotated one."""
    new = affine.copy()
    new[:, :3] = affine[:, [2, 0, 1]]
    return np.ascontiguousarray(vol.transpose(2, 0, 1)), new


def inverted(vol, affine):
    """Contrast inverted (bright background, dark brain: CT-like windows of a T1 are not)."""
    v = vol.astype(np.float32)
    return v.max() - v, affine


def half_brain(vol, affine):
    """The left-right half of the volume on the low-index side."""
    return np.ascontiguousarray(vol[: vol.shape[0] // 2]), affine


def identity(vol, affine):
    return vol, affine


# name -> how it is made from a held-out scan (volume, affine)
CONFORM_CASES = {"isotropic": identity, "1x1x3 mm": aniso((1.0, 1.0, 3.0)), "0.5x0.5x5 mm": aniso((0.5, 0.5, 5.0)),
                 "axes permuted": permuted}
OOD_CASES = {"inverted contrast": inverted, "half the brain": half_brain, "5 mm slices": aniso((2.0, 2.0, 5.0))}


def save(path: Path, vol: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(vol, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path

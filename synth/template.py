"""The MNI152 T1 template from nilearn's wheel, its lateral ventricles, and their enlargements (1 mm grid)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..errors import MedblipError

# Lateral ventricles: dark (T1 < 80 of 255), outside grey and white matter, in this MNI box (mm); the two
# largest connected components of that set are the left and right lateral ventricles of the template.
VENTRICLE_BOX_MM = {"x": (-30.0, 30.0), "y": (-45.0, 30.0), "z": (-5.0, 35.0)}
VENTRICLE_T1_MAX = 80.0
TISSUE_MAX = 0.5
# Enlargement by binary dilation, in 1 mm steps; the planted region is the largest enlargement.
MAX_DILATION_MM = 12


@dataclass(frozen=True)
class Template:
    t1: np.ndarray          # float32 (197, 233, 189), the template's intensities
    affine: np.ndarray      # voxel -> MNI mm
    csf_value: float        # mean T1 inside the ventricles
    enlarged: tuple         # enlarged[r]: bool mask of the ventricles dilated by r mm, r = 0..MAX_DILATION_MM

    @property
    def region(self) -> np.ndarray:
        """Where the planted change can be: the ventricles at their largest enlargement."""
        return self.enlarged[-1]

    def with_ventricles(self, dilation_mm: int) -> np.ndarray:
        """The template with its ventricles enlarged by `dilation_mm`: the added voxels take the CSF intensity."""
        out = self.t1.copy()
        added = self.enlarged[dilation_mm] & ~self.enlarged[0]
        out[added] = self.csf_value
        return out


def _data_file(name: str):
    from ..demo_scan import mni_t1_path

    t1 = mni_t1_path()
    if t1 is None:
        raise MedblipError("the synthetic cohort needs nilearn's MNI template: pip install 'medblip-edge[demo]'",
                           code="missing_dependency")
    return t1.parent / name


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(_data_file("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    tissue = sum(np.asarray(nib.load(_data_file(f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz")).dataobj,
                            dtype=np.float32) for k in ("gm", "wm")) / 255.0
    ijk = np.indices(t1.shape, dtype=np.float32).reshape(3, -1)
    xyz = (img.affine[:3, :3] @ ijk + img.affine[:3, 3:]).reshape((3,) + t1.shape)
    box = np.ones(t1.shape, bool)
    for axis, (lo, hi) in zip(xyz, VENTRICLE_BOX_MM.values()):
        box &= (axis > lo) & (axis < hi)
    dark = box & (tissue < TISSUE_MAX) & (t1 < VENTRICLE_T1_MAX)
    labels, n = ndimage.label(dark)
    sizes = ndimage.sum(dark, labels, range(1, n + 1))
    ventricles = np.isin(labels, 1 + np.argsort(sizes)[-2:])
    brain = tissue > TISSUE_MAX
    enlarged = [ventricles]
    ball = ndimage.generate_binary_structure(3, 1)
    for _ in range(MAX_DILATION_MM):
        enlarged.append(ndimage.binary_dilation(enlarged[-1], ball) & (brain | ventricles))
    return Template(t1=t1, affine=img.affine.astype(np.float64), csf_value=float(t1[ventricles].mean()),
                    enlarged=tuple(enlarged))

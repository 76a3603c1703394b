"""The same scan stored differently: voxel axes flipped, permuted, or thinned to anisotropic voxels, each file's
affine keeping every voxel's world position. A viewer shows one brain; the published loader, which does not
reorient, sees four different arrays: what the placement checks of an --explain map are run on."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def write_variants(src: Path, folder: Path, crop_to: int | None = None) -> dict[str, Path]:
    """The same brain, its voxel axes stored differently; each affine keeps the world position of every voxel.
    as_is: `src` as it is; flipped: i and k reversed; permuted: axes stored (k, i, j); anisotropic: every 3rd
    j slice kept, its j spacing tripled -> {variant: path in `folder`}.

    crop_to=224: j cropped to 224 voxels first where it is longer, so that a scan whose longest axis is j becomes
    one the loader pads without resizing (each scan voxel is one model voxel); anisotropic then keeps every voxel
    and calls the k axis 2.5 times its spacing."""
    folder.mkdir(parents=True, exist_ok=True)
    img = nib.load(src)
    data = np.asarray(img.dataobj)
    a = img.affine
    if crop_to is not None and data.shape[1] > crop_to:
        start = (data.shape[1] - crop_to) // 2
        data = data[:, start: start + crop_to]
        a = a @ np.array([[1, 0, 0, 0], [0, 1, 0, start], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[0, 3], flip[2, 3] = data.shape[0] - 1, data.shape[2] - 1
    perm = np.zeros((4, 4))
    perm[3, 3] = 1
    perm[2, 0] = perm[0, 1] = perm[1, 2] = 1  # new axis 0 = old k, 1 = old i, 2 = old j
    aniso = (data, a @ np.diag([1, 1, 2.5, 1.0])) if crop_to else (data[:, ::3, :], a @ np.diag([1, 3, 1, 1.0]))
    variants = {"as_is": (data, a), "flipped": (data[::-1, :, ::-1], a @ flip),
                "permuted": (data.transpose(2, 0, 1), a @ perm), "anisotropic": aniso}
    out = {}
    for name, (arr, affine) in variants.items():
        out[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), out[name])
    return out

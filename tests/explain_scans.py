"""Scans and a model for the explanation tests: the real MNI T1 written with flipped, permuted and anisotropic
voxel axes (nibabel), and a tiny random model made to depend on its input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch


def write_variants(src: Path, folder: Path, crop_to: int | None = None) -> dict[str, Path]:
    """The same brain, its voxel axes stored differently; each affine keeps the world position of every voxel.
    as_is: the template (RAS storage, 197x233x189); flipped: i and k reversed; permuted: axes stored (k, i, j);
    anisotropic: every 3rd j slice kept, 3 mm along j.

    crop_to=224: j cropped to 224 voxels first, so the longest axis is the model's size and the loader pads
    without resizing (each scan voxel is one model voxel); anisotropic then keeps every voxel and calls the
    k axis 2.5 mm."""
    folder.mkdir(parents=True, exist_ok=True)
    img = nib.load(src)
    data = np.asarray(img.dataobj)
    a = img.affine
    if crop_to is not None:
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


def sensitise(model) -> None:
    """Make a random model's margin follow its input: a random tiny model averages its 344 image tokens almost
    uniformly in the Q-Former, so no patch moves its answer. Sharper cross-attention (query and key x6), a
    stronger cross-attention path (value and output x10) and a patch embedding that outweighs the position
    embedding (x30) give patch-level effects of a few hundredths of a nat, the same weights every run."""
    with torch.no_grad():
        for layer in model.qformer.qformer.encoder.layer:
            if layer.has_cross_attention:
                cross = layer.crossattention
                cross.attention.query.weight.mul_(6)
                cross.attention.key.weight.mul_(6)
                cross.attention.value.weight.mul_(10)
                cross.output.dense.weight.mul_(10)
        model.visual_encoder.patch_embed_3d.proj.weight.mul_(30)

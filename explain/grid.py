"""The preprocessing undone: where each voxel of the scan lands in the model input, and back.

The training loader (preprocess/volume.py) takes SimpleITK's array [Z, Y, X] (nibabel's (i, j, k) axes
reversed, nothing reoriented), resizes it trilinearly with align_corners=True to `new` = int(S * n / max(n))
voxels per axis, and zero-pads it at offsets int((S - new) / 2). With align_corners=True, array index z of an
axis of n voxels lies at model index z * (new - 1) / (n - 1) + offset: a voxel's position in the model input,
exactly. Maps go back by sampling the model-grid map at those positions (nearest patch for a patch map,
linear for a voxel map); the padding has no scan voxel, so nothing of it comes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelGrid:
    """One scan's placement in the model input: its array shape [Z, Y, X], the resized shape and the offsets."""

    shape: tuple[int, int, int]
    size: int
    patch: int

    @property
    def new(self) -> tuple[int, int, int]:
        m = max(self.shape)
        return tuple(int(self.size * n / m) for n in self.shape)

    @property
    def offset(self) -> tuple[int, int, int]:
        return tuple(int((self.size - n) / 2) for n in self.new)

    def positions(self, axis: int) -> np.ndarray:
        """Model-input index (float) of each array index along `axis` (0 = Z, SimpleITK order)."""
        n, m, off = self.shape[axis], self.new[axis], self.offset[axis]
        z = np.arange(n, dtype=np.float64)
        scale = (m - 1) / (n - 1) if n > 1 else 0.0
        return z * scale + off

    def inside(self) -> np.ndarray:
        """[S, S, S] bool: the model-input voxels that hold the scan (not padding)."""
        mask = np.zeros((self.size,) * 3, dtype=bool)
        (a, b, c), (x, y, z) = self.offset, self.new
        mask[a: a + x, b: b + y, c: c + z] = True
        return mask

    def patch_of(self, axis: int) -> np.ndarray:
        """The patch index each array index along `axis` falls in."""
        g = self.size // self.patch
        return np.clip(np.floor(self.positions(axis) / self.patch).astype(np.int64), 0, g - 1)

    def patches_to_scan(self, patch_map: np.ndarray) -> np.ndarray:
        """[g, g, g] (model D, H, W order) -> [Z, Y, X]: each voxel gets the value of the patch it falls in."""
        return patch_map[np.ix_(self.patch_of(0), self.patch_of(1), self.patch_of(2))]

    def voxels_to_scan(self, voxel_map: np.ndarray) -> np.ndarray:
        """[S, S, S] model-grid map -> [Z, Y, X], linear along each axis at each voxel's position."""
        out = np.asarray(voxel_map, dtype=np.float32)
        for axis in range(3):
            pos = self.positions(axis)
            last = self.offset[axis] + self.new[axis] - 1  # the scan's last model index: never the padding past it
            lo = np.minimum(np.floor(pos).astype(np.int64), last)
            hi = np.minimum(lo + 1, last)
            w = (pos - lo).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = -1
            w = w.reshape(shape)
            out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
        return out

    def patch_mask(self, index: tuple[int, int, int]) -> np.ndarray:
        """[Z, Y, X] bool: the scan voxels that fall in model patch `index` (D, H, W)."""
        axes = [self.patch_of(a) == index[a] for a in range(3)]
        return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]

    def resolution_mm(self, spacing_xyz) -> tuple[float, float, float]:
        """How many mm of the scan one patch spans along each array axis, as (x, y, z) like SimpleITK's spacing."""
        out = []
        for axis in range(3):
            n, m = self.shape[axis], self.new[axis]
            per_model_voxel = (n - 1) / (m - 1) if m > 1 else float(n)
            out.append(self.patch * per_model_voxel * float(spacing_xyz[2 - axis]))
        return tuple(reversed(out))


def to_nibabel(array_zyx: np.ndarray) -> np.ndarray:
    """SimpleITK order [Z, Y, X] -> nibabel's (i, j, k)."""
    return np.ascontiguousarray(np.transpose(array_zyx, (2, 1, 0)))


def ras_affine(geometry) -> np.ndarray:
    """preprocess.loaded.Geometry (LPS+, SimpleITK's origin/spacing/direction) -> the 4x4 RAS+ affine of nibabel's
    (i, j, k) = (x, y, z) array axes."""
    direction = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(geometry.spacing, np.float64)[None, :]
    lps[:3, 3] = geometry.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

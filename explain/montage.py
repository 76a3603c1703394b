"""The PNG a clinician opens: axial, coronal and sagittal slices through the map's peak, the map over the scan,
a colour bar, the label, its probability, the target class and what resolution the map really has.

Slices are shown in RAS+ after nibabel's closest canonical reorientation (display only: the NIfTI map keeps the
scan's own grid), with each panel's aspect from the voxel sizes. Needs matplotlib (a dependency of the package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MedblipError


def _canonical(scan_ijk: np.ndarray, map_ijk: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    scan = nib.orientations.apply_orientation(scan_ijk, ornt)
    rel = nib.orientations.apply_orientation(map_ijk, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[np.argsort(ornt[:, 0])]
    return scan, rel, zooms


def write_montage(path: Path, scan_ijk: np.ndarray, map_ijk: np.ndarray, affine: np.ndarray, title: str,
                  note: str) -> None:
    """scan and map: nibabel-order 3D arrays of one grid; `affine` their RAS+ affine. The slices pass through the
    map's peak; values under a tenth of the colour scale are not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MedblipError("the montage needs matplotlib: pip install matplotlib",
                           code="missing_dependency") from None
    scan, rel, zooms = _canonical(scan_ijk, map_ijk, affine)
    peak = np.unravel_index(int(np.argmax(rel)), rel.shape)
    positive = rel[rel > 0]
    # colour scale to the 99.5th percentile of the map's positive voxels: a gradient-refined map has a few very
    # high voxels that would leave everything else invisible at a scale to its maximum
    top = float(np.percentile(positive, 99.5)) if positive.size else 1.0
    lo, hi = np.percentile(scan, [1, 99.5])
    views = [("axial", scan[:, :, peak[2]], rel[:, :, peak[2]], zooms[1] / zooms[0], ("L", "R")),
             ("coronal", scan[:, peak[1], :], rel[:, peak[1], :], zooms[2] / zooms[0], ("L", "R")),
             ("sagittal", scan[peak[0], :, :], rel[peak[0], :, :], zooms[2] / zooms[1], ("P", "A"))]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.3), dpi=90)
    image = None
    for ax, (name, s, r, aspect, (left, right)) in zip(axes, views):
        ax.imshow(s.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        shown = np.ma.masked_where(r.T <= 0.1 * top, np.minimum(r.T / top, 1.0))
        image = ax.imshow(shown, cmap="hot", origin="lower", vmin=0, vmax=1, alpha=0.6, aspect=aspect,
                          interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.text(0.02, 0.5, left, transform=ax.transAxes, color="w", fontsize=9, va="center")
        ax.text(0.98, 0.5, right, transform=ax.transAxes, color="w", fontsize=9, va="center", ha="right")
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01)
    bar.set_label("relevance (fraction of its 99.5th percentile)", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.02, note, fontsize=7.5, wrap=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)

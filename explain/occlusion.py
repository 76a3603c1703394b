"""Occlusion: each patch of the model input replaced by the volume's background, the class margin's drop recorded.
Forward passes only, through the pipeline's own backends (PyTorch, ONNX Runtime or TensorRT), in batches of the
vision backend's size. The background is the volume's minimum: after min-max normalisation it is 0, the value of
the zero padding, and the value a voxel blanked to the scan's minimum in the scan's own file takes."""

from __future__ import annotations

import numpy as np
import torch

from ..model.prompts import LABELS
from .target import margin_numpy


def pipeline_margin(pipe, volumes: torch.Tensor, patient_text: str, target: int) -> np.ndarray:
    """volumes [B,1,S,S,S] -> margins [B] of class `target` through `pipe`'s backends."""
    visual = pipe.visual_tokens(volumes)
    ll = [[pipe.classify(visual[i: i + 1], patient_text)["log_likelihoods"][k] for k in LABELS]
          for i in range(visual.shape[0])]
    return margin_numpy(ll, target)


def occluded(volume: torch.Tensor, indices, patch: int, background: float) -> torch.Tensor:
    """[1,1,S,S,S] -> [len(indices),1,S,S,S], copy j with patch indices[j] (flat, D-H-W order) set to background."""
    g = volume.shape[-1] // patch
    out = volume.repeat(len(indices), 1, 1, 1, 1)
    for j, flat in enumerate(indices):
        d, h, w = np.unravel_index(int(flat), (g, g, g))
        out[j, :, d * patch:(d + 1) * patch, h * patch:(h + 1) * patch, w * patch:(w + 1) * patch] = background
    return out


def occlusion_map(pipe, volume: torch.Tensor, patient_text: str, target: int, patch: int,
                  batch: int | None = None, progress=None, only=None) -> tuple[np.ndarray, float]:
    """-> (drop of the margin per patch [g,g,g], the unoccluded margin). Positive: the patch supports the class.
    `only`: flat patch indices to occlude (the others stay 0); default all."""
    g = volume.shape[-1] // patch
    background = float(volume.min())
    base = float(pipeline_margin(pipe, volume, patient_text, target)[0])
    batch = batch or max(1, int(getattr(pipe.vision, "max_batch", 1) or 1))
    todo = list(range(g ** 3)) if only is None else [int(i) for i in only]
    drops = np.zeros(g ** 3)
    for start in range(0, len(todo), batch):
        idx = todo[start: start + batch]
        drops[idx] = base - pipeline_margin(pipe, occluded(volume, idx, patch, background), patient_text, target)
        if progress:
            progress(start + len(idx), len(todo))
    return drops.reshape(g, g, g), base


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""
    def ranks(x):
        x = np.asarray(x, np.float64).ravel()
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        starts = np.cumsum(counts) - counts
        return (starts + (counts - 1) / 2.0)[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def deletion_curve(pipe, volume: torch.Tensor, order, patient_text: str, target: int, patch: int,
                   steps: int = 16) -> np.ndarray:
    """Margins after removing the first k patches of `order` (flat indices, most relevant first), k at `steps`+1
    evenly spaced counts from 0 to all -> [steps + 1]."""
    g = volume.shape[-1] // patch
    background = float(volume.min())
    counts = np.linspace(0, g ** 3, steps + 1).round().astype(int)
    out = []
    for k in counts:  # one volume at a time: memory stays at two model inputs
        v = volume.clone()
        for flat in order[:k]:
            d, h, w = np.unravel_index(int(flat), (g, g, g))
            v[:, :, d * patch:(d + 1) * patch, h * patch:(h + 1) * patch, w * patch:(w + 1) * patch] = background
        out.append(pipeline_margin(pipe, v, patient_text, target)[0])
    return np.asarray(out)


def curve_area(margins: np.ndarray) -> float:
    """Area under a deletion curve on [0, 1] (trapezoids), in nats: smaller is a faster fall."""
    x = np.linspace(0, 1, len(margins))
    return float(np.sum((margins[1:] + margins[:-1]) / 2 * np.diff(x)))

"""Checks that a map is not noise, on a model whose answer is known to come from a planted region:
pointing game (peak inside the region, mass inside it against its volume share), randomisation test
(Adebayo et al. 2018: the map of a model whose vision tower and Q-Former are re-initialised should not look
like the trained model's), the deletion curve (relevance order against random orders), and placement (the
overlay's top patch blanked in the scan's own file, stored four ways, moves the margin as occluding that patch
in the model input does)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .grid import ModelGrid, to_nibabel
from .occlusion import curve_area, deletion_curve, occlusion_map, pipeline_margin, rank_correlation
from .relevance import detail_attribution, explain_relevance, refine


@dataclass
class Pointing:
    hit: bool  # the map's peak lies inside the region
    mass_ratio: float  # (map mass inside the region / all mass) / (region voxels / all voxels)


def read_mask(mask_path) -> np.ndarray:
    return np.asarray(nib.load(mask_path).dataobj).squeeze() > 0.5


def top_patch_hit(patches: np.ndarray, mask: np.ndarray, size: int, patch: int) -> tuple[bool, float]:
    """The pointing game at the map's own resolution: do the scan voxels of the most relevant patch (the
    unrefined map, [g, g, g]) include voxels of the planted region (`mask`, nibabel's (i, j, k) grid of the scan)?
    -> (hit, chance): chance is the share of the scan's patches that hold region voxels (a random patch's odds).
    `pointing` plays the same game with the refined map's peak, a voxel."""
    grid = ModelGrid(tuple(reversed(mask.shape)), size, patch)
    g = patches.shape[0]
    z, y, x = np.meshgrid(grid.patch_of(0), grid.patch_of(1), grid.patch_of(2), indexing="ij")
    flat = to_nibabel((z * g + y) * g + x)
    top = int(np.argmax(patches))
    touched = np.unique(flat[mask])
    return bool(np.isin(top, touched)), float(len(touched) / len(np.unique(flat)))


def pointing(map_path, mask: np.ndarray) -> Pointing:
    """The written map and the planted region's mask (read_mask), both in the scan's own grid."""
    rel = np.asarray(nib.load(map_path).dataobj, dtype=np.float64).squeeze()
    if rel.shape != mask.shape:
        raise ValueError(f"map {rel.shape} and mask {mask.shape} are not one grid")
    peak = np.unravel_index(int(np.argmax(rel)), rel.shape)
    total = rel.clip(min=0).sum() or 1.0
    share = mask.sum() / mask.size
    return Pointing(bool(mask[peak]), float(rel.clip(min=0)[mask].sum() / total / share) if share else 0.0)


def window_hits(rel, volume, grid: ModelGrid, mask: np.ndarray, patch: int, windows) -> dict[str, bool]:
    """The pointing game of the voxel-refined map under other refinement windows (background, smooth), from one
    gradient (`rel`: explain_relevance(..., keep_grad=True)) -> {"BxS": peak inside the region}."""
    grad = rel.volume_grad
    prel = torch.from_numpy(rel.patches.ravel()).to(grad.device, grad.dtype)  # as explain_relevance refines
    vol = volume.to(grad.device, grad.dtype)
    out = {}
    for background, smooth in windows:
        vox = refine(prel, detail_attribution(grad, vol, patch, background, smooth), patch).cpu().numpy()
        in_scan = to_nibabel(grid.voxels_to_scan(vox))
        out[f"{background}x{smooth}"] = bool(mask[np.unravel_index(int(np.argmax(in_scan)), in_scan.shape)])
    return out


def reinitialised(model, seed: int = 0):
    """A copy of `model` whose vision tower and Q-Former weights (matrices and the query tokens) are drawn
    afresh, N(0, 0.02); LayerNorms, biases, the projection and the LLM kept."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in (out.visual_encoder, out.qformer):
            for p in part.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return out


def randomisation(model, tasks, volume, patient_text: str, target: int, trained_patches: np.ndarray,
                  seed: int = 0) -> float:
    """Rank correlation of the patch maps of the trained and the re-initialised model (low is good)."""
    rand = explain_relevance(reinitialised(model, seed), tasks, volume, patient_text, target, refine_voxels=False)
    return rank_correlation(trained_patches, rand.patches)


def deletion(pipe, volume, patches: np.ndarray, patient_text: str, target: int, patch: int, steps: int = 8,
             n_random: int = 3, seed: int = 0) -> dict:
    """Areas under the deletion curve (margin in nats over the fraction removed): relevance order and the mean of
    `n_random` random orders; their difference, positive when relevance order lowers the margin faster."""
    order = np.argsort(-patches.ravel())
    ours = curve_area(deletion_curve(pipe, volume, order, patient_text, target, patch, steps))
    rng = np.random.default_rng(seed)
    rand = [curve_area(deletion_curve(pipe, volume, rng.permutation(patches.size), patient_text, target, patch, steps))
            for _ in range(n_random)]
    return {"auc_relevance": ours, "auc_random": float(np.mean(rand)), "better_by": float(np.mean(rand) - ours)}


def blank_in_file(pipe, path: Path, marks: np.ndarray, work: Path) -> tuple[torch.Tensor, bool]:
    """`path` with the voxels `marks` (nibabel's grid) set to the scan's minimum in the file itself (header kept),
    read back through the pipeline's own preprocessing -> (its model input, whether the marks held the scan's
    maximum, so that blanking them changed the min-max normalisation)."""
    img = nib.load(path)
    arr = np.asarray(img.dataobj).copy()
    rescaled = bool(arr[marks].max() >= arr.max())
    arr[marks] = arr.min()
    out = Path(work) / "blanked.nii.gz"
    nib.save(nib.Nifti1Image(arr, img.affine, header=img.header), out)
    return pipe.prepare(out).volume, rescaled


def share_inside(volume: torch.Tensor, changed: torch.Tensor, index, patch: int) -> float:
    """The share of the change between two model inputs [1,1,S,S,S] that lies inside model patch `index` (D, H, W)
    (0 where nothing changed)."""
    diff = (volume - changed).abs()[0, 0]
    d, h, w = (int(i) * patch for i in index)
    total = diff.sum()
    return float(diff[d: d + patch, h: h + patch, w: w + patch].sum() / total) if total > 0 else 0.0


def at_model_resolution(path: Path, volume, patch: int, out: Path) -> Path:
    """`path` rewritten at the model's resolution: its model input without the padding (normalised and resized
    as the loader does), in nibabel's axis order, with the affine that keeps each voxel's world position (with
    align_corners, resized index z lies at original index z (n - 1) / (m - 1)). Its longest axis is the model's
    size, so the loader pads it without resizing: blanking its voxels and occluding model voxels then touch the
    same voxels. The model input is the original's up to the loader normalising the resized values again."""
    from ..preprocess import load_scan, open_scan

    size = int(volume.shape[-1])
    grid = ModelGrid(tuple(load_scan(open_scan(path)).array.shape), size, patch)
    (a, b, c), (z, y, x) = grid.offset, grid.new
    arr = volume[0, 0, a: a + z, b: b + y, c: c + x].detach().cpu().numpy().astype(np.float32)
    scale = [(n - 1) / (m - 1) if m > 1 else 1.0 for n, m in zip(grid.shape, grid.new)]  # Z, Y, X
    img = nib.load(path)
    nib.save(nib.Nifti1Image(to_nibabel(arr), img.affine @ np.diag([scale[2], scale[1], scale[0], 1.0])), out)
    return out


def placement(pipe, ex, path, volume, patient_text: str, target: int, work) -> dict:
    """For `path` (`volume`: its model input) at the model's resolution (at_model_resolution: the loader pads it
    without resizing), stored as it is, flipped, permuted and anisotropic (storage.write_variants): the overlay's
    top patch (the voxels the map marks for it in that file's own grid) blanked in the file, against the same patch
    occluded in the model input
    -> {variant: {"occluded_drop", "blanked_drop", "inside", "rescaled"}}, margin drops in nats. inside: the share
    of the model input's change that lies in the patch; rescaled: the marks held the scan's maximum, so blanking
    them changed the min-max normalisation. (A mirrored-marks control is in tests/test_explain.py; here the top
    patch sits over the ventricles, near the middle, where a mirror image of the marks is mostly the marks.)

    The loader does not reorient, so for the flipped and permuted files the model sees a turned brain: their
    drops are the model's answer to an input it was not trained on, and only their agreement is the check."""
    from ..preprocess import load_scan, open_scan
    from .storage import write_variants

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    source = at_model_resolution(Path(path), volume, ex.patch, work / "model-resolution.nii.gz")
    size = int(volume.shape[-1])
    out = {}
    for name, variant in write_variants(source, work / "stored", crop_to=size).items():
        stored = pipe.prepare(variant).volume
        patches = ex.relevance(stored, patient_text, target, False).patches
        flat = int(np.argmax(patches))
        index = np.unravel_index(flat, patches.shape)
        grid = ModelGrid(tuple(load_scan(open_scan(variant)).array.shape), size, ex.patch)
        drops, base = occlusion_map(pipe, stored, patient_text, target, ex.patch, only=[flat])
        changed, rescaled = blank_in_file(pipe, variant, to_nibabel(grid.patch_mask(index)), work)
        out[name] = {"occluded_drop": float(drops.ravel()[flat]),
                     "blanked_drop": base - float(pipeline_margin(pipe, changed, patient_text, target)[0]),
                     "inside": share_inside(stored, changed, index, ex.patch), "rescaled": rescaled}
    return out


def placement_summary(per: list[dict]) -> dict:
    """Per storage variant, over the scans that ran placement: the largest difference of the blanked and occluded
    drops (nats, and relative to the occluded drop), the mean drops and the smallest share inside the patch."""
    rows = [p["placement"] for p in per if "placement" in p]
    out = {}
    for name in (rows[0] if rows else {}):
        cases = [r[name] for r in rows]
        out[name] = {"scans": len(cases),
                     "max_abs_diff": float(max(abs(c["blanked_drop"] - c["occluded_drop"]) for c in cases)),
                     "max_rel_diff": float(max(abs(c["blanked_drop"] - c["occluded_drop"]) / abs(c["occluded_drop"])
                                               for c in cases)),
                     "min_inside": float(min(c["inside"] for c in cases)),
                     **{f"mean_{k}": float(np.mean([c[k] for c in cases])) for k in ("occluded_drop", "blanked_drop")},
                     "rescaled": int(sum(c["rescaled"] for c in cases))}
    return out


def read_cohort(folder) -> list[dict]:
    """A synthetic cohort's cohort.csv (scan, label, patient_text, mask, ...), its paths made absolute."""
    import csv

    folder = Path(folder)
    with open(folder / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("scan", "mask"):
            if r.get(key):
                r[key] = str((folder / r[key]).resolve())
    return rows


def run_checks(pipe, rows: list[dict], out, label: str = "AD", progress=None, windows=(),
               placement_scans: int = 0) -> dict:
    """The checks on every scan of `rows` labelled `label` that has a planted-region mask, the map of `label`
    explained -> {"scans": per-scan figures, "summary": means}. `windows`: (background, smooth) pairs whose
    refined peak is pointed with too (window_hits), as "window_hits" in each scan and the summary.
    `placement_scans`: the first that many of those scans also run `placement` ("placement" in the summary)."""
    from ..preprocess import load_scan, open_scan
    from .run import Explainer, ExplainOptions
    from .target import class_index

    ex = Explainer(pipe, ExplainOptions(out=out, target=label, montage=False))
    target = class_index(label)
    per = []
    chosen = [r for r in rows if r.get("label") == label and r.get("mask")]
    for i, r in enumerate(chosen):
        text = r.get("patient_text") or ""
        row = pipe(r["scan"], text)
        prepared = pipe.prepare(r["scan"])
        block = ex(open_scan(r["scan"]), prepared.volume, row, text)
        mask = read_mask(r["mask"])
        pt = pointing(block["files"]["nifti"], mask)
        rel = ex.relevance(prepared.volume, text, target, False, keep_grad=bool(windows))
        size = int(prepared.volume.shape[-1])
        patch_hit, chance = top_patch_hit(rel.patches, mask, size, ex.patch)
        swept = {}
        if windows:
            grid = ModelGrid(tuple(load_scan(open_scan(r["scan"])).array.shape), size, ex.patch)
            swept = {"window_hits": window_hits(rel, prepared.volume, grid, mask, ex.patch, windows)}
        per.append({"scan": row["scan"], "predicted": row["label"], "hit": pt.hit, "patch_hit": patch_hit,
                    "patch_hit_chance": chance,
                    "mass_ratio": pt.mass_ratio,
                    "randomisation_rank_corr": randomisation(ex.model(), pipe.tasks, prepared.volume, text, target,
                                                             rel.patches),
                    **deletion(pipe, prepared.volume, rel.patches, text, target, ex.patch), **swept})
        if i < placement_scans:
            per[-1]["placement"] = placement(pipe, ex, r["scan"], prepared.volume, text, target,
                                             Path(out) / "placement")
        if progress:
            progress(i + 1, len(chosen))
    keys = ("hit", "patch_hit", "patch_hit_chance", "mass_ratio", "randomisation_rank_corr", "auc_relevance",
            "auc_random", "better_by")
    summary = {k: float(np.mean([p[k] for p in per])) for k in keys} if per else {}
    if windows and per:
        summary["window_hits"] = {k: float(np.mean([p["window_hits"][k] for p in per])) for k in per[0]["window_hits"]}
    if placement_scans and per:
        summary["placement"] = placement_summary(per)
    return {"scans": per, "summary": {"n": len(per), **summary}}

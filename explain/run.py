"""One scan explained end to end: the map (relevance or occlusion), mapped back into the scan's own voxel grid
and affine, written as NAME.relevance.nii.gz and NAME.relevance.png, and summarised as the row's `explanation`."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..errors import MedblipError
from ..model.prompts import LABELS
from ..preprocess import LoadedVolume, load_scan
from ..preprocess.scans import NiftiScan
from ..qc.conform import conform
from . import block
from .grid import ModelGrid, ras_affine, to_nibabel
from .occlusion import occlusion_map, rank_correlation
from .relevance import explain_relevance
from .target import class_index

METHODS = ("relevance", "occlusion")


@dataclass
class ExplainOptions:
    out: Path
    method: str = "relevance"
    target: str | None = None  # AD, MCI or NC; None: the predicted class
    refine: bool = True  # relevance: spread each patch's relevance by detail_attribution (relevance.py)
    montage: bool = True
    include_text: bool = False  # the top patient-text tokens' text in the block (rows never carry it otherwise)

    def check(self) -> None:
        if self.method not in METHODS:
            raise MedblipError(f"unknown explanation method {self.method!r}; choose {' or '.join(METHODS)}",
                               code="usage")
        if self.target is not None:
            class_index(self.target)


@dataclass
class ScanMap:
    """A map on the model-input grid, patch or voxel resolution, and how it was made."""

    patches: np.ndarray  # [g, g, g]
    voxels: np.ndarray | None  # [S, S, S] or None
    extra: dict


def _stem(name: str) -> str:
    stem = re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "scan"


class Explainer:
    """Explains the rows of one pipeline. The relevance method needs the bundle's PyTorch weights in fp32: the
    pipeline's own model when it runs them, else a copy loaded once on `device`."""

    def __init__(self, pipe, opts: ExplainOptions, device: str = "cpu"):
        opts.check()
        self.pipe, self.opts, self.device = pipe, opts, device
        self._model = None
        self.written: set[str] = set()

    def model(self):
        if self._model is None:
            vision = self.pipe.vision
            if getattr(vision, "name", "") == "torch" and vision.precision == "fp32":
                self._model = vision.model
            else:
                from ..bundle.format import TORCH
                from ..model.weights import load_weights

                bundle = self.pipe.bundle
                self._model = load_weights(bundle.config, bundle.path(TORCH), torch.float32, self.device)
        return self._model

    @property
    def patch(self) -> int:
        return int(self.pipe.bundle.config.vision.patch)

    # -- the maps ------------------------------------------------------------

    def relevance(self, volume, patient_text: str, target: int, refine: bool, keep_grad: bool = False):
        return explain_relevance(self.model(), self.pipe.tasks, volume, patient_text, target, refine, keep_grad)

    def make_map(self, volume, patient_text: str, target: int) -> ScanMap:
        if self.opts.method == "relevance":
            rel = self.relevance(volume, patient_text, target, self.opts.refine)
            return ScanMap(rel.patches, rel.voxels, {"relevance": rel})
        drops, base = occlusion_map(self.pipe, volume, patient_text, target, self.patch)
        negative = float(-drops[drops < 0].sum() / (np.abs(drops).sum() or 1))
        extra = {"margin": base, "negative_share": round(negative, 4)}
        try:
            rel = self.relevance(volume, patient_text, target, refine=False)
            extra["rank_correlation_with_relevance"] = round(rank_correlation(drops, rel.patches), 4)
        except MedblipError as e:
            extra["rank_correlation_with_relevance"] = None
            extra["why_no_correlation"] = str(e)
        return ScanMap(np.clip(drops, 0, None), None, extra)

    # -- one scan ------------------------------------------------------------

    def name_for(self, row: dict) -> str:
        name = _stem(row["scan"]) + (f"-{row['series']}" if row.get("series") else "")
        if name in self.written:
            name = f"{name}-{str(row.get('scan_sha256') or '')[:8]}"
        self.written.add(name)
        return name

    def __call__(self, scan, volume, row: dict, patient_text: str = "") -> dict:
        """scan: the scan object (preprocess.scans) of `row`; volume [1,1,S,S,S] its model input -> the block."""
        t0 = time.perf_counter()
        label = self.opts.target or row["label"]
        target = class_index(label)
        loaded = load_scan(scan)
        conformed = self.pipe.qc.conform.active
        if conformed:  # the model saw the conformed array (qc/conform.py): the map lies on its grid
            array, geometry = conform(loaded.array, loaded.geometry, self.pipe.qc.conform)
            loaded = LoadedVolume(array, geometry=geometry)
        grid = ModelGrid(tuple(loaded.array.shape), int(volume.shape[-1]), self.patch)
        smap = self.make_map(volume, patient_text, target)
        t_map = time.perf_counter()
        in_scan = grid.voxels_to_scan(smap.voxels) if smap.voxels is not None else grid.patches_to_scan(smap.patches)
        map_ijk = to_nibabel(np.nan_to_num(in_scan.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0))
        image = map_image(None if conformed else scan, loaded, map_ijk)  # conformed: the grid's own affine
        out = Path(self.opts.out)
        out.mkdir(parents=True, exist_ok=True)
        name = self.name_for(row)
        files = {"nifti": str(out / f"{name}.relevance.nii.gz")}
        nib.save(image, files["nifti"])
        spacing = loaded.geometry.spacing if loaded.geometry is not None else (1.0, 1.0, 1.0)
        refined = smap.voxels is not None
        note = block.resolution_note(grid, spacing, refined, self.opts.method)
        result = {"method": self.opts.method,
                  "target": {"class": label, "given": self.opts.target is not None,
                             "margin": None},
                  "files": files, "peak": block.peak_of(map_ijk, image.affine),
                  "patch_grid": list(smap.patches.shape), "refined": refined, "resolution": note}
        rel = smap.extra.get("relevance")
        if rel is not None:
            result["target"]["margin"] = round(rel.margin, 5)
            text_ids = self.pipe.tasks.prompt_ids(patient_text)[: self._n_text(patient_text)] if patient_text else []
            result["share"] = block.shares(rel.llm_inputs, rel.n_prompt, len(text_ids))
            if text_ids:
                tok = self.pipe.tokenizer if self.opts.include_text else None
                result["text_tokens"] = block.top_text_tokens(rel.llm_inputs, text_ids, tok)
        else:
            result["target"]["margin"] = round(smap.extra["margin"], 5)
            result["occlusion"] = {k: v for k, v in smap.extra.items() if k != "margin"}
        if self.opts.montage:
            files["png"] = str(out / f"{name}.relevance.png")
            prob = row.get("probabilities", {}).get(label)
            title = (f"{row['scan']}: {row['label']} (p = {row['probabilities'][row['label']]:.2f}); "
                     f"map for {label}" + (f" (p = {prob:.2f})" if prob is not None and label != row["label"] else ""))
            from .montage import write_montage

            write_montage(Path(files["png"]), to_nibabel(loaded.array), map_ijk.reshape(map_ijk.shape[:3]),
                          image.affine, title, note + ("; random weights" if row.get("random_weights") else ""))
        t1 = time.perf_counter()
        result["timings_ms"] = {"map": round((t_map - t0) * 1000, 1), "total": round((t1 - t0) * 1000, 1)}
        return result

    def _n_text(self, patient_text: str) -> int:
        """How many leading prompt tokens are the patient text's."""
        return max(0, len(self.pipe.tasks.prompt_ids(patient_text)) - len(self.pipe.tasks.prompt_ids("")))


def map_image(scan, loaded, map_ijk: np.ndarray):
    """The map as an image of the scan's own grid: a NIfTI input's header and affine, or a DICOM series' affine."""
    if isinstance(scan, NiftiScan):
        src = nib.load(scan.path)
        hdr = src.header.copy()  # geometry, units and codes kept; free text and extensions not carried over
        hdr["descrip"] = b"medblip-edge relevance map"
        hdr["aux_file"] = b""
        hdr["intent_name"] = b""
        if hasattr(hdr, "extensions"):
            del hdr.extensions[:]
        hdr.set_data_dtype(np.float32)
        hdr.set_slope_inter(1.0, 0.0)
        data = map_ijk.reshape(tuple(int(d) for d in src.shape))
        img = type(src)(data, src.affine, header=hdr)
        img.set_qform(src.header.get_qform(), int(src.header["qform_code"]))
        img.set_sform(src.header.get_sform(), int(src.header["sform_code"]))
        return img
    if loaded.geometry is None:
        raise MedblipError("the scan has no geometry to place a map in", code="no_geometry")
    img = nib.Nifti1Image(map_ijk, ras_affine(loaded.geometry))
    img.set_qform(img.affine, 1)
    img.set_sform(img.affine, 1)
    return img


def explain_row(explainer: Explainer | None, scan_of, volume, row: dict, patient_text: str) -> dict:
    """The runtime's hook: add `explanation` to a result row (an error block if it fails; the diagnosis stays)."""
    if explainer is None or "error" in row:
        return row
    try:
        row["explanation"] = explainer(scan_of(), volume, row, patient_text)
    except MedblipError as e:
        row["explanation"] = {"error": e.as_json()}
    except (OSError, MemoryError, RuntimeError) as e:
        row["explanation"] = {"error": {"code": "explain_failed", "message": f"{type(e).__name__}: {e}"[:300]}}
    return row


__all__ = ["ExplainOptions", "Explainer", "LABELS", "METHODS", "explain_row", "map_image"]

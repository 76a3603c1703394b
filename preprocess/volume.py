"""Turn a loaded volume into the model's input exactly as the training code does (min-max, trilinear, centred pad)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ScanError
from .loaded import LoadedVolume
from .scans import DicomScan, NiftiScan, open_scan


@dataclass(frozen=True)
class PreprocessSpec:
    """The preprocessing a model was trained with; written into a bundle manifest via `as_dict()`."""

    size: int = 224
    normalisation: str = "minmax"
    interpolation: str = "trilinear"
    align_corners: bool = True
    padding: str = "centre-zero"
    axis_order: str = "sitk-zyx"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """Read a manifest's dict back; unknown keys are an error (a newer spec this code cannot honour)."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing fields: {sorted(unknown)}")
        spec = cls(**d)
        spec.check()
        return spec

    def check(self) -> None:
        """Raise ValueError unless this is the one computation `to_model_input` implements."""
        want = PreprocessSpec(size=self.size)
        if self != want or not (isinstance(self.size, int) and self.size > 0):
            raise ValueError(f"unsupported preprocessing {self.as_dict()}; supported: {want.as_dict()}, any size > 0")


def to_model_input(array: np.ndarray, size: int = 224) -> torch.Tensor:
    """A 3D volume [Z, Y, X] (any real dtype) -> float32 [1, 1, size, size, size] in [0, 1], zero-padded."""
    if array.ndim != 3:
        raise ScanError(f"expected a 3D volume, got shape {tuple(array.shape)}", code="bad_dims")
    # Training: .astype(float) then torch.FloatTensor; float32 input is already that value.
    array = np.ascontiguousarray(array, dtype=None if array.dtype == np.float32 else np.float64)
    img = torch.from_numpy(array).float()
    lo, hi = img.min(), img.max()
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise ScanError("volume has NaN/Inf or values past float32 (load_volume zeroes NaN/Inf)", code="out_of_range")
    if lo == hi:  # (img - min) / 0 would be NaN everywhere
        raise ScanError(f"constant volume (every voxel is {float(lo)}), nothing to normalise", code="constant_volume")
    if not torch.isfinite(hi - lo):  # (img - min) / (max - min) would be Inf/NaN in float32
        raise ScanError(f"value range {float(lo):g} .. {float(hi):g} exceeds float32, cannot normalise",
                        code="out_of_range")
    img = (img - lo) / (hi - lo)

    m = max(img.shape)
    new = tuple(int(size * n / m) for n in img.shape)  # int() truncates, as in training
    if min(new) < 1:
        raise ScanError(f"volume {tuple(img.shape)} too thin: an axis would resize to 0 of {size}", code="bad_dims")
    img = F.interpolate(img[None, None], size=new, mode="trilinear", align_corners=True)

    out = torch.zeros(1, 1, size, size, size, dtype=torch.float32)
    a, b, c = (int((size - n) / 2) for n in new)
    out[:, :, a : a + new[0], b : b + new[1], c : c + new[2]] = img
    return out


def as_scan(scan) -> NiftiScan | DicomScan:
    """A path (NIfTI file, DICOM folder or multi-frame file) or a scan object -> the scan object."""
    return scan if isinstance(scan, (NiftiScan, DicomScan)) else open_scan(scan)


def load_scan(scan, **load_kwargs) -> LoadedVolume:
    """Read a scan (a path or a scan object) into float32 [Z, Y, X]; raises ScanError."""
    return as_scan(scan).load(**load_kwargs)


def preprocess_scan(
    scan: str | os.PathLike | NiftiScan | DicomScan, spec: PreprocessSpec = PreprocessSpec(), **load_kwargs
) -> tuple[torch.Tensor, LoadedVolume]:
    """Load a scan (NIfTI file, DICOM series folder or multi-frame file) and build its model input:
    (float32 [1, 1, S, S, S], the LoadedVolume)."""
    spec.check()
    vol = load_scan(scan, **load_kwargs)
    return to_model_input(vol.array, spec.size), vol

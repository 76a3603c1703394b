"""NIfTI scan -> model input, bit-exact with MedBLIP's SimpleITK training loader (nibabel only at run time)."""

from .nifti import DEFAULT_MAX_BYTES, DEFAULT_MAX_VOXELS, LoadedVolume, load_volume
from .volume import PreprocessSpec, preprocess_scan, to_model_input

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_VOXELS",
    "LoadedVolume",
    "PreprocessSpec",
    "load_volume",
    "preprocess_scan",
    "to_model_input",
]

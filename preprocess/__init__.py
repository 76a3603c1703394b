"""Scan (NIfTI file or DICOM series) -> model input, bit-exact with MedBLIP's SimpleITK training loader.

nibabel reads NIfTI and pydicom reads DICOM at run time; SimpleITK is the tests' oracle.
"""

from .loaded import Geometry, LoadedVolume, orientation_code
from .nifti import DEFAULT_MAX_BYTES, DEFAULT_MAX_VOXELS, load_volume
from .scans import DicomScan, NiftiScan, open_scan
from .volume import PreprocessSpec, load_scan, preprocess_scan, to_model_input

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_VOXELS",
    "DicomScan",
    "Geometry",
    "LoadedVolume",
    "NiftiScan",
    "PreprocessSpec",
    "load_scan",
    "load_volume",
    "open_scan",
    "orientation_code",
    "preprocess_scan",
    "to_model_input",
]

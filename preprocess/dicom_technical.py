"""The technical fields of a DICOM MR series that input checks read (qc/), each kept only from a fixed vocabulary.

Only these reach an output row: Modality, MRAcquisitionType, ScanningSequence, SequenceVariant, ImageType,
SliceThickness, SpacingBetweenSlices, whether a contrast agent is named (never its name) and the slice count.
A value outside its vocabulary becomes "other", so no free text written by a scanner or an operator is ever
copied (see the privacy rule in docs/guides/infer.md, Privacy).
"""

from __future__ import annotations

import math

TAGS = ["MRAcquisitionType", "ScanningSequence", "SequenceVariant", "ImageType", "SliceThickness",
        "SpacingBetweenSlices", "ContrastBolusAgent", "ContrastBolusAgentSequence"]

# DICOM PS3.3 C.8.3.1 (MR Image Module) defined terms; ImageType values from C.7.6.1.1.2 and C.8.3.1.1.1 and
# the common vendor third values (M, P, R, I: magnitude, phase, real, imaginary; MPR, MIP: reformats).
_ACQUISITION = {"2D", "3D"}
_SEQUENCE = {"SE", "IR", "GR", "EP", "RM"}
_VARIANT = {"SK", "MTC", "SS", "TRSS", "SP", "MP", "OSP", "NONE"}
_IMAGE_TYPE = {"ORIGINAL", "DERIVED", "PRIMARY", "SECONDARY", "LOCALIZER", "AXIAL", "M", "P", "R", "I", "MAG",
               "PHASE", "ND", "NORM", "MPR", "MIP", "MINIP", "SUBTRACTION", "DIFFUSION", "ADC", "TRACEW", "FA",
               "MOCO", "DIS2D", "DIS3D", "FM", "FIL", "MOSAIC", "NONE", "OTHER", "VOLUME", "PROJECTION IMAGE",
               "REFORMATTED", "MIXED", "MAGNITUDE", "REAL", "IMAGINARY"}


def _words(value, vocabulary: set) -> list[str] | None:
    """A (multi-valued) code string -> its values, each kept if in `vocabulary`, else 'other'; None when absent."""
    if value is None:
        return None
    items = [value] if isinstance(value, (str, bytes)) else list(value)
    out = []
    for v in items:
        word = str(v).strip().upper()
        if word:
            out.append(word if word in vocabulary else "other")
    return out or None


def _mm(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return round(x, 4) if math.isfinite(x) and x > 0 else None


def technical_fields(ds) -> dict:
    """A pydicom dataset (header read with TAGS) -> the fields above, values from their vocabularies only."""
    acquisition = _words(ds.get("MRAcquisitionType"), _ACQUISITION)
    agent = ds.get("ContrastBolusAgent")
    agent_seq = ds.get("ContrastBolusAgentSequence")
    return {
        "modality": "MR",  # any other modality is refused before this is read (dicom_files.read_header)
        "mr_acquisition_type": acquisition[0] if acquisition else None,
        "scanning_sequence": _words(ds.get("ScanningSequence"), _SEQUENCE),
        "sequence_variant": _words(ds.get("SequenceVariant"), _VARIANT),
        "image_type": _words(ds.get("ImageType"), _IMAGE_TYPE),
        "slice_thickness_mm": _mm(ds.get("SliceThickness")),
        "spacing_between_slices_mm": _mm(ds.get("SpacingBetweenSlices")),
        "contrast_agent": bool((agent is not None and str(agent).strip()) or (agent_seq is not None and len(agent_seq))),
    }

"""The training data's envelope: where each input check draws its line, and why (docs/inputs/qc.md).

What the model saw (REFERENCE section 6; the published training lists of github Qybc/MedBLIP,
`run_medblip_pretrain.py`): OASIS-1 `orig` (the raw scan, 256^3 voxels of 1 mm), `norm` (the same,
skull-stripped and bias-corrected by FreeSurfer), `aligned_orig` and `aligned_norm` (affinely resampled to
FreeSurfer's Talairach space and cropped to 160 x 192 x 224 voxels of 1 mm), as distributed by the
neurite-oasis release; research 3D T1-weighted volumes. So: voxels of 1 mm in every axis, fields of view of
160 to 256 mm per axis, 160 to 256 voxels per axis, and a loader resize that keeps the physical aspect
(isotropic voxels). The preprocessing of the other datasets the paper names (ADNI, NACC) is not documented.
"""

from __future__ import annotations

# Training: 1 mm in every axis, ratio 1.0. 10 % allows rounding in headers and the 1.0 x 1.0 x 1.0x mm of
# vendor 3D T1 protocols; a 1 x 1 x 1.2 mm volume (the example) is past it.
MAX_ANISOTROPY = 1.1
# Training: the loader's resize kept the aspect of 256^3 and 160 x 192 x 224 volumes to within 0.5 % (integer
# truncation of the resized size). 5 % is ten times that.
MAX_ASPECT_DISTORTION = 1.05
# Training voxels are 1 mm. Past 1.5 mm an axis has at most two thirds of the training resolution.
MAX_SPACING_MM = 1.5
# Training fields of view: 160 mm (the aligned crop's smallest axis) to 256 mm. 80 % of the smallest one.
MIN_FIELD_OF_VIEW_MM = 128.0
# Training volumes have 160 to 256 voxels per axis. Fewer than 100 along an axis: under two thirds of that.
MIN_SLICES = 100
# DICOM: SpacingBetweenSlices (or the measured slice gap) beyond SliceThickness by more than 10 %: gaps
# between slices that no training volume had (a 3D acquisition has contiguous or overlapping partitions).
MAX_GAP_RATIO = 1.1

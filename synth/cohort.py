"""Write a labelled synthetic cohort: NIfTI scans, planted-region masks and a cohort CSV.

Each subject is the MNI T1 template with its lateral ventricles enlarged by a class-dependent amount
(AD strong, MCI mild, NC none or barely), moved by a small random rigid/scale jitter, resampled to a
2 mm grid, given an intensity scale, a smooth bias field and noise. The patient text (age, sex, MMSE)
carries a weaker signal whose ranges overlap between classes. Everything is a function of
(seed, subject index): subject i is the same whatever the cohort's size.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .template import load_template

CLASSES = ("AD", "MCI", "NC")
# Ventricle enlargement (mm of dilation) per class: inclusive ranges.
DILATION_MM = {"AD": (10, 12), "MCI": (5, 6), "NC": (0, 1)}
# Patient text: (mean, sd) per class; the ranges overlap on purpose.
AGE = {"AD": (76.0, 6.0), "MCI": (74.0, 6.0), "NC": (72.0, 6.0)}
MMSE = {"AD": (22.0, 3.5), "MCI": (25.5, 2.5), "NC": (28.0, 1.8)}
VOXEL_MM = 2.0
# The jitter is small on purpose: at the published model's 7x7x7 tokens the planted region touches a few
# tokens of 343, while a ±3 mm / ±3° jitter changes every token of every scan (tests/official/README.md,
# "Training status").
ROTATION_DEG = 1.0
SHIFT_MM = 1.0
SCALE = 0.01
NOISE = (2.0, 6.0)          # Gaussian noise sd, template units (0..255)
BIAS = 0.15                 # bias field amplitude (multiplicative, log-linear + quadratic)
VARIANTS = ("anatomy", "noise")
CSV_COLUMNS = ("scan", "label", "patient_text", "mask", "sex", "age", "age_band", "mmse", "site", "dilation_mm")


@dataclass(frozen=True)
class Subject:
    name: str
    label: str
    sex: str
    age: int
    mmse: int
    site: str
    dilation_mm: int

    @property
    def patient_text(self) -> str:
        return f"The subject is a {self.age} year old {self.sex}. MMSE {self.mmse}. "

    @property
    def age_band(self) -> str:
        return "<70" if self.age < 70 else ("70-79" if self.age < 80 else ">=80")


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def subject(seed: int, index: int) -> Subject:
    """The subject's label and patient data (stream 0 of its generator)."""
    rng = _rng(seed, index, 0)
    label = CLASSES[index % len(CLASSES)]
    lo, hi = DILATION_MM[label]
    age = int(np.clip(round(rng.normal(*AGE[label])), 55, 95))
    mmse = int(np.clip(round(rng.normal(*MMSE[label])), 0, 30))
    return Subject(name=f"s{seed}-{index:04d}", label=label, sex=("female", "male")[rng.integers(2)], age=age,
                   mmse=mmse, site=("A", "B")[rng.integers(2)], dilation_mm=int(rng.integers(lo, hi + 1)))


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    for axis, a in enumerate(angles_rad):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def _output_grid(template) -> tuple[tuple[int, int, int], np.ndarray]:
    shape = tuple(int(np.ceil(n / VOXEL_MM)) for n in template.t1.shape)
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = template.affine[:3, 3]
    return shape, affine


def _sample_coords(rng: np.random.Generator, template, shape, affine) -> np.ndarray:
    """Template voxel coordinates for every output voxel under a random rotation, scale and shift."""
    centre = template.affine[:3, :3] @ (np.array(template.t1.shape) / 2.0) + template.affine[:3, 3]
    rot = _rotation(np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3)))
    zoom = (1 + rng.uniform(-SCALE, SCALE)) * (1 + rng.uniform(-SCALE / 2, SCALE / 2, 3))
    forward = rot @ np.diag(zoom)                     # template world -> subject world, about the centre
    shift = rng.uniform(-SHIFT_MM, SHIFT_MM, 3)
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:]
    src_world = np.linalg.solve(forward, world - (centre + shift)[:, None]) + centre[:, None]
    src = np.linalg.solve(template.affine[:3, :3], src_world - template.affine[:3, 3:])
    return src.reshape((3,) + tuple(shape))


def _bias_field(rng: np.random.Generator, shape) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    log = sum(rng.uniform(-BIAS, BIAS) * g + rng.uniform(-BIAS, BIAS) * (g * g - 1 / 3) for g in grids)
    return np.exp(log).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _anatomy(dilation_mm: int) -> np.ndarray:
    return load_template().with_ventricles(dilation_mm)


def render(seed: int, index: int, variant: str = "anatomy") -> tuple[Subject, np.ndarray, np.ndarray, np.ndarray]:
    """(subject, int16 volume, uint8 planted-region mask, affine) for subject `index` of cohort `seed`."""
    from scipy import ndimage

    subj = subject(seed, index)
    template = load_template()
    shape, affine = _output_grid(template)
    if variant == "noise":
        rng = _rng(seed, index, 2)
        vol = np.clip(rng.normal(100.0, 40.0, shape), 0, None)
        return subj, np.round(vol).astype(np.int16), np.zeros(shape, np.uint8), affine
    if variant != "anatomy":
        raise ValueError(f"variant must be one of {VARIANTS}")
    rng = _rng(seed, index, 1)
    coords = _sample_coords(rng, template, shape, affine)
    vol = ndimage.map_coordinates(_anatomy(subj.dilation_mm), coords, order=1, mode="constant", cval=0.0)
    mask = ndimage.map_coordinates(template.region.astype(np.float32), coords, order=1, mode="constant") >= 0.5
    vol = vol * rng.uniform(0.85, 1.15) * _bias_field(rng, shape)
    vol = np.clip(vol + rng.normal(0.0, rng.uniform(*NOISE), shape), 0, None)
    return subj, np.round(vol).astype(np.int16), mask.astype(np.uint8), affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def make_cohort(out: Path, n: int, seed: int, variant: str = "anatomy", start: int = 0, progress=None) -> Path:
    """Write subjects start..start+n-1 of cohort `seed` under `out`; returns out/cohort.csv."""
    out = Path(out)
    (out / "scans").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        subj, vol, mask, affine = render(seed, i, variant)
        scan = Path("scans") / f"{subj.name}.nii.gz"
        mask_path = Path("masks") / f"{subj.name}.mask.nii.gz"
        _save(out / scan, vol, affine)
        _save(out / mask_path, mask, affine)
        rec = asdict(subj)
        rows.append({"scan": scan.as_posix(), "label": subj.label, "patient_text": subj.patient_text,
                     "mask": mask_path.as_posix(), "sex": subj.sex, "age": subj.age, "age_band": subj.age_band,
                     "mmse": subj.mmse, "site": subj.site, "dilation_mm": rec["dilation_mm"]})
        if progress:
            progress(i - start + 1, n)
    csv_path = out / "cohort.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return csv_path

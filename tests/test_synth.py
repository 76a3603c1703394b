"""The synthetic known-answer cohort: deterministic, labelled by a planted change that lives inside its mask."""

import csv

import nibabel as nib
import numpy as np
import pytest

from medblip_edge.synth.cohort import CLASSES, make_cohort, render, subject
from medblip_edge.synth.template import MAX_DILATION_MM, load_template


def test_subject_is_a_function_of_seed_and_index():
    assert subject(3, 5) == subject(3, 5)
    assert subject(3, 5) != subject(4, 5)
    assert [subject(0, i).label for i in range(6)] == list(CLASSES) * 2


def test_enlargement_grows_with_dilation_and_stays_in_the_region():
    t = load_template()
    sizes = [int(m.sum()) for m in t.enlarged]
    assert sizes == sorted(sizes) and sizes[-1] > 3 * sizes[0]
    assert len(t.enlarged) == MAX_DILATION_MM + 1
    changed = t.with_ventricles(MAX_DILATION_MM) != t.t1
    assert changed.any() and not (changed & ~t.region).any()


def test_render_is_deterministic_and_the_mask_marks_the_change():
    a = render(11, 0)          # AD: strong enlargement
    b = render(11, 0)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    subj, vol, mask, affine = a
    assert subj.label == "AD" and vol.dtype == np.int16 and mask.dtype == np.uint8
    assert vol.shape == mask.shape and 1000 < mask.sum() < 0.05 * mask.size
    # the planted CSF is darker than the tissue around the region
    ring = np.zeros_like(mask, bool)
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    ring[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    assert vol[mask > 0].mean() < vol[ring & (mask == 0)].mean()


def test_classes_differ_by_the_dark_volume_inside_the_region():
    dark = {}
    for i in range(6):
        subj, vol, mask, _ = render(5, i)
        inside = vol[mask > 0]
        dark.setdefault(subj.label, []).append(float((inside < 0.6 * np.percentile(vol[vol > 0], 75)).mean()))
    assert min(dark["AD"]) > max(dark["MCI"]) > 0 and min(dark["MCI"]) > max(dark["NC"])


def test_make_cohort_writes_scans_masks_and_csv(tmp_path):
    path = make_cohort(tmp_path, 3, seed=2, start=4)
    rows = list(csv.DictReader(open(path)))
    assert [r["label"] for r in rows] == ["MCI", "NC", "AD"]
    for r in rows:
        img, m = nib.load(tmp_path / r["scan"]), nib.load(tmp_path / r["mask"])
        assert img.shape == m.shape and np.allclose(img.affine, m.affine)
        assert r["patient_text"].startswith("The subject is a ") and "MMSE" in r["patient_text"]


@pytest.mark.parametrize("variant", ["noise"])
def test_noise_variant_has_no_anatomy(variant):
    subj, vol, mask, _ = render(1, 0, variant)
    assert mask.sum() == 0 and vol.std() > 10

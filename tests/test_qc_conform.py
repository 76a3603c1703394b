"""The conform step against SimpleITK: resampling to 1 mm (Resample, identity transform, linear) and reorienting
(DICOMOrient), array and geometry; spec parsing; what the loader then sees."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medblip_edge.errors import MedblipError
from medblip_edge.preprocess import load_scan
from medblip_edge.qc.conform import ConformSpec, conform
from volumes import real_volume

sitk = pytest.importorskip("SimpleITK")


@pytest.mark.parametrize("text, mm, orient, shown", [
    ("iso1mm", 1.0, None, "iso1mm"), ("ISO1mm,lia", 1.0, "LIA", "iso1mm,LIA"), (" iso1.5mm , RAS", 1.5, "RAS",
                                                                               "iso1.5mm,RAS"),
    ("none", None, None, "none"), (None, None, None, "none")])
def test_spec_parses(text, mm, orient, shown):
    spec = ConformSpec.parse(text)
    assert (spec.mm, spec.orientation, str(spec)) == (mm, orient, shown)
    assert ConformSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["iso", "1mm", "iso1mm,LLA", "iso1mm,LIAX", "iso1mm,LIA,RAS", "iso0mm", "LIA"])
def test_bad_specs_are_one_line_errors(text):
    with pytest.raises(MedblipError) as e:
        ConformSpec.parse(text)
    assert e.value.code == "bad_conform"


@pytest.fixture(scope="module")
def oblique_aniso(tmp_path_factory):
    """A crop of the MNI template written with 0.9 x 1.3 x 2.5 mm voxels and a rotated, flipped affine."""
    path = real_volume("mni_t1")
    if path is None:
        pytest.skip("nilearn's MNI152 T1 template is not installed")
    data = np.asarray(nib.load(path).dataobj)[40:150:1, 50:170:1, 40:150:2].astype(np.int16)
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([-1.0, 1.0, 1.0])  # oblique, x flipped
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.9, 1.3, 2.5])
    affine[:3, 3] = [12.0, -30.0, 7.5]
    out = tmp_path_factory.mktemp("conform") / "oblique.nii.gz"
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, out)
    return out


def _sitk_resampled(path, mm: float):
    img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    size = [int(np.floor((n - 1) * s / mm + 1e-6)) + 1 for n, s in zip(img.GetSize(), img.GetSpacing())]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (mm, mm, mm),
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


@pytest.mark.parametrize("mm", [1.0, 1.5])
def test_resampling_matches_simpleitk(oblique_aniso, mm):
    vol = load_scan(oblique_aniso)
    array, geo = conform(vol.array, vol.geometry, ConformSpec(mm))
    want = _sitk_resampled(oblique_aniso, mm)
    ref = sitk.GetArrayFromImage(want)
    assert array.shape == ref.shape and array.dtype == np.float32
    np.testing.assert_allclose(array, ref, rtol=0, atol=1e-3 * float(np.ptp(ref)))
    np.testing.assert_allclose(geo.spacing, want.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(geo.origin, want.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(geo.direction, want.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("target", ["LIA", "RAS", "LPS", "SPL"])
def test_reorienting_matches_simpleitk(oblique_aniso, target):
    vol = load_scan(oblique_aniso)
    array, geo = conform(vol.array, vol.geometry, ConformSpec(1.0, target))
    want = sitk.DICOMOrient(_sitk_resampled(oblique_aniso, 1.0), target)
    assert geo.orientation == target
    np.testing.assert_allclose(array, sitk.GetArrayFromImage(want), rtol=0, atol=1e-3 * float(np.ptp(array)))
    np.testing.assert_allclose(geo.origin, want.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(geo.direction, want.GetDirection(), atol=1e-6)


def test_conform_puts_a_permuted_scan_back(tmp_path):
    """The same brain stored with its axes permuted and flipped: conformed to one orientation, the arrays agree."""
    path = real_volume("mni_t1")
    if path is None:
        pytest.skip("nilearn's MNI152 T1 template is not installed")
    img = nib.load(path)
    o = nib.orientations
    moved = img.as_reoriented(o.ornt_transform(o.axcodes2ornt(("R", "A", "S")), o.axcodes2ornt(("S", "L", "P"))))
    nib.save(moved, tmp_path / "moved.nii.gz")
    a, b = load_scan(path), load_scan(tmp_path / "moved.nii.gz")
    assert a.orientation == "RAS" and b.orientation == "SLP" and a.array.shape != b.array.shape
    spec = ConformSpec(1.0, "LIA")
    (xa, ga), (xb, gb) = conform(a.array, a.geometry, spec), conform(b.array, b.geometry, spec)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_allclose(ga.origin, gb.origin, atol=1e-4)


def test_isotropic_1mm_is_left_alone():
    vol = load_scan(real_volume("mni_t1") or pytest.skip("no MNI template"))
    array, geo = conform(vol.array, vol.geometry, ConformSpec(1.0))
    assert array is vol.array and geo == vol.geometry

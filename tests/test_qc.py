"""Input checks: each warning code on files that trigger it and on files that must not, NIfTI and DICOM.

The files are the real MNI T1 template (nilearn's wheel), nibabel's anatomical.nii, and variants of the
template written here: a header that claims other voxel sizes, every third slice kept, a crop; DICOM series
written from the template with SimpleITK (tests/dicom_fixtures.py), tags set per variant.
"""

from __future__ import annotations

import csv
import json
import subprocess

import nibabel as nib
import numpy as np
import pytest

import dicom_fixtures as fx
from medblip_edge.errors import ScanError
from medblip_edge.preprocess import PreprocessSpec
from medblip_edge.qc import CODES, QcOptions
from medblip_edge.qc.checks import aspect_distortion
from medblip_edge.qc.conform import ConformSpec
from medblip_edge.runtime.pipeline import read_scan
from volumes import real_volume

sitk = pytest.importorskip("SimpleITK")
SPEC = PreprocessSpec(size=224)
DICOM_CODES = {"not_3d_acquisition", "derived_image", "localizer", "contrast_enhanced", "slice_gaps"}
AGENT = "Gadovist-Lot-A1234"  # a contrast agent's name: never copied into a row


def _mni() -> nib.Nifti1Image:
    path = real_volume("mni_t1")
    if path is None:
        pytest.skip("nilearn's MNI152 T1 template is not installed")
    return nib.load(path)


def _save(data, zooms, path):
    img = nib.Nifti1Image(np.asarray(data), np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def nifti(tmp_path_factory) -> dict:
    """name -> a NIfTI file. The template's data with headers that put it outside the training envelope one check
    at a time (as far as the checks allow: anisotropy always distorts the loader's aspect)."""
    d = tmp_path_factory.mktemp("qc-nifti")
    mni = _mni()
    data = np.asarray(mni.dataobj)
    half = data[::2, ::2, ::2]  # 99 x 117 x 95
    anat = real_volume("anatomical")
    if anat is None:
        pytest.skip("nibabel's anatomical.nii is not installed")
    return {
        "mni": real_volume("mni_t1"),
        "anatomical": anat,
        "aniso_1.2": _save(data, (1.0, 1.0, 1.2), d / "aniso.nii.gz"),  # 1 x 1 x 1.2 mm
        "thick_3mm": _save(data[:, :, ::3], (1.0, 1.0, 3.0), d / "thick.nii.gz"),
        "coarse_1.6": _save(data, (1.6, 1.6, 1.6), d / "coarse.nii.gz"),
        "crop_120": _save(data[:120], (1.0, 1.0, 1.0), d / "crop.nii.gz"),  # 120 mm left-right
        "few_1.4": _save(half, (1.4, 1.4, 1.4), d / "few.nii.gz"),  # 95 voxels, 133 mm
    }


def codes(path, conform: str | None = None, strict: bool = False) -> list[str]:
    prepared = read_scan(path, SPEC, "0" * 64, qc=QcOptions(ConformSpec.parse(conform), "option", strict))
    assert set(c for c in prepared.warnings if c in CODES) == set(prepared.qc["checks"])
    return [w for w in prepared.warnings if w in CODES]


# name -> the codes the file must get, exactly
NIFTI_EXPECTED = {
    "mni": [],
    "aniso_1.2": ["anisotropic_voxels", "aspect_distorted"],
    "thick_3mm": ["anisotropic_voxels", "aspect_distorted", "thick_slices", "few_slices"],
    "coarse_1.6": ["coarse_voxels"],
    "crop_120": ["small_field_of_view"],
    "few_1.4": ["few_slices"],
    # its header: 2 mm voxels over 66 x 82 x 50 mm, truly outside the training data's envelope there,
    # but isotropic: no geometry code
    "anatomical": ["coarse_voxels", "small_field_of_view", "few_slices"],
}


@pytest.mark.parametrize("name", NIFTI_EXPECTED)
def test_nifti_codes(nifti, name):
    assert codes(nifti[name]) == NIFTI_EXPECTED[name]


def test_every_nifti_code_has_a_file_that_triggers_it_and_real_ones_that_do_not():
    triggered = {c for v in NIFTI_EXPECTED.values() for c in v}
    assert triggered == set(CODES) - DICOM_CODES - {"unknown_spacing", "out_of_distribution"}
    for code in triggered:  # the real T1 template triggers none; anatomical.nii none of the geometry ones
        assert code not in NIFTI_EXPECTED["mni"]
    assert not {"anisotropic_voxels", "aspect_distorted", "thick_slices"} & set(NIFTI_EXPECTED["anatomical"])


def test_conform_clears_the_geometry_codes_not_the_resolution_ones(nifti):
    assert codes(nifti["aniso_1.2"], "iso1mm") == []
    assert codes(nifti["thick_3mm"], "iso1mm") == ["thick_slices", "few_slices"]
    assert codes(nifti["mni"], "iso1mm,LIA") == []


def test_qc_block_figures(nifti):
    qc = read_scan(nifti["thick_3mm"], SPEC, "0" * 64).qc
    assert qc["shape"] == [197, 233, 63] and qc["spacing_mm"] == [1.0, 1.0, 3.0]
    assert qc["field_of_view_mm"] == [197.0, 233.0, 189.0] and qc["anisotropy"] == 3.0
    assert qc["orientation"] == "RAS"
    # loader: 233 -> 224 voxels for 232 mm, 63 -> int(224 * 63 / 233) = 60 voxels for 186 mm
    mm = [196 / (int(224 * 197 / 233) - 1), 232 / 223, 186 / (int(224 * 63 / 233) - 1)]
    assert qc["aspect_distortion"] == pytest.approx([m / min(mm) for m in mm], abs=1e-4)
    assert qc["input_fill"] == pytest.approx(int(224 * 197 / 233) * 224 * int(224 * 63 / 233) / 224**3, abs=1e-4)
    data = np.asarray(nib.load(nifti["thick_3mm"]).dataobj).astype(np.float64)
    assert qc["intensity"]["max"] == data.max() and qc["intensity"]["min"] == data.min()
    assert qc["intensity"]["p50"] == pytest.approx(np.percentile(data, 50), abs=1.0)
    assert 0 < qc["intensity"]["foreground_fraction"] < 1


def test_aspect_distortion_is_one_for_the_training_shapes():
    for shape in ((256, 256, 256), (160, 192, 224)):
        assert max(aspect_distortion(shape, (1.0, 1.0, 1.0), 224)) < 1.005
    assert max(aspect_distortion((256, 256, 256), (1.0, 1.0, 1.2), 224)) == pytest.approx(1.2, abs=1e-3)


def test_strict_qc_makes_a_warning_an_error(nifti):
    assert codes(nifti["mni"], strict=True) == []
    with pytest.raises(ScanError) as e:
        codes(nifti["aniso_1.2"], strict=True)
    assert e.value.code == "qc_failed" and "anisotropic_voxels" in str(e.value)


# ---------------------------------------------------------------- DICOM

# variant -> (tags on every slice, image transform, the codes it must get exactly)
DICOM_VARIANTS = {
    "clean": ({"0018|0023": "3D"}, None, []),
    "two_d": ({"0018|0023": "2D"}, None, ["not_3d_acquisition"]),
    "derived": ({"0008|0008": "DERIVED\\SECONDARY\\MPR"}, None, ["derived_image"]),
    "localizer": ({"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"}, None, ["localizer"]),
    "contrast": ({"0018|0010": AGENT}, None, ["contrast_enhanced"]),
    "gaps": ({"0018|0050": "0.5"}, None, ["slice_gaps"]),  # 0.5 mm thick, 1 mm apart
    "thick_tag": ({"0018|0050": "3"}, None, ["thick_slices"]),  # said 3 mm thick (overlapping), 1 mm apart
    "thick_3mm": ({"0018|0023": "2D"}, (1, 1, 3), ["anisotropic_voxels", "aspect_distorted", "thick_slices",
                                                    "few_slices", "not_3d_acquisition"]),
}


@pytest.fixture(scope="module")
def dicom(tmp_path_factory) -> dict:
    path = real_volume("mni_t1")
    if path is None:
        pytest.skip("nilearn's MNI152 T1 template is not installed")
    d = tmp_path_factory.mktemp("qc-dicom")
    img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkInt16)
    out = {}
    for name, (tags, shrink, _) in DICOM_VARIANTS.items():
        src = sitk.Shrink(img, list(shrink)) if shrink else img
        tags = {"0018|0050": f"{src.GetSpacing()[2]:g}", **tags}
        out[name] = fx.write_series(src, d / name, tags=tags)
    return out


@pytest.mark.parametrize("name", DICOM_VARIANTS)
def test_dicom_codes(dicom, name):
    assert codes(dicom[name]) == DICOM_VARIANTS[name][2]


def test_every_dicom_code_has_a_series_that_triggers_it():
    assert {c for v in DICOM_VARIANTS.values() for c in v[2]} >= DICOM_CODES


def test_dicom_technical_fields_and_privacy(dicom):
    prepared = read_scan(dicom["contrast"], SPEC, "0" * 64)
    tech = prepared.qc["dicom"]
    assert tech == {"modality": "MR", "mr_acquisition_type": None, "scanning_sequence": None,
                    "sequence_variant": None, "image_type": ["ORIGINAL", "PRIMARY", "M", "ND"],
                    "slice_thickness_mm": 1.0, "spacing_between_slices_mm": 1.0, "contrast_agent": True,
                    "slice_count": 189}
    text = json.dumps(prepared.qc) + json.dumps(prepared.warnings)
    for secret in (AGENT, "Gadovist", fx.STUDY_UID, fx.FRAME_OF_REFERENCE, "20240102"):
        assert secret not in text


def test_free_text_in_a_coded_field_never_reaches_a_row(dicom, tmp_path):
    odd = fx.copy_series(dicom["clean"], tmp_path / "odd")
    for f in fx.files(odd):
        fx.edit(f, ImageType=["ORIGINAL", "PRIMARY", "DOE JANE"], ScanningSequence=["GR", "DR ROE"],
                SequenceVariant="SP", MRAcquisitionType="3D")
    tech = read_scan(odd, SPEC, "0" * 64).qc["dicom"]
    assert tech["image_type"] == ["ORIGINAL", "PRIMARY", "other"]
    assert tech["scanning_sequence"] == ["GR", "other"] and tech["sequence_variant"] == ["SP"]
    assert "DOE" not in json.dumps(tech) and "ROE" not in json.dumps(tech)


def test_dicom_and_nifti_of_one_volume_get_the_same_geometry_figures(dicom, nifti):
    a, b = read_scan(dicom["clean"], SPEC, "0" * 64).qc, read_scan(nifti["mni"], SPEC, "0" * 64).qc
    for key in ("shape", "spacing_mm", "field_of_view_mm", "anisotropy", "aspect_distortion", "input_fill"):
        assert a[key] == b[key], key


def test_csv_cells_of_the_qc_fields(nifti, tmp_path):
    """--out rows.csv: conform and ood in their own columns, the qc block as one JSON cell, read back by --resume."""
    from medblip_edge.runtime.results_io import FileSink, read_old_rows

    prepared = read_scan(nifti["aniso_1.2"], SPEC, "0" * 64)
    row = {"scan": prepared.name, "scan_sha256": prepared.sha256, "warnings": prepared.warnings,
           "conform": prepared.conform, "qc": prepared.qc, "ood": {"distance": 3.5, "percentile": 41.0}}
    sink = FileSink(tmp_path / "rows.csv", "csv", False)
    sink.open_append()
    sink.write_text(sink.header())
    sink.emit(row)
    sink.close()
    old, _ = read_old_rows(sink)
    rec = next(csv.DictReader((tmp_path / "rows.csv").open()))
    assert rec["conform_spec"] == "none" and rec["conform_from"] == "default"
    assert rec["ood_distance"] == "3.5" and rec["ood_percentile"] == "41.0"
    assert json.loads(rec["qc"]) == prepared.qc and rec["warnings"] == "anisotropic_voxels; aspect_distorted"
    assert len(old) == 1 and old[0].name == prepared.name


@pytest.mark.slow
def test_strict_qc_through_the_real_command(nifti, tiny_bundle, infer_cmd, tmp_path):
    out = tmp_path / "rows.jsonl"
    run = subprocess.run(infer_cmd + [str(nifti["mni"]), str(nifti["aniso_1.2"]), "--bundle", str(tiny_bundle),
                                      "--strict-qc", "--out", str(out), "--no-huge-pages"], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr  # one scan failed, the run went on
    ok, bad = [json.loads(line) for line in out.read_text().splitlines()]
    assert ok["warnings"] == [] and ok["conform"] == {"spec": "none", "from": "default"}
    assert bad["error"]["code"] == "qc_failed"
    assert bad["error"]["message"] == "input checks failed (--strict-qc): anisotropic_voxels, aspect_distorted"

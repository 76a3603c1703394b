"""DICOM series in: the volume equals SimpleITK's series read value for value, strict errors where it guesses.

The oracle is `sitk.ReadImage(GetGDCMSeriesFileNames(folder))` (tests/dicom_fixtures.py):
every fixture, each transfer syntax, the multi-frame file (against the single-frame series
it was made from), and the real headers in pydicom's and nibabel's wheels.
"""

from __future__ import annotations

import locale
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import dicom_fixtures as fx
from medblip_edge.errors import ScanError
from medblip_edge.preprocess import load_scan, load_volume, open_scan, to_model_input
from medblip_edge.preprocess.dicom import _stack, load_dicom, load_series, only_series
from medblip_edge.preprocess.dicom_files import read_header
from medblip_edge.preprocess.dicom_series import find_series

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("highdicom")

LOCALE_AT_IMPORT = locale.setlocale(locale.LC_ALL)
SYNTAXES = {  # fixture name -> transfer syntax UID it must be stored in
    "int16": "1.2.840.10008.1.2",
    "rescaled": "1.2.840.10008.1.2",
    "rescaled_int": "1.2.840.10008.1.2",
    "rescaled_classic": "1.2.840.10008.1.2",
    "jpeg_lossless": "1.2.840.10008.1.2.4.70",
    "j2k_lossless": "1.2.840.10008.1.2.4.90",
    "j2k_lossy": "1.2.840.10008.1.2.4.91",
    "jpegls_lossless": "1.2.840.10008.1.2.4.80",
    "jpegls_near": "1.2.840.10008.1.2.4.81",
    "rle": "1.2.840.10008.1.2.5",
}
REAL_HEADERS = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm"]


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict[str, Path]:
    """Every good fixture series: name -> folder (or file, for the multi-frame one)."""
    root = tmp_path_factory.mktemp("dicom")
    try:
        img = fx.marked_mni()
        good = fx.write_series(img, root / "int16")
        out = {"int16": good,
               "rescaled": fx.write_series(img, root / "rescaled", rescale=(2.5, -100.0)),  # SimpleITK: float64
               "rescaled_int": fx.write_series(img, root / "rescaled_int", rescale=(2.0, -1024.0)),  # int32
               "rescaled_classic": fx.with_rescale(good, root / "rescaled_classic", "2.5", "-100"),
               "jpeg_lossless": fx.write_series(img, root / "jpeg_lossless", compressor="JPEG"),
               "j2k_lossless": fx.write_series(img, root / "j2k_lossless", compressor="JPEG2000"),
               "j2k_lossy": fx.transcode(good, root / "j2k_lossy", SYNTAXES["j2k_lossy"]),
               "jpegls_lossless": fx.transcode(good, root / "jpegls_lossless", SYNTAXES["jpegls_lossless"]),
               "jpegls_near": fx.transcode(good, root / "jpegls_near", SYNTAXES["jpegls_near"], jls_error=2),
               "rle": fx.transcode(good, root / "rle", SYNTAXES["rle"]),
               "enhanced": fx.multiframe(good, root / "enhanced" / "enhanced.dcm")}
        for name in REAL_HEADERS:
            out[name] = fx.from_pydicom_file(name, root / name.removesuffix(".dcm"))
    except fx.Missing as e:
        pytest.skip(f"{e} is not installed")
    return out


def test_writing_fixtures_leaves_the_locale_alone(series):
    """SimpleITK's DICOM writer sets the C locale process-wide (later open() calls would read text as ASCII)."""
    assert locale.setlocale(locale.LC_ALL) == LOCALE_AT_IMPORT


def assert_geometry_as_sitk(vol, img) -> None:
    g = vol.geometry
    assert np.allclose(g.origin, img.GetOrigin(), atol=1e-4)
    assert np.allclose(g.spacing, img.GetSpacing(), rtol=1e-5)
    assert np.allclose(g.direction, img.GetDirection(), atol=1e-6)
    assert vol.orientation == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())


# ---------------------------------------------------------------- values: equal to SimpleITK's series read


@pytest.mark.parametrize("name", list(SYNTAXES) + REAL_HEADERS)
def test_series_equals_simpleitk(series, name):
    import pydicom

    folder = series[name]
    if name in SYNTAXES:
        assert {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for f in fx.files(folder)} == {SYNTAXES[name]}
    vol = load_dicom(folder)
    ref, img = fx.sitk_series(folder)
    assert vol.array.dtype == np.float32 and vol.array.shape == ref.shape
    assert np.array_equal(vol.array, ref)
    assert_geometry_as_sitk(vol, img)
    assert vol.series is not None and len(vol.series) == 12


@pytest.mark.parametrize("name, sop_class", [("rescaled", "1.2.840.10008.5.1.4.1.1.4.1"),  # functional groups
                                             ("rescaled_classic", "1.2.840.10008.5.1.4.1.1.4")])  # top-level tags
def test_rescale_is_applied(series, name, sop_class):
    import pydicom

    assert pydicom.dcmread(fx.files(series[name])[0], stop_before_pixels=True).SOPClassUID == sop_class
    stored, rescaled = load_dicom(series["int16"]).array, load_dicom(series[name]).array
    assert np.array_equal(rescaled, (stored.astype(np.float64) * 2.5 - 100).astype(np.float32))
    assert fx.sitk_series(series[name])[1].GetPixelID() == sitk.sitkFloat64


def test_malformed_rescale_is_refused_not_guessed(series, tmp_path):
    folder = fx.copy_series(series["rescaled_classic"], tmp_path / "bad_slope")
    fx.edit(fx.files(folder)[4], RescaleSlope="2.5\\3")
    with pytest.raises(ScanError) as e:
        load_dicom(folder)
    assert e.value.code == "bad_header"


def test_lossy_syntaxes_really_are_lossy(series):
    good = load_dicom(series["int16"]).array
    for name in ("j2k_lossy", "jpegls_near"):
        assert not np.array_equal(load_dicom(series[name]).array, good), name


def test_model_input_is_the_training_input_of_simpleitks_array(series):
    from test_preprocess import training_input

    for name in ("int16", "rescaled", "rescaled_classic", "enhanced"):
        ref = fx.sitk_series(series["int16" if name == "enhanced" else name])[0]
        vol = load_scan(series[name])
        assert torch_equal(to_model_input(vol.array, 96), training_input(ref.astype(float), 96)), name


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_same_scan_as_nifti_and_as_dicom_gives_the_same_input(series, tmp_path):
    """The series was written from the marked template: read back it is that image, voxel for voxel and in the same
    orientation as the NIfTI of it, so the model sees the same input either way."""
    img = fx.marked_mni()
    sitk.WriteImage(img, str(tmp_path / "marked.nii.gz"))
    nifti, dicom = load_volume(tmp_path / "marked.nii.gz"), load_dicom(series["int16"])
    assert np.array_equal(dicom.array, nifti.array) and dicom.orientation == nifti.orientation == "RAS"
    assert np.array_equal(dicom.array, sitk.GetArrayFromImage(img).astype(np.float32))
    marker = np.argwhere(dicom.array == fx.MARKER)
    assert marker.min(axis=0).tolist() == [30, 38, 6]  # not mirrored along any axis


# ---------------------------------------------------------------- multi-frame


def test_multiframe_is_ordered_by_position_not_storage(series):
    import pydicom

    ds = pydicom.dcmread(series["enhanced"], stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.4" and int(ds.NumberOfFrames) == 47
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert z != sorted(z)  # stored shuffled
    vol = load_dicom(series["enhanced"])
    ref, img = fx.sitk_series(series["int16"])  # the same frames as single files
    assert np.array_equal(vol.array, ref)
    assert_geometry_as_sitk(vol, img)


def test_enhanced_mr_real_header(tmp_path):
    """nibabel's Philips Enhanced MR header (176 oblique sagittal frames): the same geometry SimpleITK reads; its
    pixels are all zero, which is refused."""
    try:
        path = fx.philips_mprage(tmp_path / "philips.dcm")
    except fx.Missing as e:
        pytest.skip(str(e))
    header, frames = read_header(path, 0, "the file")
    assert (header.rows, header.cols, header.frames, len(frames)) == (256, 256, 176, 176)
    assert {f.slope for f in frames} == {2.1079365079365}
    _, geometry = _stack(frames, [header])
    img = sitk.ReadImage(str(path))
    assert np.allclose(geometry.origin, img.GetOrigin(), atol=1e-6)
    assert np.allclose(geometry.direction, img.GetDirection(), atol=1e-6)
    assert np.allclose(geometry.spacing, img.GetSpacing(), rtol=1e-5)
    assert geometry.orientation == "PIR"
    with pytest.raises(ScanError) as e:
        load_dicom(path)
    assert e.value.code == "constant_volume"


# ---------------------------------------------------------------- strict where SimpleITK guesses or warns


def _broken(series, tmp_path, kind: str) -> Path:
    good, dst = series["int16"], tmp_path / kind
    if kind == "two_series":
        other = fx.write_series(fx.marked_mni()[:, :, 10:20], tmp_path / "other")
        return fx.two_series(good, other, dst)
    if kind == "corrupt":
        return fx.corrupt_fragments(series["j2k_lossless"], dst)
    return {"gap": fx.delete_slice, "duplicate": fx.duplicate_slice, "reoriented": fx.reorient_slice,
            "respaced": fx.respace_slice, "no_position": fx.drop_position, "truncated": fx.truncate_last}[kind](good, dst)


@pytest.mark.parametrize("kind, code", [
    ("gap", "slice_gap"), ("duplicate", "duplicate_slices"), ("reoriented", "mixed_orientation"),
    ("respaced", "mixed_geometry"), ("no_position", "missing_geometry"), ("two_series", "several_series"),
    ("truncated", "truncated"), ("corrupt", "corrupt_pixel_data"),
])
def test_broken_series(series, tmp_path, kind, code):
    folder = _broken(series, tmp_path, kind)
    with pytest.raises(ScanError) as e:
        load_dicom(folder)
    assert e.value.code == code, str(e.value)
    assert "\n" not in str(e.value)
    if kind not in ("truncated", "corrupt", "two_series", "no_position"):
        fx.sitk_series(folder)  # SimpleITK reads it anyway (with at most a warning)


@pytest.mark.parametrize("rel, code", [
    ("MR_small.dcm", "bad_dims"), ("MR_truncated.dcm", "truncated"),
    ("dicomdirtests/98892003/MR700", "mixed_orientation"),  # a real radial localizer: 7 planes
    ("dicomdirtests/98892003/MR2", "several_series"),  # three series in one folder
    ("dicomdirtests/77654033/CT2", "not_mr"),
])
def test_real_headers_refused(rel, code):
    try:
        path = fx.pydicom_file(rel)
    except fx.Missing as e:
        pytest.skip(str(e))
    with pytest.raises(ScanError) as e:
        load_dicom(path)
    assert e.value.code == code, str(e.value)


def test_simpleitk_silently_takes_the_first_of_several_series():
    """Why several_series is an error: the series reader, given the folder, reads one of the three and says nothing."""
    folder = fx.pydicom_file("dicomdirtests/98892003/MR2")
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) == 3
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))) == 3  # of 7 files


def test_limits_are_decided_before_any_pixel_is_read(series, tmp_path):
    corrupt = fx.corrupt_fragments(series["j2k_lossless"], tmp_path / "corrupt")
    found, _ = only_series(corrupt)
    for limits in ({"max_slices": 40}, {"max_voxels": 47 * 58 * 49 - 1}):
        with pytest.raises(ScanError) as e:
            load_series(found, **limits)
        assert e.value.code == "too_large", limits


@pytest.mark.parametrize("values, code", [
    ({"PixelData": None}, "no_pixel_data"),
    ({"PhotometricInterpretation": "MONOCHROME1"}, "unsupported_dtype"),
    ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "unsupported_dtype"),
    ({"Modality": "CT"}, "not_mr"),
    ({"ImageOrientationPatient": [1, 0, 0, 1, 0, 0]}, "missing_geometry"),  # not perpendicular
])
def test_one_bad_file_fails_the_series(series, tmp_path, values, code):
    folder = fx.copy_series(series["int16"], tmp_path / "series")
    fx.edit(fx.files(folder)[9], **values)
    with pytest.raises(ScanError) as e:
        load_dicom(folder)
    assert e.value.code == code and "file 10 of 47" in str(e.value)


def test_unknown_transfer_syntax(series, tmp_path):
    folder = fx.copy_series(series["int16"], tmp_path / "mpeg")
    import pydicom
    from pydicom.encaps import encapsulate

    f = fx.files(folder)[3]
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists in pydicom
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(f, enforce_file_format=False)
    with pytest.raises(ScanError) as e:
        load_dicom(folder)
    assert e.value.code == "unsupported_transfer_syntax"


def test_compressed_series_without_its_decoder_names_the_extra(series):
    """A Python where GDCM (and pyjpegls) cannot be imported: JPEG lossless has no decoder left."""
    code = (
        "import sys\n"
        "sys.modules['gdcm'] = None; sys.modules['jpeg_ls'] = None\n"
        "from medblip_edge.preprocess import load_scan\n"
        "from medblip_edge.errors import ScanError\n"
        "try:\n"
        f"    load_scan({str(series['jpeg_lossless'])!r})\n"
        "except ScanError as e:\n"
        "    print(e.code, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("missing_decoder ") and "pip install 'medblip-edge[dicom-codecs]'" in out.stdout, \
        out.stdout + out.stderr


# ---------------------------------------------------------------- folders: series, skipped objects, memory


def test_find_series_in_the_real_dicomdir_tree():
    root = fx.pydicom_file("dicomdirtests")
    skipped: Counter = Counter()
    found = find_series(root, skipped)
    assert [s.name for s in found][:3] == ["CR1", "CR2", "CR3"]
    assert sum(s.name == "MR2" for s in found) == 3 and sum(s.name == "MR1" for s in found) == 3
    assert skipped["DICOMDIR"] == 8 and skipped["non-DICOM file"] == 2
    assert all(len(s.uid_hash) == 12 for s in found)


def test_open_scan_chooses_by_name_then_content(series, tmp_path):
    assert type(open_scan(series["int16"])).__name__ == "DicomScan"
    assert type(open_scan(series["enhanced"])).__name__ == "DicomScan"
    (tmp_path / "x.nii.gz").mkdir()
    assert type(open_scan(tmp_path / "x.nii.gz")).__name__ == "NiftiScan"  # fails later as not_a_file
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ScanError) as e:
        load_scan(tmp_path / "notes.txt")
    assert e.value.code == "not_nifti"


def _tiny_series(folder: Path, n: int) -> Path:
    """n single-frame 4x4 MR files at 1 mm steps: written by pydicom from one of the fixture's real headers."""
    import pydicom

    folder.mkdir()
    ds = pydicom.dcmread(fx.pydicom_file("MR_small.dcm"))
    ds.Rows = ds.Columns = 4
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    for k in range(n):
        ds.ImagePositionPatient = [0, 0, k]
        ds.PixelData = np.full(16, k % 100, np.int16).tobytes()
        ds.save_as(folder / f"IM{k:05d}")
    return folder


def _peak_loading(folder: Path) -> int:
    tracemalloc.start()
    try:
        load_dicom(folder)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_folder_of_many_files_is_not_held_in_memory(tmp_path):
    """Peak memory grows by what each slice keeps (its geometry, its pixels in the volume), not by its header: a
    parsed header is ~27 KB of Python objects here (MR_small.dcm), so holding them would be tens of MB per thousand
    files."""
    small, large = _tiny_series(tmp_path / "small", 30), _tiny_series(tmp_path / "large", 120)
    vol = load_dicom(large)
    assert vol.array.shape == (120, 4, 4) and vol.array[7, 0, 0] == 7  # also imports what a first read needs
    per_file = (_peak_loading(large) - _peak_loading(small)) / 90
    assert per_file < 4000, f"{per_file:.0f} bytes of peak memory per extra file"

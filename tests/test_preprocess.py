"""NIfTI preprocessing: bit-exact with MedBLIP's SimpleITK training loader on real volumes; clear errors on bad ones."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medblip_edge.errors import ScanError
from medblip_edge.preprocess import LoadedVolume, PreprocessSpec, load_volume, preprocess_scan, to_model_input
from volumes import real_volume

sitk = pytest.importorskip("SimpleITK")

ACCEPTED_REAL = ["mni_t1", "mni_gm", "mni_wm", "stat_map", "anatomical", "standard", "reoriented", "resampled"]


# ---------------------------------------------------------------- the reference: the training code, with SimpleITK


def sitk_array(path) -> np.ndarray:
    """What the training loader reads: float64 [Z, Y, X]."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(float)


def training_input(arr: np.ndarray, size: int = 224) -> torch.Tensor:
    """MedBLIP's preprocessing written out as the training code does it: [1, 1, size, size, size]."""
    img = torch.FloatTensor(arr)
    img = (img - img.min()) / (img.max() - img.min())
    x, y, z = img.shape
    m = max(x, y, z)
    new = (int(size * x / m), int(size * y / m), int(size * z / m))
    img = F.interpolate(img.unsqueeze(0).unsqueeze(0), size=new, mode="trilinear", align_corners=True)
    out = torch.zeros(1, 1, size, size, size)
    a, b, c = int((size - new[0]) / 2), int((size - new[1]) / 2), int((size - new[2]) / 2)
    out[:, :, a : a + new[0], b : b + new[1], c : c + new[2]] = img
    return out


def assert_as_training(path, *, nonfinite: int = 0, pipeline: bool = True) -> LoadedVolume:
    """load_volume equals SimpleITK's array exactly, and (optionally) the model input equals the training one."""
    vol = load_volume(path)
    ref = sitk_array(path)
    assert vol.array.dtype == np.float32
    assert vol.array.shape == ref.shape
    assert np.array_equal(vol.array, ref.astype(np.float32))
    assert vol.nonfinite_count == nonfinite
    if nonfinite:
        assert f"{nonfinite} non-finite voxels set to 0" in vol.warnings
    if pipeline:
        assert torch.equal(to_model_input(vol.array), training_input(ref))
    return vol


def expect_error(path, code: str, **kwargs) -> ScanError:
    with pytest.raises(ScanError) as ei:
        load_volume(path, **kwargs)
    err = ei.value
    assert err.code == code, f"{err.code}: {err}"
    assert str(err) and "\n" not in str(err) and "\n" not in err.args[0] and "\r" not in err.args[0]
    return err


# ---------------------------------------------------------------- writing test files


def write_nifti(path, data, dtype, *, slope=None, inter=None, version=1, endian="<", gz=False, shape=None):
    """Write `data` (nibabel i,j,k order) raw, unscaled, under a nibabel-made header; returns the path."""
    hdr = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)(endianness=endian)
    hdr.set_data_shape(shape or data.shape)
    hdr.set_data_dtype(dtype)
    if slope is not None:
        hdr["scl_slope"], hdr["scl_inter"] = slope, inter
    buf = io.BytesIO()
    hdr.write_to(buf)  # header and the 4 extension-flag bytes; data follows at vox_offset
    buf.write(np.asarray(data).astype(np.dtype(dtype).newbyteorder(endian)).tobytes(order="F"))
    raw = buf.getvalue()
    Path(path).write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)
    return Path(path)


def raw_bytes(path) -> bytes:
    data = Path(path).read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def need(name: str) -> Path:
    path = real_volume(name)
    if path is None:
        pytest.skip(f"real volume {name} not installed")
    return path


@pytest.fixture(scope="module")
def mni_crop() -> np.ndarray:
    """A real brain block (nibabel order, uint8) from the MNI T1, small enough for many derived files."""
    data = np.asanyarray(nib.load(need("mni_t1")).dataobj)
    return np.ascontiguousarray(data[50:146, 60:172, 40:136])


@pytest.fixture(scope="module")
def anat() -> np.ndarray:
    return np.asanyarray(nib.load(need("anatomical")).dataobj).astype(np.int16)


# ---------------------------------------------------------------- real volumes


@pytest.mark.parametrize("name", ACCEPTED_REAL)
def test_real_volume_matches_training_exactly(name):
    path = need(name)
    vol = assert_as_training(path, nonfinite=153 if name == "resampled" else 0)
    assert vol.shape_on_disk == tuple(reversed(vol.array.shape))


@pytest.mark.parametrize("name", ACCEPTED_REAL)
def test_real_volume_geometry_and_orientation_as_simpleitk(name):
    path = need(name)
    vol, img = load_volume(path), sitk.ReadImage(str(path))
    g = vol.geometry
    assert np.allclose(g.origin, img.GetOrigin(), atol=1e-4) and np.allclose(g.spacing, img.GetSpacing(), rtol=1e-6)
    assert np.allclose(g.direction, img.GetDirection(), atol=1e-6)
    assert vol.orientation == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())


def test_orientation_code_as_simpleitk_on_random_rotations():
    from scipy.spatial.transform import Rotation

    from medblip_edge.preprocess import orientation_code

    for seed in range(300):
        m = Rotation.random(random_state=seed).as_matrix() @ np.diag([1, 1, -1 if seed % 2 else 1])
        d = tuple(m.ravel())
        assert orientation_code(d) == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(d), d


def test_mni_t1_shapes_and_dtype():
    vol = load_volume(need("mni_t1"))
    assert vol.shape_on_disk == (197, 233, 189) and vol.dtype_on_disk == "|u1"
    assert vol.array.shape == (189, 233, 197) and vol.warnings == []
    x, _ = preprocess_scan(need("mni_t1"))
    assert x.shape == (1, 1, 224, 224, 224) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and 0.9 < float(x.max()) <= 1.0  # resampling may miss the brightest voxel


def test_anatomical_is_big_endian_int16():
    vol = load_volume(need("anatomical"))
    assert vol.dtype_on_disk == ">i2"


@pytest.mark.parametrize("name", ["functional", "example4d", "example_nifti2"])
def test_real_multi_volume_4d_is_bad_dims(name):
    err = expect_error(need(name), "bad_dims")
    assert "volumes" in str(err)


def test_real_analyze_and_pair_headers_rejected():
    expect_error(need("analyze_hdr"), "not_nifti")
    expect_error(need("nifti1_pair_hdr"), "unsupported_format")


# ---------------------------------------------------------------- derived from real volumes


def single_volume(src: Path, dst: Path, *, shape, header_cls=nib.Nifti1Header) -> Path:
    """Rewrite a real 4D file as its first volume with header shape `shape`, every other header byte kept."""
    raw = bytearray(raw_bytes(src))
    n = header_cls.sizeof_hdr
    hdr = header_cls(binaryblock=bytes(raw[:n]), check=False)
    hdr.set_data_shape(shape)
    end = int(hdr["vox_offset"]) + int(np.prod(shape)) * hdr.get_data_dtype().itemsize
    out = bytes(hdr.binaryblock) + bytes(raw[n:end])
    dst.write_bytes(gzip.compress(out) if dst.suffix == ".gz" else out)
    return dst


@pytest.mark.parametrize("shape", [(17, 21, 3, 1), (17, 21, 3), (17, 21, 3, 1, 1)])
def test_functional_first_volume_real_scaling(tmp_path, shape):
    # functional.nii is int16 with a real scl_slope/scl_inter: the integer -> float32 -> scaled path.
    path = single_volume(need("functional"), tmp_path / "func0.nii", shape=shape)
    vol = assert_as_training(path)
    assert vol.array.shape == (3, 21, 17) and vol.shape_on_disk == shape


def test_anatomical_x_y_z_1(tmp_path, anat):
    path = write_nifti(tmp_path / "anat4d.nii.gz", anat[..., None], ">i2", gz=True)
    vol = assert_as_training(path)
    assert vol.shape_on_disk == (33, 41, 25, 1) and vol.array.shape == (25, 41, 33)


@pytest.mark.parametrize(
    "dtype,slope,inter",
    [
        ("<u1", 0.37, -12.3),  # scaled uint8: float32 result
        ("<i2", 2.0, 0.0),
        ("<i4", 1.0000001, 0.5),  # int32 goes through float32 before scaling (not float64)
        ("<f4", 0.37, -12.3),
        (">f8", 3e-3, 1e5),  # float64 data is scaled in float64
        ("<i2", 0.0, 5.0),  # slope 0 means 1, but SimpleITK still adds the intercept
        ("<i2", np.nan, 5.0),  # a non-finite slope counts as 0, so as 1
        ("<i2", np.nan, np.nan),  # no scaling at all
        ("<i2", np.inf, 1.0),
    ],
)
def test_scaled_real_data(tmp_path, mni_crop, dtype, slope, inter):
    data = mni_crop.astype(np.int64) * (1000 if dtype == "<i4" else 1) - 20
    if dtype == "<u1":
        data = mni_crop
    path = write_nifti(tmp_path / "scaled.nii", data, dtype, slope=slope, inter=inter)
    vol = assert_as_training(path)
    if not np.isfinite(slope) or slope == 0:
        assert any("scl_slope" in w for w in vol.warnings) == (np.isfinite(inter) and inter != 0)


def test_large_int32_rounds_through_float64_unscaled(tmp_path, mni_crop):
    data = mni_crop.astype(np.int64) * 1_000_003 + 16_777_217  # past float32's exact integers
    assert_as_training(write_nifti(tmp_path / "big.nii", data, "<i4"), pipeline=False)
    assert_as_training(write_nifti(tmp_path / "big64.nii", data * 1000, "<i8"), pipeline=False)


@pytest.mark.parametrize("dtype", ["<f4", ">f4", ">f8"])
def test_float_with_nan_and_inf(tmp_path, mni_crop, dtype):
    data = mni_crop.astype(np.float32) / 7
    data[0, 0, 0] = data[10, 20, 30] = data[-1, -1, -1] = np.nan
    data[5, 5, 5] = data[6, 6, 6] = np.inf
    data[7, 7, 7] = -np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", data, dtype, gz=True)
    vol = assert_as_training(path, nonfinite=6)
    assert vol.warnings == ["6 non-finite voxels set to 0"]


def test_float_nan_zeroed_before_scaling(tmp_path, anat):
    data = anat.astype(np.float32)
    data[1, 2, 3] = np.nan
    vol = assert_as_training(write_nifti(tmp_path / "nan_scaled.nii", data, ">f4", slope=0.5, inter=10.0), nonfinite=1)
    assert vol.array[3, 2, 1] == 10.0  # NaN -> 0, then 0 * 0.5 + 10


def test_plain_nii_named_gz_accepted(tmp_path):
    # SimpleITK reads an uncompressed file named .nii.gz; so do we (compression is sniffed).
    path = tmp_path / "anat_plain.nii.gz"
    shutil.copy(need("anatomical"), path)
    assert_as_training(path, pipeline=False)


def test_gzip_named_nii_accepted(tmp_path):
    path = tmp_path / "anat_gz.nii"
    path.write_bytes(gzip.compress(need("anatomical").read_bytes()))
    assert np.array_equal(load_volume(path).array, load_volume(need("anatomical")).array)


def test_non_ascii_name_accepted(tmp_path):
    path = tmp_path / "Gehirn_Ωmega_脑.nii.gz"
    shutil.copy(need("standard"), path)
    assert_as_training(path)


def test_nifti2_accepted_with_nifti1_semantics(tmp_path):
    # SimpleITK cannot read NIfTI-2 at all; we read it, and compare with SimpleITK on the same bytes as NIfTI-1.
    src = need("example_nifti2")
    n2 = single_volume(src, tmp_path / "n2.nii.gz", shape=(32, 20, 12, 1), header_cls=nib.Nifti2Header)
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(n2))
    h2 = nib.Nifti2Header(binaryblock=raw_bytes(n2)[:540], check=False)
    data = np.frombuffer(raw_bytes(n2)[int(h2["vox_offset"]) :], h2.get_data_dtype()).reshape((32, 20, 12), order="F")
    n1 = write_nifti(tmp_path / "n1.nii", data, h2.get_data_dtype(), slope=h2["scl_slope"], inter=h2["scl_inter"])
    vol2, ref = load_volume(n2), assert_as_training(n1, pipeline=False)
    assert np.array_equal(vol2.array, ref.array)
    assert any("NIfTI-2" in w for w in vol2.warnings)


def test_nifti2_big_endian_float(tmp_path, anat):
    data = anat.astype(np.float32) * 0.25
    n2 = write_nifti(tmp_path / "n2.nii", data, ">f8", version=2, endian=">", slope=2.0, inter=1.0)
    n1 = write_nifti(tmp_path / "n1.nii", data, ">f8", endian=">", slope=2.0, inter=1.0)
    assert np.array_equal(load_volume(n2).array, assert_as_training(n1, pipeline=False).array)


_DTYPES = ["u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8"]
_HEADER_FLOATS = st.sampled_from([1.0, 0.0, np.nan, np.inf, -1.0, 0.5, 1.0000001, 3e-3, 7.25, -12.3, 1e5])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(*[st.integers(1, 5)] * 3),
    dtype=st.sampled_from(_DTYPES),
    endian=st.sampled_from("<>"),
    slope=_HEADER_FLOATS,
    inter=_HEADER_FLOATS,
    seed=st.integers(0, 2**32 - 1),
)
def test_random_headers_match_simpleitk(tmp_path, shape, dtype, endian, slope, inter, seed):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        data = rng.standard_normal(shape) * 1e3
        data[rng.random(shape) < 0.2] = rng.choice([np.nan, np.inf, -np.inf])
    else:
        info = np.iinfo(dt)
        data = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    path = write_nifti(tmp_path / "h.nii", data, endian + dtype, slope=slope, inter=inter)
    ref = sitk_array(path).astype(np.float32)
    try:
        vol = load_volume(path)
    except ScanError as e:  # only the deliberate rejections, and SimpleITK agrees the data is unusable
        assert e.code in {"constant_volume", "no_finite_data", "out_of_range"}, e.code
        assert e.code != "constant_volume" or ref.min() == ref.max()
        assert e.code != "out_of_range" or not np.isfinite(ref).all()
        return
    assert np.array_equal(vol.array, ref)


# ---------------------------------------------------------------- bad inputs


def test_truncated_gzip(tmp_path):
    data = need("mni_t1").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "t.nii.gz", "corrupt_gzip")


def test_gzip_bad_crc(tmp_path):
    data = bytearray(need("standard").read_bytes())
    data[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    (tmp_path / "crc.nii.gz").write_bytes(bytes(data))
    expect_error(tmp_path / "crc.nii.gz", "corrupt_gzip")


def test_gzip_corrupt_stream(tmp_path):
    data = bytearray(need("mni_t1").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (tmp_path / "bad.nii.gz").write_bytes(bytes(data))
    expect_error(tmp_path / "bad.nii.gz", "corrupt_gzip")


@pytest.mark.parametrize("gz", [False, True])
def test_data_shorter_than_header_says(tmp_path, gz):
    raw = need("anatomical").read_bytes()[:-100]
    path = tmp_path / ("short.nii.gz" if gz else "short.nii")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    expect_error(path, "truncated")


@pytest.mark.parametrize("n", [352, 348, 200])
def test_header_only(tmp_path, n):
    (tmp_path / "h.nii").write_bytes(need("anatomical").read_bytes()[:n])
    expect_error(tmp_path / "h.nii", "truncated")


@pytest.mark.parametrize("content", [bytes(4096), b"", b"hello, world\n" * 40, gzip.compress(bytes(4096))])
def test_not_nifti(tmp_path, content):
    (tmp_path / "x.nii.gz").write_bytes(content)
    expect_error(tmp_path / "x.nii.gz", "not_nifti")


def test_2d_image(tmp_path, anat):
    expect_error(write_nifti(tmp_path / "2d.nii", anat[:, :, 10], "<i2"), "bad_dims")


def test_4d_with_several_volumes(tmp_path, anat):
    expect_error(write_nifti(tmp_path / "4d.nii", np.stack([anat, anat], -1), "<i2"), "bad_dims")


def test_5d_vector(tmp_path, anat):
    expect_error(write_nifti(tmp_path / "5d.nii", np.stack([anat] * 3, -1)[..., None, :], "<i2"), "bad_dims")


def test_constant_volume(tmp_path):
    expect_error(write_nifti(tmp_path / "c.nii", np.full((8, 9, 10), 7, np.int16), "<i2"), "constant_volume")


def test_all_nan(tmp_path):
    expect_error(write_nifti(tmp_path / "nan.nii", np.full((8, 9, 10), np.nan, np.float32), "<f4"), "no_finite_data")


def test_scaling_overflow(tmp_path, anat):
    expect_error(write_nifti(tmp_path / "o.nii", anat, "<i2", slope=3e38, inter=0.0), "out_of_range")


def test_unsupported_dtype(tmp_path):
    expect_error(write_nifti(tmp_path / "c.nii", np.ones((4, 5, 6), np.complex64), "<c8"), "unsupported_dtype")


def test_vox_offset_below_header(tmp_path, anat):
    path = write_nifti(tmp_path / "v.nii", anat, "<i2")
    raw = bytearray(path.read_bytes())
    raw[108:112] = np.float32(0).tobytes()
    path.write_bytes(bytes(raw))
    expect_error(path, "bad_header")


@pytest.mark.parametrize("gz", [False, True])
def test_huge_declared_size_fails_fast(tmp_path, gz):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4000, 4000, 4000))
    hdr.set_data_dtype(np.float32)
    buf = io.BytesIO()
    hdr.write_to(buf)
    raw = buf.getvalue() + bytes(100)
    path = tmp_path / ("huge.nii.gz" if gz else "huge.nii")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        err = expect_error(path, "too_large")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t < 1.0 and peak < 2**20  # the header alone decided it
    assert "4000" in str(err)


def test_size_limits_are_parameters():
    expect_error(need("mni_t1"), "too_large", max_voxels=100**3)
    expect_error(need("mni_t1"), "too_large", max_bytes=10**6)


def test_directory(tmp_path):
    (tmp_path / "scan.nii.gz").mkdir()
    expect_error(tmp_path / "scan.nii.gz", "not_a_file")


def test_fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "pipe.nii")
    expect_error(tmp_path / "pipe.nii", "not_a_file")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.nii.gz", "not_found")
    err = expect_error(tmp_path / "two\nlines.nii", "not_found")  # the name is escaped, the message stays one line
    assert "two\\nlines" in str(err)


def test_symlink_loop(tmp_path):
    (tmp_path / "a.nii").symlink_to(tmp_path / "b.nii")
    (tmp_path / "b.nii").symlink_to(tmp_path / "a.nii")
    expect_error(tmp_path / "a.nii", "unreadable")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path):
    path = tmp_path / "locked.nii"
    shutil.copy(need("standard"), path)
    path.chmod(0)
    expect_error(path, "unreadable")


# ---------------------------------------------------------------- to_model_input and the spec


def test_to_model_input_rejects_unusable_arrays():
    for arr, code in [
        (np.zeros((4, 5, 6), np.float32), "constant_volume"),
        (np.array([[[0.0, np.nan, 1.0]]], np.float32), "out_of_range"),
        (np.array([[[0.0, 1e39, 1.0]]], np.float64), "out_of_range"),  # past float32 once converted
        (np.arange(10, dtype=np.float32).reshape(2, 5), "bad_dims"),
        (np.random.default_rng(0).random((1, 300, 300)).astype(np.float32), "bad_dims"),  # an axis would be 0
    ]:
        with pytest.raises(ScanError) as ei:
            to_model_input(arr)
        assert ei.value.code == code


def test_to_model_input_any_dtype_like_training():
    arr = np.random.default_rng(1).integers(-5000, 5000, size=(20, 31, 17)).astype(np.int32)
    assert torch.equal(to_model_input(arr), training_input(arr.astype(float)))
    assert torch.equal(to_model_input(arr.astype(np.float64), size=64), training_input(arr.astype(float), 64))


def test_preprocess_spec():
    spec = PreprocessSpec()
    d = spec.as_dict()
    assert d == {
        "size": 224,
        "normalisation": "minmax",
        "interpolation": "trilinear",
        "align_corners": True,
        "padding": "centre-zero",
        "axis_order": "sitk-zyx",
    }
    assert PreprocessSpec.from_dict(d) == spec
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict({**d, "interpolation": "nearest"})
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict({**d, "crop": "none"})
    with pytest.raises(ValueError):
        preprocess_scan(need("standard"), PreprocessSpec(align_corners=False))


def test_preprocess_scan_small_size():
    path = need("anatomical")
    x, vol = preprocess_scan(path, PreprocessSpec(size=96))
    assert x.shape == (1, 1, 96, 96, 96)
    assert torch.equal(x, training_input(sitk_array(path), 96))

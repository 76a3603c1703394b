"""DICOM test data, made here from real data: nothing is downloaded.

No wheel ships a multi-slice MR brain series with real pixels, so the series are written
from the MNI152 T1 template in nilearn's wheel: downsampled 4x (49x58x47), with an
asymmetric marker added first (the template is exactly left-right symmetric, so it could
not reveal a flipped axis), then written slice by slice with SimpleITK's writer (one
StudyInstanceUID, study date/time and FrameOfReferenceUID on every slice), as int16
with and without rescale, transcoded to each compressed transfer syntax, converted into
one Legacy Converted Enhanced MR multi-frame file by highdicom, and broken in the ways
the reader must refuse. Real headers come from pydicom's wheel (MR_small*, the
dicomdirtests tree) and nibabel's (philips_mprage.dcm.gz, an Enhanced MR header).
"""

from __future__ import annotations

import contextlib
import gzip
import locale
import random
import shutil
from pathlib import Path

import numpy as np

from volumes import package_dir, real_volume

STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.1002"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
MARKER = 1000  # int16 value of the marker block (the template's own values are 0..~100)


class Missing(Exception):
    """A wheel this data is made from is not installed."""


def _sitk():
    import SimpleITK as sitk

    return sitk


def pydicom_file(name: str) -> Path:
    root = package_dir("pydicom")
    path = root / "data" / "test_files" / name if root is not None else None
    if path is None or not path.exists():
        raise Missing(f"pydicom test file {name}")
    return path


def philips_mprage(dst: Path) -> Path:
    """nibabel's Enhanced MR file (176 frames of 256x256; real header, pixels all zero), gunzipped to `dst`."""
    root = package_dir("nibabel")
    src = root / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz" if root is not None else None
    if src is None or not src.is_file():
        raise Missing("nibabel's philips_mprage.dcm.gz")
    dst.write_bytes(gzip.decompress(src.read_bytes()))
    return dst


def uid(seed: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[seed])


# ---------------------------------------------------------------- the volume


def marked_mni():
    """The MNI T1 template, 4x smaller, as int16, with a bright block in one corner region (left, anterior,
    superior of centre) that no axis flip maps onto itself: SimpleITK image, 49x58x47 (x, y, z)."""
    sitk = _sitk()
    path = real_volume("mni_t1")
    if path is None:
        raise Missing("nilearn's MNI152 T1 template")
    img = sitk.Cast(sitk.Shrink(sitk.ReadImage(str(path)), [4, 4, 4]), sitk.sitkInt16)
    arr = sitk.GetArrayFromImage(img)  # [z, y, x]
    arr[30:36, 38:44, 6:12] = MARKER  # x small = patient left in this RAS-stored template
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


# ---------------------------------------------------------------- writing series with SimpleITK


@contextlib.contextmanager
def _keep_locale():
    """SimpleITK's DICOM writer (GDCM) switches the whole process to the C locale, after which Python opens text files
    as ASCII: put the locale back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_series(img, folder: Path, *, series_uid: str | None = None, rescale: tuple[float, float] | None = None,
                 compressor: str | None = None, tags: dict | None = None, name="IM{:04d}") -> Path:
    """Write a 3D SimpleITK image as one MR series, one file per z slice (SimpleITK's writer).

    rescale=(slope, intercept): the image's values v are written as int16 round((v * slope + intercept - intercept)
    / slope) with those tags, so readers give v * slope + intercept; GDCM then writes each slice as a single-frame
    Enhanced MR file (the rescale in its functional groups), not as MR Image Storage. compressor: SimpleITK's "JPEG" (lossless, process 14 SV1) or "JPEG2000" (lossless).
    tags: extra DICOM tags ("gggg|eeee" -> value) put on every slice.
    """
    sitk = _sitk()
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or uid(str(folder))
    direction = img.GetDirection()
    common = {
        "0008|0016": MR_IMAGE, "0008|0060": "MR", "0008|0008": "ORIGINAL\\PRIMARY\\M\\ND",
        "0020|000d": STUDY_UID, "0020|000e": series_uid, "0020|0052": FRAME_OF_REFERENCE,
        "0008|0020": "20240102", "0008|0030": "101500", "0008|0021": "20240102", "0008|0031": "101500",
        "0020|0011": "7", "0020|0037": "\\".join(f"{v:.10g}" for v in direction[0::3] + direction[1::3]),
        "0018|0050": f"{img.GetSpacing()[2]:g}",
    }
    if rescale is not None:
        slope, intercept = rescale
        common.update({"0028|1053": f"{slope:g}", "0028|1052": f"{intercept:g}", "0028|0100": "16",
                       "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})
        # the writer stores round((value - intercept) / slope) as int16: give it the rescaled values
        img = sitk.Cast(img, sitk.sitkFloat64) * slope + intercept
    common.update(tags or {})
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")  # file names without an extension, as scanners write them
    writer.KeepOriginalImageUIDOn()
    writer.SetUseCompression(compressor is not None)
    if compressor is not None:
        writer.SetCompressor(compressor)
    with _keep_locale():
        for k in range(img.GetSize()[2]):
            sl = img[:, :, k]
            for tag, value in common.items():
                sl.SetMetaData(tag, value)
            sl.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
            sl.SetMetaData("0020|0013", str(k + 1))
            sl.SetMetaData("0008|0018", uid(f"{series_uid}.{k}"))
            writer.SetFileName(str(folder / name.format(k + 1)))
            writer.Execute(sl)
    return folder


def with_rescale(src: Path, dst: Path, slope: str, intercept: str) -> Path:
    """A classic MR Image Storage copy of a series with Rescale Slope/Intercept added at the top level of every
    file (what scanners write; SimpleITK's writer refuses a non-integer slope for integer pixels)."""
    copy_series(src, dst)
    for f in files(dst):
        edit(f, RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="US")
    return dst


def transcode(src: Path, dst: Path, syntax: str, **kw) -> Path:
    """Copy a series re-encoded in another transfer syntax: RLE and JPEG-LS by pydicom's encoders, lossy JPEG 2000
    by GDCM (SimpleITK's writer has neither)."""
    import pydicom
    from pydicom.uid import UID

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if syntax == "1.2.840.10008.1.2.4.91":  # JPEG 2000 (lossy)
            _gdcm_j2k_lossy(f, dst / f.name, rate=kw.get("rate", 8.0))
        else:
            ds = pydicom.dcmread(f)
            ds.compress(UID(syntax), **kw)
            ds.save_as(dst / f.name)
    return dst


def _gdcm_j2k_lossy(src: Path, dst: Path, rate: float) -> None:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    codec = gdcm.JPEG2000Codec()
    codec.SetRate(0, rate)  # compression ratio of the first (only) quality layer
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEG2000))
    change.SetUserCodec(codec)
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(dst))
    assert writer.Write()


def multiframe(src: Path, dst: Path, *, shuffle_seed: int = 3) -> Path:
    """The series in `src` as one Legacy Converted Enhanced MR file (highdicom), frames stored in a shuffled order."""
    import highdicom as hd
    import pydicom

    datasets = [pydicom.dcmread(f) for f in sorted(src.iterdir())]
    random.Random(shuffle_seed).shuffle(datasets)
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(datasets, series_instance_uid=uid(f"{dst}.series"),
                                                  series_number=8, sop_instance_uid=uid(f"{dst}.sop"),
                                                  instance_number=1)
    dst.parent.mkdir(parents=True, exist_ok=True)
    mf.save_as(dst)
    return dst


def from_pydicom_file(name: str, dst: Path, n: int = 4) -> Path:
    """A series of `n` copies of one of pydicom's real MR_small* files (its header and encoded pixels kept), each at
    the next position along the slice normal: a real header in every transfer syntax pydicom ships."""
    import pydicom

    dst.mkdir(parents=True, exist_ok=True)
    src = pydicom_file(name)
    series_uid = uid(f"{dst}.series")
    for k in range(n):
        ds = pydicom.dcmread(src)
        row, col = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        pos = np.array(ds.ImagePositionPatient, float) + 2.5 * k * np.cross(row, col)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(f"{dst}.{k}")
        ds.InstanceNumber = k + 1
        ds.save_as(dst / f"{name.removesuffix('.dcm')}_{k}.dcm")
    return dst


# ---------------------------------------------------------------- broken variants of a good series


def copy_series(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit(path: Path, **values) -> None:
    """Set (or with None delete) header elements of one file by keyword, pixels untouched."""
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in values.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def renumber(folder: Path) -> Path:
    """Give a copied series its own SeriesInstanceUID (copies of one series in one tree are one series with every
    slice twice)."""
    new = uid(f"{folder}.renumbered")
    for f in files(folder):
        edit(f, SeriesInstanceUID=new)
    return folder


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def delete_slice(good: Path, dst: Path) -> Path:
    copy_series(good, dst)
    files(dst)[20].unlink()
    return dst


def duplicate_slice(good: Path, dst: Path) -> Path:
    copy_series(good, dst)
    f = files(dst)[20]
    shutil.copy(f, dst / "IM9999")
    edit(dst / "IM9999", SOPInstanceUID=uid("dup"))
    return dst


def reorient_slice(good: Path, dst: Path) -> Path:
    copy_series(good, dst)
    edit(files(dst)[10], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    return dst


def respace_slice(good: Path, dst: Path) -> Path:
    copy_series(good, dst)
    edit(files(dst)[10], PixelSpacing=[3, 4])
    return dst


def drop_position(good: Path, dst: Path) -> Path:
    copy_series(good, dst)
    edit(files(dst)[5], ImagePositionPatient=None)
    return dst


def two_series(good: Path, other: Path, dst: Path) -> Path:
    """A folder holding two series (the other one's files prefixed so names do not clash)."""
    copy_series(good, dst)
    for f in files(other):
        shutil.copy(f, dst / f"B{f.name}")
    return dst


def truncate_last(good: Path, dst: Path, keep: float = 0.6) -> Path:
    copy_series(good, dst)
    f = files(dst)[-1]
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    return dst


def corrupt_fragments(compressed: Path, dst: Path) -> Path:
    """A compressed series with the codestream of one file overwritten by noise (length unchanged)."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    copy_series(compressed, dst)
    f = files(dst)[7]
    ds = pydicom.dcmread(f)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    rng = random.Random(5)
    for i in range(len(frame) // 4, len(frame)):
        frame[i] = rng.randrange(256)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(f)
    return dst


def sitk_series(folder: Path):
    """The oracle: SimpleITK's ImageSeriesReader over GetGDCMSeriesFileNames(folder) -> (float32 [Z,Y,X], image)."""
    sitk = _sitk()
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    img = sitk.ReadImage(names)
    return sitk.GetArrayFromImage(img).astype(float).astype(np.float32), img

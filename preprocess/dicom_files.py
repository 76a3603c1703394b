"""One DICOM file, read without its pixel data: what kind of object it is, and where each of its frames lies.

Only DICOM Part 10 files (the 128-byte preamble followed by `DICM`) are read. No tag value
ever goes into a message: files are named by their place in the series, modalities and
transfer syntaxes only from fixed lists (see the privacy rule in docs/guides/infer.md, Privacy).

ScanError codes raised here: unreadable, bad_header (pydicom cannot parse the header),
not_mr (another modality), unsupported_dtype (colour, 1-bit or float pixels, MONOCHROME1),
missing_geometry (position, orientation or pixel spacing absent or unusable),
no_pixel_data, truncated (pixel data shorter than rows x columns x frames, or the file
ends inside it; decided before any pixel is read), unsupported_transfer_syntax (no
decoder exists for it), missing_decoder (a decoder exists but is not installed).
"""

from __future__ import annotations

import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import ScanError
from ..quiet import detached_logs, quiet_warnings
from .dicom_technical import TAGS as TECHNICAL_TAGS
from .dicom_technical import technical_fields

CODECS_EXTRA = "dicom-codecs"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_SAFE_MODALITIES = {"CT", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "OT", "SC", "RTDOSE", "RTIMAGE", "SEG", "OP",
                    "SM", "IO", "PX", "ES", "XC", "GM", "OCT"}
# Non-image objects, by SOP class UID prefix: what the skip counts call them.
_NON_IMAGE = (("1.2.840.10008.5.1.4.1.1.88.", "structured report"), ("1.2.840.10008.5.1.4.1.1.481.", "RT object"),
              ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"))
_PIXEL_TAGS = {0x7FE00010: "Pixel Data", 0x7FE00008: "Float Pixel Data", 0x7FE00009: "Double Float Pixel Data"}
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_PROBE_TAGS = ["SOPClassUID", "SeriesInstanceUID", "Rows", "Columns"]
_HEADER_TAGS = _PROBE_TAGS + [
    "Modality", "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "BitsAllocated",
    "PixelRepresentation", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
    "RescaleIntercept", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
] + TECHNICAL_TAGS

@contextmanager
def quiet_pydicom():
    """pydicom's warnings and log lines quote tag values (an invalid date, a name): none reaches a log while a DICOM
    file is parsed or decoded here (also as a decorator)."""
    with quiet_warnings(r"(pydicom|medblip_edge\.preprocess\.dicom)"), detached_logs("pydicom"):
        yield


def _head(path) -> bytes | None:
    """The first 132 bytes of a regular file (fewer if shorter); None if it is not a regular file or cannot be read."""
    try:
        if not os.path.isfile(path):  # a FIFO or device could block
            return None
        with open(path, "rb") as f:
            return f.read(132)
    except OSError:
        return None


def has_dicom_preamble(path) -> bool:
    """True if `path` is a regular file with `DICM` at byte 128 (a DICOM Part 10 file). Never blocks on a FIFO."""
    head = _head(path)
    return head is not None and head[128:] == b"DICM"


def _dcmread(path, what: str, **kw):
    import pydicom

    try:
        f = open(path, "rb")
    except OSError as e:
        raise ScanError(f"cannot read {what}: {e.strerror or type(e).__name__}", code="unreadable") from None
    try:
        return pydicom.dcmread(f, stop_before_pixels=True, **kw), f
    except OSError as e:
        f.close()
        raise ScanError(f"cannot read {what}: {e.strerror or type(e).__name__}", code="unreadable") from None
    except Exception as e:  # pydicom raises many types for a damaged header; its messages may quote values
        f.close()
        raise ScanError(f"{what} has a DICOM header pydicom cannot parse ({type(e).__name__})", code="bad_header") \
            from None


@quiet_pydicom()
def probe(path) -> tuple[str, str | None]:
    """A file met in a folder -> (kind, SeriesInstanceUID or None). kind: 'image' or what the skip count calls it."""
    head = _head(path)
    if head is None:
        return "unreadable file", None
    if head[128:] != b"DICM":
        return "non-DICOM file", None
    try:
        ds, f = _dcmread(path, "file", specific_tags=_PROBE_TAGS)
        f.close()
    except ScanError as e:
        return ("unreadable file" if e.code == "unreadable" else "damaged DICOM file"), None
    sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    if sop == DICOMDIR_CLASS:
        return "DICOMDIR", None
    if "Rows" not in ds or "Columns" not in ds:  # no pixel matrix: not an image whatever its class says
        kind = next((name for prefix, name in _NON_IMAGE if sop.startswith(prefix)), "other non-image object")
        return kind, None
    uid = ds.get("SeriesInstanceUID")
    return "image", (str(uid) if uid else None)


@dataclass(frozen=True)
class Frame:
    """One 2D image of a series: its file (index into the series' files), frame within it, and geometry (mm, LPS+)."""

    file: int
    index: int
    position: tuple[float, float, float]
    orientation: tuple[float, ...]  # 6 direction cosines: along a row (x), then down a column (y)
    spacing: tuple[float, float]  # PixelSpacing: between rows (y), between columns (x)
    slope: float
    intercept: float


@dataclass(frozen=True)
class FileHeader:
    """What a file's pixel data is: enough to check it and decode it later, one file at a time."""

    rows: int
    cols: int
    frames: int
    bits_allocated: int
    pixel_representation: int
    transfer_syntax: str
    stored_dtype: str  # e.g. "<u2"
    technical: dict | None = None  # dicom_technical.technical_fields: for the input checks (qc/)


def _floats(value, n: int) -> tuple[float, ...] | None:
    """A DS value (n numbers) as finite floats; None if absent or malformed (never a guess from part of it)."""
    items = [value] if n == 1 else value
    if value is None or isinstance(items, (str, bytes)):
        return None
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _item(ds, seq: str):
    s = ds.get(seq)
    return s[0] if s is not None and len(s) else None


def _frame(file: int, index: int, what: str, position, orientation, spacing, slope, intercept) -> Frame:
    """Check one frame's geometry tags (raw values) and keep them as floats."""
    position, orientation, spacing = _floats(position, 3), _floats(orientation, 6), _floats(spacing, 2)
    missing = [n for n, v in (("image position", position), ("image orientation", orientation),
                              ("pixel spacing", spacing)) if v is None]
    if missing:
        raise ScanError(f"{what}: {' and '.join(missing)} missing or unusable, the slices cannot be placed",
                        code="missing_geometry")
    row, col = orientation[:3], orientation[3:]
    if not all(abs(math.hypot(*v) - 1) < 1e-2 for v in (row, col)) or abs(sum(a * b for a, b in zip(row, col))) > 1e-2:
        raise ScanError(f"{what}: image orientation is not two perpendicular unit vectors", code="missing_geometry")
    if not all(s > 0 for s in spacing):
        raise ScanError(f"{what}: pixel spacing is not positive", code="missing_geometry")
    scale = []
    for name, raw, default in (("rescale slope", slope, 1.0), ("rescale intercept", intercept, 0.0)):
        value = _floats(raw, 1)
        if value is None and raw is not None and str(raw).strip():
            raise ScanError(f"{what}: {name} is not one finite number", code="bad_header")
        scale.append(value[0] if value else default)
    return Frame(file, index, position, orientation, spacing, *scale)


def _classic_frame(ds, file: int, what: str) -> Frame:
    """A single-frame image: the geometry and rescale tags sit at the top level."""
    return _frame(file, 0, what, ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                  ds.get("PixelSpacing"), ds.get("RescaleSlope"), ds.get("RescaleIntercept"))


def _functional_frame(item, shared, file: int, index: int, what: str) -> Frame:
    """A multi-frame image: each tag from the frame's own functional groups, else from the shared ones."""

    def find(seq: str, key: str):
        for group in (item, shared):
            sub = _item(group, seq) if group is not None else None
            if sub is not None and key in sub:
                return sub.get(key)
        return None

    return _frame(file, index, what, find("PlanePositionSequence", "ImagePositionPatient"),
                  find("PlaneOrientationSequence", "ImageOrientationPatient"),
                  find("PixelMeasuresSequence", "PixelSpacing"),
                  find("PixelValueTransformationSequence", "RescaleSlope"),
                  find("PixelValueTransformationSequence", "RescaleIntercept"))


def _check_pixel_element(f, ds, header: FileHeader, what: str) -> None:
    """The file stops right before its pixel data element: check its length against rows x columns x frames."""
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_deflated:
        return  # the stream position is inside the inflated data: checked when decoding
    little, implicit = ts.is_little_endian, ts.is_implicit_VR
    head = f.read(12)
    if len(head) < 8:
        raise ScanError(f"{what} has no pixel data", code="no_pixel_data")
    group, elem = struct.unpack("<HH" if little else ">HH", head[:4])
    tag = group << 16 | elem
    if tag not in _PIXEL_TAGS:
        raise ScanError(f"{what} has no pixel data", code="no_pixel_data")
    if tag != 0x7FE00010:
        raise ScanError(f"{what} holds {_PIXEL_TAGS[tag]}: only integer pixel data is read", code="unsupported_dtype")
    fmt = "<I" if little else ">I"
    if implicit:
        length, start = struct.unpack(fmt, head[4:8])[0], 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            raise ScanError(f"{what}: file ends inside the pixel data element", code="truncated")
        length, start = struct.unpack(fmt, head[8:12])[0], 12
    else:
        length, start = struct.unpack("<H" if little else ">H", head[6:8])[0], 8
    if length == 0xFFFFFFFF:
        if not ts.is_encapsulated:
            raise ScanError(f"{what}: undefined pixel data length in an uncompressed transfer syntax",
                            code="bad_header")
        return  # compressed fragments: a damaged stream is found when decoding
    expected = header.rows * header.cols * header.frames * header.bits_allocated // 8
    remaining = os.fstat(f.fileno()).st_size - (f.tell() - len(head) + start)
    if not ts.is_encapsulated and length < expected:
        raise ScanError(f"{what}: pixel data has {length} bytes, {header.rows}x{header.cols}x{header.frames} pixels "
                        f"need {expected}", code="truncated")
    if remaining < length:
        raise ScanError(f"{what}: file ends {length - remaining} bytes into its pixel data", code="truncated")


def _check_decoder(ts, what: str) -> None:
    from pydicom.pixels import get_decoder

    if not ts.is_compressed:
        return
    name = ts.name if ts.is_transfer_syntax else "an unknown transfer syntax"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ScanError(f"{what} is stored as {name}, which no installed decoder reads",
                        code="unsupported_transfer_syntax") from None
    if not decoder.is_available:
        raise ScanError(f"{what} is stored as {name}; install its decoder: pip install 'medblip-edge[{CODECS_EXTRA}]'",
                        code="missing_decoder")


@quiet_pydicom()
def read_header(path, file: int, what: str) -> tuple[FileHeader, list[Frame]]:
    """One file of a series -> its pixel format and its frames' geometry; raises ScanError. No pixel is read."""
    ds, f = _dcmread(path, what, specific_tags=_HEADER_TAGS)
    try:
        modality = str(ds.get("Modality", "") or "")
        if modality != "MR":
            shown = modality if modality in _SAFE_MODALITIES else ("no modality" if not modality else "another modality")
            raise ScanError(f"{what} is {shown}, not MR: the model reads MRI only", code="not_mr")
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            frames = int(ds.get("NumberOfFrames") or 1)
            bits = int(ds.BitsAllocated)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            rep = int(ds.get("PixelRepresentation", 0) or 0)
        except (AttributeError, TypeError, ValueError):
            raise ScanError(f"{what}: image size or pixel format missing", code="bad_header") from None
        photometric = str(ds.get("PhotometricInterpretation", "") or "")
        if samples != 1 or photometric not in ("MONOCHROME2", "MONOCHROME1"):
            raise ScanError(f"{what} is a colour image ({samples} samples per pixel): a grey MR image is needed",
                            code="unsupported_dtype")
        if photometric == "MONOCHROME1":
            raise ScanError(f"{what} is MONOCHROME1 (inverted grey), which is not read", code="unsupported_dtype")
        if bits not in (8, 16, 32) or rows < 1 or cols < 1 or frames < 1:
            raise ScanError(f"{what}: {bits}-bit pixels in {rows}x{cols}x{frames} frames cannot be read",
                            code="unsupported_dtype")
        ts = ds.file_meta.get("TransferSyntaxUID")
        if ts is None:
            raise ScanError(f"{what} has no transfer syntax in its file meta header", code="bad_header")
        dtype = f"{'<' if ts.is_little_endian or ts.is_encapsulated else '>'}{'i' if rep else 'u'}{bits // 8}"
        header = FileHeader(rows, cols, frames, bits, rep, str(ts), dtype, technical_fields(ds))
        _check_decoder(ts, what)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        shared = _item(ds, "SharedFunctionalGroupsSequence")
        if per_frame is not None or shared is not None:
            if per_frame is None or len(per_frame) != frames:
                raise ScanError(f"{what}: {frames} frames but per-frame geometry for "
                                f"{0 if per_frame is None else len(per_frame)}", code="missing_geometry")
            out = [_functional_frame(per_frame[i], shared, file, i, f"{what} frame {i + 1}") for i in range(frames)]
        elif frames == 1:
            out = [_classic_frame(ds, file, what)]
        else:
            raise ScanError(f"{what}: {frames} frames without per-frame positions", code="missing_geometry")
        _check_pixel_element(f, ds, header, what)
        return header, out
    finally:
        f.close()

"""One request's upload: multipart/form-data with a `scan` file part, streamed to a private temporary file.

Parts: `scan` (required; its file name becomes the row's `scan`, as medblip-infer reports a file's
name), `patient_text` and `question` (optional, UTF-8 text). The file is written under its own
name (directories stripped) in a fresh temporary folder, so the scan is read by exactly the entry
point that reads a file given to medblip-infer (`Pipeline.prepare`): whatever that accepts, NIfTI
today and a DICOM series zip once it reads one, the server accepts with no change here.

The body limit is checked against Content-Length before anything is read and again while
streaming (a chunked body has no length). Problems with the request itself raise RequestError
with an HTTP status and a stable code; nothing here logs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedblipError

FIELDS = ("scan", "patient_text", "question")
MAX_TEXT_BYTES = 64 * 1024


class RequestError(MedblipError):
    """A request the server refuses before any scan is read: `status` is its HTTP status."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message, code=code)
        self.status = status


@dataclass
class Upload:
    """The saved scan (`path`, named as uploaded) and the text fields; `cleanup()` removes the folder."""

    path: Path
    patient_text: str = ""
    question: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def cleanup(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def safe_name(filename: str | None) -> str:
    """An uploaded file name without its directories (clients may send a full path); 'scan' when empty."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    if name in ("", ".", ".."):
        return "scan"
    if "\x00" in name or len(os.fsencode(name)) > 255:
        raise RequestError(400, "bad_filename", "the scan part's file name is not a usable file name")
    return name


def _disposition(value: bytes) -> tuple[str | None, str | None]:
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(value)
    if kind != b"form-data":
        return None, None
    name = params.get(b"name")
    filename = params.get(b"filename")
    decode = lambda b: b.decode("utf-8", "replace") if b is not None else None  # noqa: E731
    return decode(name), decode(filename)


class _Parts:
    """python-multipart callbacks: the `scan` part streamed to disk, text parts kept (bounded)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.headers: dict[bytes, bytes] = {}
        self.field = self.value = b""
        self.current: str | None = None
        self.file = None
        self.scan: Path | None = None
        self.text: dict[str, bytearray] = {}
        self.complete = False  # the closing boundary was read

    def callbacks(self) -> dict:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field, "on_header_value": self.header_value,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_done,
                "on_part_data": self.data, "on_part_end": self.end, "on_end": self.done}

    def done(self):
        self.complete = True

    def begin(self):
        self.headers, self.field, self.value, self.current = {}, b"", b"", None

    def header_field(self, data, start, end):
        self.field += data[start:end]

    def header_value(self, data, start, end):
        self.value += data[start:end]

    def header_end(self):
        self.headers[self.field.lower()] = self.value
        self.field = self.value = b""

    def headers_done(self):
        name, filename = _disposition(self.headers.get(b"content-disposition", b""))
        if name not in FIELDS:
            raise RequestError(400, "unknown_field", f"unknown form field {name!r}; expected scan, patient_text, "
                               "question" if name else "a form part without a name")
        if name in self.text or (name == "scan" and self.scan is not None):
            raise RequestError(400, "repeated_field", f"form field {name!r} given twice")
        self.current = name
        if name == "scan":
            self.scan = self.folder / safe_name(filename)
            self.file = open(self.scan, "wb")
        else:
            self.text[name] = bytearray()

    def data(self, data, start, end):
        if self.current == "scan":
            self.file.write(data[start:end])
        else:
            buf = self.text[self.current]
            buf += data[start:end]
            if len(buf) > MAX_TEXT_BYTES:
                raise RequestError(413, "field_too_large", f"form field {self.current!r} is over "
                                   f"{MAX_TEXT_BYTES // 1024} KiB")

    def end(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        self.current = None


def _text(parts: _Parts, name: str) -> str | None:
    if name not in parts.text:
        return None
    try:
        return bytes(parts.text[name]).decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "bad_text", f"form field {name!r} is not UTF-8 text") from None


def _related_upload(request, parts) -> Upload:
    """A multipart/related DICOM upload: its folder of parts; patient_text and question from the query string."""
    if parts.count == 0:
        raise RequestError(400, "missing_scan", "the multipart/related body has no application/dicom part")
    texts = {}
    for name in ("patient_text", "question"):
        value = request.query_params.get(name)
        if value is not None and len(value.encode()) > MAX_TEXT_BYTES:
            raise RequestError(413, "field_too_large", f"{name!r} is over {MAX_TEXT_BYTES // 1024} KiB")
        texts[name] = value
    return Upload(parts.folder, texts["patient_text"] or "", texts["question"])


async def read_upload(request, max_bytes: int) -> Upload:
    """Starlette request -> Upload (scan saved to a temporary folder; a zip unpacked into a folder; the parts of a
    multipart/related DICOM body in a folder); raises RequestError."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(request.headers.get("content-type", ""))
    related = kind == b"multipart/related"
    if kind not in (b"multipart/form-data", b"multipart/related") or not params.get(b"boundary"):
        raise RequestError(415, "unsupported_media_type", "send the scan as multipart/form-data with a 'scan' "
                           "file part (curl -F scan=@scan.nii.gz), or a DICOM series as multipart/related; "
                           "type=\"application/dicom\"")
    if related and params.get(b"type", b"application/dicom").lower() != b"application/dicom":
        raise RequestError(415, "unsupported_media_type", "multipart/related bodies must have "
                           "type=\"application/dicom\"")
    length = request.headers.get("content-length")
    limit = f"the request body is over the server's limit of {max_bytes / 2**20:g} MiB"
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise RequestError(413, "body_too_large", limit)
    folder = Path(tempfile.mkdtemp(prefix="medblip-upload-"))
    if related:
        from .dicom_upload import RelatedParts

        parts = RelatedParts(folder)
    else:
        parts = _Parts(folder)
    parser = MultipartParser(params[b"boundary"], parts.callbacks())
    seen = 0
    try:
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > max_bytes:
                    raise RequestError(413, "body_too_large", limit)
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError:
            raise RequestError(400, "bad_multipart", "the multipart/form-data body is malformed") from None
        finally:
            if parts.file is not None:
                parts.file.close()
        if not parts.complete:
            raise RequestError(400, "bad_multipart", "the multipart body ends before its closing boundary")
        if related:
            return _related_upload(request, parts)
        if parts.scan is None:
            raise RequestError(400, "missing_scan", "no 'scan' file part in the form")
        from .dicom_upload import extract_zip, is_zip

        scan = extract_zip(parts.scan, max_bytes) if is_zip(parts.scan) else parts.scan
        return Upload(scan, _text(parts, "patient_text") or "", _text(parts, "question"))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

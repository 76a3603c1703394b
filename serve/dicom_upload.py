"""A DICOM series uploaded to medblip-serve: a zip of its files (as the form's `scan` part), or the files as the parts
of a `multipart/related; type="application/dicom"` body (as a STOW-RS client sends them).

Either way the files land in one folder that `Pipeline.prepare` reads as medblip-infer reads a series
folder, so the answer is medblip-infer's row for that folder (a zip's folder is named after the zip
without `.zip`; a multipart/related upload's folder is `series`). Zips are checked before anything is
written: no absolute or `..` member paths, no links, at most MAX_MEMBERS members, and the uncompressed
total within a bound (a zip bomb is refused, not inflated). Problems raise RequestError with a code.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

from .upload import RequestError

MAX_MEMBERS = 4096
ZIP_MAGIC = b"PK\x03\x04"
RELATED_FOLDER = "series"


def is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ZIP_MAGIC
    except OSError:
        return False


def _member_path(name: str) -> PurePosixPath | None:
    """A member's relative path, or None when it would leave the folder (absolute, '..', a drive)."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or (p.parts and ":" in p.parts[0]):
        return None
    return p


def extract_zip(path: Path, max_bytes: int) -> Path:
    """Unpack the uploaded zip next to it into a folder named after it (without .zip); the zip is removed.
    -> the folder. Raises RequestError(400 bad_zip | 413 zip_too_large)."""
    folder = path.parent / (path.name[:-4] if path.name.lower().endswith(".zip") and len(path.name) > 4
                            else f"{path.name}.d")
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > MAX_MEMBERS:
                raise RequestError(413, "zip_too_large", f"the zip has {len(members)} files, more than "
                                   f"{MAX_MEMBERS}")
            total = sum(m.file_size for m in members)
            if total > max_bytes:
                raise RequestError(413, "zip_too_large", f"the zip unpacks to more than the server's limit of "
                                   f"{max_bytes / 2**20:g} MiB")
            for m in members:
                rel = _member_path(m.filename)
                mode = m.external_attr >> 16
                if rel is None or stat.S_ISLNK(mode):
                    raise RequestError(400, "bad_zip", "the zip has a member outside its folder or a link")
                dst = folder.joinpath(*rel.parts)
                dst.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(m) as src, open(dst, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > m.file_size:  # a header that lies about the size
                            raise RequestError(400, "bad_zip", "a zip member is larger than its header says")
                        out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as e:
        raise RequestError(400, "bad_zip", f"the zip cannot be read ({type(e).__name__})") from None
    os.unlink(path)
    if not folder.exists():
        raise RequestError(400, "bad_zip", "the zip holds no files")
    return folder


class RelatedParts:
    """python-multipart callbacks for multipart/related: every part with Content-Type application/dicom is streamed
    to <folder>/series/NNNNN.dcm; any other part type is refused."""

    def __init__(self, folder: Path):
        self.folder = folder / RELATED_FOLDER
        self.folder.mkdir()
        self.headers: dict[bytes, bytes] = {}
        self.field = self.value = b""
        self.file = None
        self.count = 0
        self.complete = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_done, "on_part_data": self.data, "on_part_end": self.end,
                "on_end": self.done}

    def begin(self):
        self.headers, self.field, self.value = {}, b"", b""

    def header_field(self, data, start, end):
        self.field += data[start:end]

    def header_value(self, data, start, end):
        self.value += data[start:end]

    def header_end(self):
        self.headers[self.field.lower()] = self.value
        self.field = self.value = b""

    def headers_done(self):
        kind = self.headers.get(b"content-type", b"application/dicom").split(b";")[0].strip().lower()
        if kind != b"application/dicom":
            raise RequestError(415, "unsupported_media_type", "multipart/related parts must be application/dicom")
        self.count += 1
        if self.count > MAX_MEMBERS:
            raise RequestError(413, "too_many_parts", f"more than {MAX_MEMBERS} DICOM parts")
        self.file = open(self.folder / f"{self.count:05d}.dcm", "wb")

    def data(self, data, start, end):
        self.file.write(data[start:end])

    def end(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def done(self):
        self.complete = True

    def close(self):
        self.end()

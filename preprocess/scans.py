"""What a scan is, whatever its format: a name for rows, a SHA-256, and `load()` -> LoadedVolume.

`open_scan(path)` is the one place the format is chosen: a name ending .nii/.nii.gz is
NIfTI (a folder so named fails as not_a_file); otherwise a folder, or a file that starts
as DICOM Part 10 does, is DICOM (one series expected); anything else goes to the NIfTI
reader, which says what is wrong with it. A series found in a folder tree is a
`DicomScan` of that series (runtime/scan_inputs.py makes them).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from .dicom import load_dicom, load_series, only_series
from .dicom_files import has_dicom_preamble
from .dicom_series import NIFTI_SUFFIXES, DicomSeries
from .loaded import LoadedVolume
from .nifti import load_volume


def file_sha256(path, chunk: int = 1 << 20) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.digest()


def display_name(path) -> str:
    """The name reported for a path (trailing slashes ignored): never its directories."""
    return Path(os.fsdecode(path)).name or os.fsdecode(path)


class NiftiScan:
    """A .nii / .nii.gz file."""

    series: str | None = None

    def __init__(self, path):
        self.path = Path(path)
        self.name = display_name(self.path)

    def sha256(self) -> str:
        """The file's SHA-256; OSError for anything but a regular file (a FIFO is never opened)."""
        if not stat.S_ISREG(os.stat(self.path).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return file_sha256(self.path).hex()

    def load(self, **limits) -> LoadedVolume:
        return load_volume(self.path, **limits)


class DicomScan:
    """A DICOM series: found in a tree (`series` given), or a folder / multi-frame file given as one scan.

    sha256: the file's own SHA-256 when the series is one file; otherwise the SHA-256 of its
    files' SHA-256 digests (32 bytes each) in the order of their paths.
    """

    def __init__(self, path, found: DicomSeries | None = None):
        self.path = Path(path)
        self.found = found
        self.name = found.name if found is not None else display_name(self.path)
        self.series = found.uid_hash if found is not None else None

    def _files(self) -> tuple[Path, ...]:
        return (self.found or only_series(self.path)[0]).files

    def sha256(self) -> str:
        files = self._files()
        if len(files) == 1:
            return file_sha256(files[0]).hex()
        return hashlib.sha256(b"".join(file_sha256(f) for f in files)).hexdigest()

    def load(self, **limits) -> LoadedVolume:
        return load_series(self.found, **limits) if self.found is not None else load_dicom(self.path, **limits)


def open_scan(path) -> NiftiScan | DicomScan:
    """A path -> the scan reader for it (decided by name, then by folder / DICOM preamble; see the module doc)."""
    p = Path(os.fsdecode(path))
    if p.name.lower().endswith(NIFTI_SUFFIXES):
        return NiftiScan(p)
    try:
        is_dir = p.is_dir()
    except OSError:
        is_dir = False
    return DicomScan(p) if is_dir or has_dicom_preamble(p) else NiftiScan(p)

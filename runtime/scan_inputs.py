"""SCANS arguments -> the ordered list of scans to run: files as given, folders (NIfTI files, DICOM series), CSV lists.

- A path ending in .csv (any case) that is not a folder: a list with a header row naming a
  `scan` column and optionally a `patient_text` column (other columns are ignored).
  Relative scan paths are resolved against the CSV's folder. When the CSV has a
  `patient_text` column its value is the scan's patient text, an empty cell included.
  A missing or unreadable CSV is an error of the run, like a malformed one.
- A folder: its entries named *.nii / *.nii.gz (any case) that are not folders,
  sorted by name (not recursive), then every DICOM image series in it and in all its
  sub-folders, one scan each (preprocess/dicom_series.py: grouped by series UID,
  ordered by folder). Non-image DICOM objects and other files met on the way are
  counted in `skipped`, never read as images. A folder whose own name looks like a
  scan (`x.nii.gz/`) is not expanded: it is a scan, and fails as `not_a_file`.
- Anything else is a scan path, given as is: a NIfTI file, a DICOM multi-frame file,
  or (in a CSV) a folder holding one DICOM series. A missing file becomes an error row
  (`not_found`), not a failure of the whole run.

Problems with the list itself (a CSV that cannot be read or has no `scan` column, a
folder with no scans, no scans at all) raise MedblipError: the run does not start.
Messages name a CSV or folder by its position among the arguments, not its path
(directories may carry patient names), unless include_paths is set.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedblipError
from ..preprocess.dicom_series import describe_skipped, find_series
from ..preprocess.scans import DicomScan, NiftiScan, display_name, open_scan
from .scan_table import read_scan_table

SCAN_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class ScanItem:
    """One scan to run: its path, its own patient text (None: use the run's --patient-text), and for a DICOM series
    found in a folder its scan object (None: decided from the path when it is read)."""

    path: Path
    patient_text: str | None = None
    found: DicomScan | None = None

    @property
    def name(self) -> str:
        return self.found.name if self.found is not None else scan_name(self.path)

    @property
    def series(self) -> str | None:
        """Short hash of the series UID when it is known before reading (a series found in a folder)."""
        return self.found.series if self.found is not None else None

    def scan(self) -> NiftiScan | DicomScan:
        """The scan object to read (touches the disk for a bare path: call it where reading is allowed)."""
        return self.found if self.found is not None else open_scan(self.path)


def scan_name(path) -> str:
    """The file name reported for a scan (trailing slashes ignored)."""
    return display_name(path)


def looks_like_scan(name: str) -> bool:
    return name.lower().endswith(SCAN_SUFFIXES)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. permission denied on a parent: not a folder we can expand
        return False


def _describe(kind: str, arg: str, index: int, include_paths: bool) -> str:
    return f"{kind} {arg!r}" if include_paths else f"{kind} (argument {index + 1})"


def _folder(path: Path, index: int, include_paths: bool, skipped: Counter, on_file) -> list[ScanItem]:
    try:
        with os.scandir(path) as it:
            names = sorted(e.name for e in it if looks_like_scan(e.name) and not e.is_dir())
    except OSError as e:
        raise MedblipError(f"cannot list {_describe('folder', str(path), index, include_paths)}: "
                           f"{e.strerror or type(e).__name__}", code="bad_input") from None
    mine: Counter = Counter()
    series = find_series(path, mine, nifti_at_top=False, on_file=on_file)
    skipped.update(mine)
    if not names and not series:
        extra = f" ({describe_skipped(mine)})" if mine else ""
        raise MedblipError(f"{_describe('folder', str(path), index, include_paths)} has no NIfTI files and no DICOM "
                           f"image series{extra}", code="no_scans")
    return [ScanItem(path / n) for n in names] + [ScanItem(s.folder, None, DicomScan(s.folder, s)) for s in series]


def _csv(path: Path, index: int, include_paths: bool) -> list[ScanItem]:
    header, rows = read_scan_table(path, _describe("CSV", str(path), index, include_paths))
    has_text = "patient_text" in header
    return [ScanItem(r.path, r.cells["patient_text"] if has_text else None) for r in rows]


def expand_scans(args, include_paths: bool = False, skipped: Counter | None = None, on_file=None) -> list[ScanItem]:
    """SCANS arguments -> ScanItems in order (folders sorted, CSVs in row order).

    skipped: a Counter that receives the files met in folders and not run, by kind ("DICOMDIR",
    "non-DICOM file", ...). on_file(n): called after each file a folder walk examines (progress).
    """
    skipped = Counter() if skipped is None else skipped
    items: list[ScanItem] = []
    for index, arg in enumerate(args):
        path = Path(os.fsdecode(arg))
        if looks_like_scan(path.name):
            items.append(ScanItem(path))  # even if it is a folder: that scan fails as not_a_file
        elif path.suffix.lower() == ".csv" and not _is_dir(path):
            items.extend(_csv(path, index, include_paths))  # a missing CSV is an error too
        elif _is_dir(path):
            items.extend(_folder(path, index, include_paths, skipped, on_file))
        else:
            items.append(ScanItem(path))  # a file with another name, or missing: its row says why
    if not items:
        raise MedblipError("no scans given", code="no_scans")
    return items

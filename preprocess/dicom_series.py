"""Find the DICOM image series under a folder (or in one file): one walk, a few header tags per file.

Files are grouped by SeriesInstanceUID across the whole tree, so a series split over
several sub-folders is still one series; each file's header is read alone and dropped
(only its path and series are kept, so a folder of 10 000 files is never held in
memory). Non-image objects (DICOMDIR, structured reports, RT objects, presentation
states, anything without a pixel matrix) and files that are not DICOM are counted by
kind, never read as images.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .dicom_files import probe

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def uid_hash(uid: str) -> str:
    """The name a row gives a series: 12 hex digits of the SHA-256 of its UID (never the UID itself)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


@dataclass(frozen=True)
class DicomSeries:
    """One image series on disk: its files (sorted by path), the deepest folder holding them all (the file itself when
    one file was given), and its UID's hash."""

    folder: Path
    files: tuple[Path, ...]
    uid_hash: str | None  # None: its images carry no SeriesInstanceUID (grouped by folder instead)

    @property
    def name(self) -> str:
        """What rows call it: the folder's name (a multi-frame file given alone: the file's name)."""
        return self.folder.name or os.path.basename(os.path.abspath(self.folder))


def _walk(root: Path, skipped: Counter, nifti_at_top: bool):
    """Yield every regular file under `root` (sorted, symlinked folders not followed); count what cannot be listed."""

    def failed(_err: OSError) -> None:
        skipped["unreadable folder"] += 1

    for dirpath, dirnames, filenames in os.walk(root, onerror=failed):
        dirnames.sort()
        top = dirpath == os.fspath(root)  # os.walk yields the root first, spelled as given
        for name in sorted(filenames):
            if name.lower().endswith(NIFTI_SUFFIXES):
                if nifti_at_top or not top:
                    skipped["NIfTI file"] += 1
                continue
            yield Path(dirpath) / name


def find_series(root, skipped: Counter | None = None, *, nifti_at_top: bool = True,
                on_file=None) -> list[DicomSeries]:
    """Every image series in a folder tree or one file, in folder order. `skipped` counts the rest by kind.

    nifti_at_top: count NIfTI files directly in `root` as skipped (False when the caller reads them).
    on_file(n): called after each file examined (progress).
    """
    root = Path(root)
    skipped = Counter() if skipped is None else skipped
    files = [root] if os.path.isfile(root) else _walk(root, skipped, nifti_at_top)
    groups: dict[tuple, list[Path]] = {}
    for n, path in enumerate(files, start=1):
        kind, uid = probe(path)
        if kind == "image":
            groups.setdefault((uid,) if uid else (None, str(path.parent)), []).append(path)
        else:
            skipped[kind] += 1
        if on_file is not None:
            on_file(n)
    out = []
    for key, paths in groups.items():
        paths.sort()
        folder = Path(os.path.commonpath([str(p.parent) for p in paths])) if not os.path.isfile(root) else root
        out.append(DicomSeries(folder, tuple(paths), uid_hash(key[0]) if key[0] else None))
    out.sort(key=lambda s: (s.folder.parts, s.files[0].name))
    return out


def describe_skipped(skipped: Counter) -> str:
    """'1 DICOMDIR, 5 non-DICOM files, 2 structured reports' (kinds sorted, plural by count)."""
    parts = []
    for kind, n in sorted(skipped.items()):
        if n:
            parts.append(f"{n} {kind}{'' if n == 1 else 's'}")
    return ", ".join(parts)

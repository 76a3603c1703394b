"""The labelled cohort CSV: scan, label, optional patient_text and subgroup columns; one entry per scan, in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MedblipError
from ..runtime.scan_table import read_scan_table
from .labels import normalise


@dataclass
class CohortEntry:
    line: int  # the CSV line (header = 1)
    path: Path  # absolute or relative to the CSV's folder, resolved against it
    label: str  # AD, MCI or NC
    groups: dict = field(default_factory=dict)  # --group-by column -> value


@dataclass
class Cohort:
    csv: Path
    entries: list[CohortEntry]
    group_by: list[str]

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.entries]


def read_cohort(path: Path, group_by: list[str]) -> Cohort:
    """Read and check the cohort CSV; every problem is one `bad_csv` / `bad_label` error naming the row."""
    path = Path(path)
    what = f"cohort {path.name}"
    header, rows = read_scan_table(path, what, required=("scan", "label"), expected="scan,label[,patient_text,...]")
    missing = [g for g in group_by if g.lower() not in header]
    if missing:
        raise MedblipError(f"--group-by {missing[0]!r}: no such column in {path.name} (it has {', '.join(header)})",
                           code="usage")
    entries = [CohortEntry(r.line, r.path, normalise(r.cells["label"], f"{what} row {r.line}"),
                           {g: r.cells[g.lower()].strip() for g in group_by}) for r in rows]
    return Cohort(path, entries, list(group_by))

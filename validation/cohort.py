"""The labelled cohort CSV: scan, label, optional patient_text and subgroup columns; one entry per scan, in order."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MedblipError
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
    name = path.name
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise MedblipError(f"cohort {name} not found", code="bad_csv") from None
    except UnicodeDecodeError:
        raise MedblipError(f"cohort {name} is not UTF-8 text", code="bad_csv") from None
    except (OSError, csv.Error) as e:
        raise MedblipError(f"cannot read cohort {name}: {getattr(e, 'strerror', None) or e}", code="bad_csv") from None
    if not rows:
        raise MedblipError(f"cohort {name} is empty (a header row scan,label is needed)", code="bad_csv")
    header = [h.strip().lower() for h in rows[0]]
    for need in ("scan", "label"):
        if need not in header:
            raise MedblipError(f"cohort {name} has no {need!r} column (expected scan,label[,patient_text,...])",
                               code="bad_csv")
    missing = [g for g in group_by if g.lower() not in header]
    if missing:
        raise MedblipError(f"--group-by {missing[0]!r}: no such column in {name} (it has {', '.join(header)})",
                           code="usage")
    i_scan, i_label = header.index("scan"), header.index("label")
    i_groups = {g: header.index(g.lower()) for g in group_by}
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line (skipped by medblip-infer's CSV reader too)
        if len(row) != len(header):
            raise MedblipError(f"cohort {name} row {line} has {len(row)} cells, the header {len(header)}",
                               code="bad_csv")
        scan = row[i_scan].strip()
        if not scan:
            raise MedblipError(f"cohort {name} row {line} has an empty scan cell", code="bad_csv")
        p = Path(scan)
        entries.append(CohortEntry(line, p if p.is_absolute() else path.parent / p,
                                   normalise(row[i_label], f"cohort {name} row {line}"),
                                   {g: row[i].strip() for g, i in i_groups.items()}))
    if not entries:
        raise MedblipError(f"cohort {name} lists no scans", code="no_scans")
    return Cohort(path, entries, list(group_by))

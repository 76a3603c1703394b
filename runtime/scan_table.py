"""CSV lists of scans, read one way for every command: a header row with a `scan` column, then one scan per row.

medblip-infer's SCANS lists (runtime/scan_inputs.py) and medblip-eval's labelled cohorts (validation/cohort.py)
both come through `read_scan_table`: the same encodings (UTF-8, with or without a byte-order mark), the same
blank-line rule (skipped), the same cell-count and empty-cell checks, scan paths resolved against the CSV's
folder, and every problem one MedblipError (`bad_csv`, or `no_scans` for a list without rows) naming the row.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedblipError


@dataclass(frozen=True)
class ScanRow:
    line: int  # the CSV line (header = 1)
    path: Path  # as written when absolute, else resolved against the CSV's folder
    cells: dict  # lower-cased column name -> cell, as written


def read_scan_table(path: Path, what: str, required: tuple[str, ...] = ("scan",),
                    expected: str = "scan,patient_text") -> tuple[list[str], list[ScanRow]]:
    """(lower-cased header, rows) of the CSV at `path`; `what` names it in messages ("cohort x.csv", "CSV
    (argument 2)"), `required` are the columns it must have, `expected` the header the messages suggest."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise MedblipError(f"{what} is not UTF-8 text", code="bad_csv") from None
    except csv.Error as e:
        raise MedblipError(f"{what} is not valid CSV: {e}", code="bad_csv") from None
    except FileNotFoundError:
        raise MedblipError(f"{what} not found", code="bad_csv") from None
    except OSError as e:
        raise MedblipError(f"cannot read {what}: {e.strerror or type(e).__name__}", code="bad_csv") from None
    if not rows:
        raise MedblipError(f"{what} is empty (a header row {expected} is needed)", code="bad_csv")
    header = [h.strip().lower() for h in rows[0]]
    for need in required:
        if need not in header:
            raise MedblipError(f"{what} has no {need!r} column in its header row (expected {expected})",
                               code="bad_csv")
    if len(set(header)) != len(header):
        raise MedblipError(f"{what} has repeated column names in its header row", code="bad_csv")
    i_scan = header.index("scan")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            raise MedblipError(f"{what} row {line} has {len(row)} cells, the header has {len(header)}",
                               code="bad_csv")
        scan = row[i_scan].strip()
        if not scan:
            raise MedblipError(f"{what} row {line} has an empty scan cell", code="bad_csv")
        p = Path(scan)
        out.append(ScanRow(line, p if p.is_absolute() else path.parent / p, dict(zip(header, row))))
    if not out:
        raise MedblipError(f"{what} lists no scans", code="no_scans")
    return header, out

"""Each bundle's result rows for the cohort: run the bundle through medblip-infer's cohort runner, or read rows it
wrote before (--rows); then one row per cohort entry, an error row where a scan failed or has no row."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import MedblipError
from ..runtime.cohort import InferOptions, run_infer
from ..runtime.results_io import abspath, error_row
from ..runtime.scan_inputs import scan_name
from .cohort import Cohort


def run_bundle(cohort: Cohort, bundle: Path, rows_out: Path, backend: str, device: str, workers: int,
               timeout_s: float) -> list[dict]:
    """medblip-infer over the cohort CSV (progress on stderr), rows with the decision detail and paths, written to
    `rows_out` as they come (nothing lost if the run stops) -> the rows."""
    rows_out.parent.mkdir(parents=True, exist_ok=True)
    run_infer(InferOptions(scans=[os.fsdecode(cohort.csv)], bundle=bundle, backend=backend, device=device,
                           out=rows_out, workers=workers, timeout_s=timeout_s, include_paths=True,
                           decision_detail=True))
    return read_rows(rows_out)


def read_rows(path: Path) -> list[dict]:
    """A medblip-infer results.jsonl -> its rows."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MedblipError(f"--rows {path.name} not found", code="bad_rows") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MedblipError(f"--rows {path.name}: cannot read ({getattr(e, 'strerror', None) or e})",
                           code="bad_rows") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("scan"), str):
            raise MedblipError(f"--rows {path.name} line {n} is not a medblip-infer result row "
                               f"(a JSON Lines file from medblip-infer --out results.jsonl)", code="bad_rows")
        if "error" not in row and "log_likelihoods" not in row:
            raise MedblipError(f"--rows {path.name} line {n} has no log_likelihoods (a --question row?)",
                               code="bad_rows")
        rows.append(row)
    return rows


def match_rows(cohort: Cohort, rows: list[dict], source: str) -> list[dict]:
    """One row per cohort entry: in order when the rows name the cohort's scans one for one (medblip-infer run on the
    cohort CSV writes them so); else by the row's `path` where it has one (--include-paths), else by scan file name
    (which must then be unique in the cohort). An entry without a row gets an error row `no_row`."""
    names = [scan_name(e.path) for e in cohort.entries]
    if len(rows) == len(names) and all(r["scan"] == n and r.get("path") in (None, abspath(e.path))
                                       for r, n, e in zip(rows, names, cohort.entries)):
        return list(rows)
    by_path, by_name = {}, {}
    for r in rows:
        if r.get("path"):
            by_path.setdefault(r["path"], []).append(r)
        by_name.setdefault(r["scan"], []).append(r)
    out, used = [], set()
    for e, name in zip(cohort.entries, names):
        found = [r for r in by_path.get(abspath(e.path), []) if id(r) not in used]
        if not found and names.count(name) == 1:
            found = [r for r in by_name.get(name, []) if id(r) not in used]
        if found:
            used.add(id(found[0]))
            out.append(found[0])
        else:
            why = (" (several cohort scans have this file name: write the rows with medblip-infer --include-paths)"
                   if names.count(name) > 1 else "")
            out.append(error_row(name, None, "no_row", f"{source} has no row for cohort row {e.line} ({name}){why}"))
    return out

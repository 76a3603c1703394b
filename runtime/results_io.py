"""Result rows of a cohort run: JSON Lines / CSV sinks that write whole rows, and resuming from them."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..bundle.format import sha256_file
from ..errors import MedblipError, ScanError
from ..model.prompts import LABELS

# ------------------------------------------------------------------ rows


def abspath(path: Path) -> str:
    return os.path.abspath(os.fsdecode(path))


def scrub(message: str, path: Path) -> str:
    """Remove the scan's directories from a message (defence in depth: scan errors already use the name only)."""
    given = os.fsdecode(path)
    for full in (abspath(path), given):
        parent = os.path.dirname(full.rstrip(os.sep))
        if parent and parent not in (os.sep, "."):
            message = message.replace(parent + os.sep, "")
    return message


def sha_or_none(path: Path) -> str | None:
    """SHA-256 of a regular file, or None (missing, folder, FIFO, unreadable): never blocks on a FIFO."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return sha256_file(path)
    except OSError:
        return None


def digest_or_none(scan) -> str | None:
    """SHA-256 of a scan object (preprocess.scans), or None when it cannot be read (missing, folder, FIFO, ...)."""
    try:
        return scan.sha256()
    except (OSError, ScanError):
        return None


def error_row(name: str, sha: str | None, code: str, message: str, series: str | None = None) -> dict:
    """An error row; `series` (a DICOM series' UID hash) only when known."""
    row = {"scan": name, "scan_sha256": sha}
    if series:
        row["series"] = series
    row["error"] = {"code": code, "message": message}
    return row


def exception_row(e: BaseException, name: str, path, digest: Callable[[], str | None] = lambda: None,
                  series: str | None = None, where: str = "while reading") -> dict:
    """The one conversion of a failure into a scan's error row: a ScanError keeps its code; MemoryError is
    out_of_memory and OSError unreadable; anything else is internal_error naming the exception's type and
    `where` it happened. Messages are scrubbed of the scan's directories; `digest()` gives the scan's SHA-256
    where the scan itself was read (a scan or memory error)."""
    if isinstance(e, ScanError):
        return error_row(name, digest(), e.code, scrub(str(e), path), series)
    if isinstance(e, MemoryError):
        return error_row(name, digest(), "out_of_memory", "not enough memory to read and preprocess this scan", series)
    if isinstance(e, OSError):  # e.g. the file vanished between reading and hashing
        return error_row(name, None, "unreadable", f"cannot read {name}: {e.strerror or e}", series)
    return error_row(name, None, "internal_error", scrub(f"unexpected {type(e).__name__} {where}: {e}", path), series)


# Columns only some runs have: a calibrated bundle's diagnosis, medblip-infer --decision-detail's fields
CALIBRATED_COLUMNS = ["calibration", "cal_label"] + [f"cal_prob_{k}" for k in LABELS]
DETAIL_COLUMNS = [f"ntok_{k}" for k in LABELS] + ["greedy_answer"]


def _csv_columns(include_paths: bool, extra: list[str] = ()) -> list[str]:
    return (["scan", "scan_sha256", "series"] + (["path"] if include_paths else []) + ["orientation", "label"]
            + [f"prob_{k}" for k in LABELS] + ["answer", "question", "task"] + [f"ll_{k}" for k in LABELS]
            + ["backend_vision", "backend_llm", "precision_vision", "precision_llm", "random_weights"]
            + ["t_load", "t_preprocess", "t_vision", "t_llm", "t_total", "warnings", "error_code", "error_message"]
            + ["conform_spec", "conform_from", "ood_distance", "ood_percentile", "qc"] + list(extra))


_FLAT_PREFIX = {"probabilities": "prob_", "log_likelihoods": "ll_", "timings_ms": "t_", "backend": "backend_",
                "precision": "precision_", "error": "error_", "answer_tokens": "ntok_",
                "conform": "conform_", "ood": "ood_"}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):  # the qc block: one JSON cell
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, (list, tuple)):
        value = "; ".join(str(v) for v in value)
    return " ".join(str(value).splitlines())  # one record per line, always


def flatten_row(row: dict) -> dict:
    """A result/error row -> flat {column: str} for CSV."""
    flat = {}
    for key, value in row.items():
        if key == "calibrated" and isinstance(value, dict):
            flat["calibration"], flat["cal_label"] = _cell(value.get("calibration")), _cell(value.get("label"))
            for k, v in (value.get("probabilities") or {}).items():
                flat[f"cal_prob_{k}"] = _cell(v)
        elif key in _FLAT_PREFIX and isinstance(value, dict):
            for k, v in value.items():
                flat[_FLAT_PREFIX[key] + k] = _cell(v)
        else:
            flat[key] = _cell(value)
    return flat


class Sink:
    """Where rows go. `emit(row)` writes one row whole; `rows` keeps the texts written (for resume)."""

    def emit(self, row: dict) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class StdoutSink(Sink):
    def emit(self, row: dict) -> str:
        text = json.dumps(row) + "\n"
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. `medblip-infer ... | head -1`: stop, without a traceback at exit
            sys.stdout = open(os.devnull, "w")
            raise MedblipError("stdout was closed by the reader; stopped", code="output_closed") from None
        return text


class FileSink(Sink):
    """Appends whole lines with one write() each, then fsync."""

    def __init__(self, path: Path, fmt: str, include_paths: bool, extra_columns: list[str] = ()):
        self.path, self.fmt = path, fmt
        self.columns = _csv_columns(include_paths, extra_columns)
        self.fd: int | None = None

    def header(self) -> str:
        return self.serialize_values(self.columns) if self.fmt == "csv" else ""

    @staticmethod
    def serialize_values(values) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()

    def serialize(self, row: dict) -> str:
        if self.fmt == "jsonl":
            return json.dumps(row) + "\n"
        flat = flatten_row(row)
        return self.serialize_values([flat.get(c, "") for c in self.columns])

    def open_append(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write_text(self, text: str) -> None:
        data = text.encode("utf-8", "surrogateescape")
        while data:  # one write() for a whole row in practice; loop only on a short write
            n = os.write(self.fd, data)
            data = data[n:]
        os.fsync(self.fd)

    def emit(self, row: dict) -> str:
        text = self.serialize(row)
        self.write_text(text)
        return text

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def out_format(path: Path) -> str:
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


# ------------------------------------------------------------------ resume


@dataclass
class OldRow:
    text: str  # the row's text as it will be written: one whole line
    path: str | None
    name: str | None
    sha: str | None
    failed: bool
    series: str | None = None  # a DICOM series' UID hash: two series may share a folder (path)


def read_old_rows(sink: FileSink) -> tuple[list[OldRow], bool]:
    """Rows already in --out -> (rows, file needs rewriting before appending). Cuts off a partial last line."""
    path = sink.path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    except OSError as e:
        raise MedblipError(f"--resume: cannot read {path.name}: {e.strerror or e}", code="bad_resume_file") from None
    end = data.rfind(b"\n") + 1
    if end < len(data):  # an interrupted write: drop the incomplete line
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    text = data[:end].decode("utf-8", "surrogateescape")
    rows: list[OldRow] = []
    if sink.fmt == "jsonl":
        for n, line in enumerate(text.split("\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("scan"), str):
                raise MedblipError(f"--resume: {path.name} line {n} is not a result row; "
                                   f"give another --out or run without --resume", code="bad_resume_file")
            rows.append(OldRow(line + "\n", row.get("path"), row["scan"], row.get("scan_sha256"), "error" in row,
                               row.get("series")))
    elif text:
        try:
            records = list(csv.reader(io.StringIO(text, newline="")))
        except csv.Error as e:
            raise MedblipError(f"--resume: {path.name} is not valid CSV ({e})", code="bad_resume_file") from None
        header = records[0]
        if "scan" not in header:
            raise MedblipError(f"--resume: {path.name} has no 'scan' column; give another --out or run without "
                               f"--resume", code="bad_resume_file")
        for n, rec in enumerate(records[1:], start=2):
            if not any(rec):
                continue
            if len(rec) != len(header):
                raise MedblipError(f"--resume: {path.name} record {n} has {len(rec)} cells, its header {len(header)}",
                                   code="bad_resume_file")
            d = dict(zip(header, rec))
            rows.append(OldRow(sink.serialize_values([d.get(c, "") for c in sink.columns]), d.get("path") or None,
                                d["scan"], d.get("scan_sha256") or None, bool(d.get("error_code")),
                                d.get("series") or None))
    rewrite = (sink.header() if rows or text else "") + "".join(r.text for r in rows) != text
    return rows, rewrite


class ResumeIndex:
    """Old rows by (path, series) and by (name, sha); `reserve` hands each row to at most one scan."""

    def __init__(self, rows: list[OldRow]):
        self.by_path: dict[str, deque] = {}
        self.by_key: dict[tuple, deque] = {}
        for i, r in enumerate(rows):
            if r.path:
                self.by_path.setdefault((r.path, r.series), deque()).append(i)
            self.by_key.setdefault((r.name, r.sha), deque()).append(i)
        self.used: set[int] = set()
        self.lock = threading.Lock()

    def reserve(self, path: str, name: str, sha: str | None, series: str | None = None) -> int | None:
        with self.lock:
            for q in (self.by_path.get((path, series)), self.by_key.get((name, sha))):
                while q:
                    i = q.popleft()
                    if i not in self.used:
                        self.used.add(i)
                        return i
        return None


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8", "surrogateescape"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass

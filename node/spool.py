"""The node's on-disk state: received instances, results waiting to be sent, and a ledger of what was done.

    SPOOL/incoming/<study>/<series>/<instance>.dcm   every instance, written before it is acknowledged
    SPOOL/outbox/<job>.dcm + <job>.json              an SR (and where/when) waiting for its destination's ack
    SPOOL/ledger.jsonl                               one line per event: {"event": "done", "job", "study",
                                                     "series": [...]} once a job's result is in the outbox (or
                                                     it failed), {"event": "sent", "job", "to"} per destination
                                                     that acknowledged it, {"event": "acked", "job"} when all did
    SPOOL/tmp/                                       partial writes, removed at start

Folder and file names are hashes of the UIDs (uid_hash), never the UIDs. Every file is written to tmp/,
fsynced and renamed into place; ledger lines are appended whole and fsynced; a partial last line (a
crash inside the write) is dropped on start. So after a crash at any point, on restart:
- an instance is either absent (never acknowledged: the sender resends it) or complete;
- a series not in any "done" line is run again (with the same job key, so the same SR UIDs);
- an outbox SR not in any "sent" line is sent again; the PACS stores an SR UID once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..preprocess.dicom_series import uid_hash


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@dataclass
class OutboxItem:
    job: str
    sr: Path
    meta: dict  # {"study": key, "last_instance": unix time, "finding": bool}


class Spool:
    def __init__(self, root: Path, min_free_mb: float = 0.0):
        self.root = Path(root)
        self.incoming, self.outbox, self.tmp = self.root / "incoming", self.root / "outbox", self.root / "tmp"
        self.ledger_path = self.root / "ledger.jsonl"
        self.min_free_mb = min_free_mb
        self.lock = threading.Lock()
        for d in (self.incoming, self.outbox, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.done_series: set[tuple[str, str]] = set()  # (study, series)
        self.sent: set[tuple[str, str]] = set()  # (job, destination)
        self.acked: set[str] = set()  # jobs acknowledged by every destination
        self.done_jobs: set[str] = set()
        self._read_ledger()
        self._ledger = open(self.ledger_path, "ab")

    # -- ledger --------------------------------------------------------------------------------

    def _read_ledger(self) -> None:
        try:
            data = self.ledger_path.read_bytes()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut by a crash: never acted on, drop it
            with open(self.ledger_path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "done":
                self.done_jobs.add(event["job"])
                for s in event.get("series", []):
                    self.done_series.add((event["study"], s))
            elif event.get("event") == "sent":
                self.sent.add((event["job"], event.get("to", "")))
            elif event.get("event") == "acked":
                self.acked.add(event["job"])

    def record(self, event: dict) -> None:
        """Append one ledger line (whole, fsynced) and apply it."""
        text = (json.dumps({**event, "t": round(time.time(), 3)}) + "\n").encode()
        with self.lock:
            self._ledger.write(text)
            self._ledger.flush()
            os.fsync(self._ledger.fileno())
            if event["event"] == "done":
                self.done_jobs.add(event["job"])
                self.done_series.update((event["study"], s) for s in event["series"])
            elif event["event"] == "sent":
                self.sent.add((event["job"], event.get("to", "")))
            elif event["event"] == "acked":
                self.acked.add(event["job"])

    def close(self) -> None:
        with self.lock:
            self._ledger.close()

    # -- instances -----------------------------------------------------------------------------

    def has_room(self) -> bool:
        if self.min_free_mb <= 0:
            return True
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize >= self.min_free_mb * 2**20

    def _write_atomic(self, dst: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dst)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(dst.parent)

    def store_instance(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> tuple[str, str]:
        """Write one received instance (a whole Part 10 file) durably; -> (study key, series key). Raises OSError."""
        study, series = uid_hash(study_uid), uid_hash(series_uid)
        self._write_atomic(self.incoming / study / series / f"{uid_hash(sop_uid)}.dcm", data)
        return study, series

    def studies(self) -> list[str]:
        return sorted(p.name for p in self.incoming.iterdir() if p.is_dir())

    def series_of(self, study: str) -> list[tuple[str, list[Path]]]:
        """(series key, its files) of a study, in order of arrival (the folder's creation order by mtime)."""
        folder = self.incoming / study
        out = []
        for d in folder.iterdir() if folder.is_dir() else []:
            if d.is_dir():
                files = sorted(d.glob("*.dcm"))
                if files:
                    out.append((d.name, files, min(f.stat().st_mtime_ns for f in files)))
        out.sort(key=lambda t: (t[2], t[0]))
        return [(k, files) for k, files, _ in out]

    def pending_series(self, study: str) -> list[tuple[str, list[Path]]]:
        """Series of a study not yet answered."""
        return [(k, f) for k, f in self.series_of(study) if (study, k) not in self.done_series]

    def unanswered_studies(self) -> list[str]:
        return [s for s in self.studies() if self.pending_series(s)]

    def last_instance_time(self, study: str) -> float:
        folder = self.incoming / study
        times = [f.stat().st_mtime for f in folder.glob("*/*.dcm")]
        return max(times) if times else time.time()

    # -- outbox --------------------------------------------------------------------------------

    def put_result(self, job: str, sr_bytes: bytes, meta: dict) -> None:
        self._write_atomic(self.outbox / f"{job}.dcm", sr_bytes)
        self._write_atomic(self.outbox / f"{job}.json", json.dumps(meta).encode())

    def waiting(self, destinations: list[str] | None = None) -> list[OutboxItem]:
        """Results written and not yet acknowledged, oldest first."""
        out = []
        for meta_path in sorted(self.outbox.glob("*.json"), key=lambda p: p.stat().st_mtime_ns):
            job = meta_path.stem
            sr = self.outbox / f"{job}.dcm"
            if job in self.acked or not sr.exists():
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
            out.append(OutboxItem(job, sr, meta))
        return out

    def mark_sent(self, item: OutboxItem) -> None:
        self.record({"event": "acked", "job": item.job})
        for p in (item.sr, item.sr.with_suffix(".json")):
            try:
                p.unlink()
            except OSError:
                pass

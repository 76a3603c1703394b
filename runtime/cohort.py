"""Many scans: inputs (files, folders, CSV), prefetching, batching, JSON Lines / CSV output, resume.

How a run goes
--------------
The SCANS arguments are expanded first (`scan_inputs.expand_scans`), so a bad CSV stops
the run before the bundle is loaded. A pool of `workers` reader threads then reads and
preprocesses scans ahead of the model (at most `max_batch + workers` scans are read and
not yet used, which bounds memory at about that many 224^3 float32 volumes). The main
thread takes finished scans in input order, puts consecutive ready ones into one vision
batch of up to `pipe.vision.max_batch`, runs the LLM per scan, and writes each row whole.

Timeouts: threads, abandoned (not processes)
--------------------------------------------
Each scan gets `timeout_s` seconds of reading + preprocessing, counted from the moment
a reader thread starts it (not from when it was queued). Past that, the scan gets an
error row with code `timeout` and the run goes on. A thread stuck in a read cannot be
killed, so it is abandoned instead: reader threads are daemon threads started per
scan, the stuck one stops counting against `workers` (a new reader takes its place),
whatever it returns later is dropped, and a daemon thread never holds up the process
exit. Threads rather than processes because the model input is a 45 MB tensor per
scan at 224^3 (processes would copy or share it through /dev/shm, often 64 MB in
containers), because numpy, zlib and torch release the GIL for the heavy parts, and
because it keeps one address space (the loader can be patched in tests). The cost:
an abandoned scan that is busy computing, rather than blocked, keeps its CPU and
memory until it finishes.

Exiting cleanly with daemon threads around: a daemon thread that is inside torch code
(or frees a tensor) while the interpreter exits is killed there, and C++ aborts the
process ("terminate called without an active exception"). So a reader never drops
the last reference to a tensor (results are handed to the main thread, late results
of abandoned readers are kept for it to free), an abandoned reader never starts the
torch preprocessing, and whenever the loop ends, Ctrl-C included, no reader starts
torch work any more, those inside it are joined (it is bounded compute, well under a
second per scan), and every volume still held is freed by the main thread. Only
readers stuck in a read stay behind, holding no tensor.

Output and resume
-----------------
Rows go to stdout (JSON Lines), or with `--out` to a .jsonl or .csv file (CSV: one
record per line, probabilities as prob_AD/prob_MCI/prob_NC, log-likelihoods as
ll_*, timings as t_load/t_preprocess/t_vision/t_llm/t_total, the error as
error_code/error_message). Each row is one write() of whole lines followed by
fsync, so an interrupted run leaves only complete rows (a partial last line from a
crash is cut off when resuming).

`--resume` reads the rows already in `--out` and skips every scan that has one, a
result or an error row: a row matches a scan by its `path` when the row has one
(written with --include-paths), else by file name + SHA-256 of the contents (an error
row without a SHA, e.g. not_found or timeout, matches a scan of that name whose file
still cannot be hashed; once the file is readable it runs again). New rows are
appended as they come; at the end the file is rewritten (temporary file + rename)
only if needed so that it holds exactly what an uninterrupted run gives: one row per
scan, in input order. Rows that match no scan of this run are dropped then (said on
stderr).

Privacy
-------
Rows and messages name a scan by its file name and SHA-256 only; with `include_paths`
rows get a `path` (absolute, symlinks not resolved). Patient text is never written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MedblipError, ScanError
from ..model.prompts import LABELS
from . import pipeline as _pipeline
from .bundle import sha256_file
from .scan_inputs import ScanItem, expand_scans, scan_name


@dataclass
class InferOptions:
    scans: list
    bundle: Path
    backend: str = "auto"
    device: str = "cpu"
    precision: str | None = None
    patient_text: str = ""
    question: str | None = None
    out: Path | None = None
    resume: bool = False
    timeout_s: float = 300.0
    workers: int = 2
    include_paths: bool = False


# ------------------------------------------------------------------ rows


def _abspath(path: Path) -> str:
    return os.path.abspath(os.fsdecode(path))


def _scrub(message: str, path: Path) -> str:
    """Remove the scan's directories from a message (defence in depth: scan errors already use the name only)."""
    given = os.fsdecode(path)
    for full in (_abspath(path), given):
        parent = os.path.dirname(full.rstrip(os.sep))
        if parent and parent not in (os.sep, "."):
            message = message.replace(parent + os.sep, "")
    return message


def _sha_or_none(path: Path) -> str | None:
    """SHA-256 of a regular file, or None (missing, folder, FIFO, unreadable): never blocks on a FIFO."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return sha256_file(path)
    except OSError:
        return None


def error_row(name: str, sha: str | None, code: str, message: str) -> dict:
    return {"scan": name, "scan_sha256": sha, "error": {"code": code, "message": message}}


def _csv_columns(include_paths: bool) -> list[str]:
    return (["scan", "scan_sha256"] + (["path"] if include_paths else []) + ["label"]
            + [f"prob_{k}" for k in LABELS] + ["answer", "question", "task"] + [f"ll_{k}" for k in LABELS]
            + ["backend_vision", "backend_llm", "precision_vision", "precision_llm", "random_weights"]
            + ["t_load", "t_preprocess", "t_vision", "t_llm", "t_total", "warnings", "error_code", "error_message"])


_FLAT_PREFIX = {"probabilities": "prob_", "log_likelihoods": "ll_", "timings_ms": "t_", "backend": "backend_",
                "precision": "precision_", "error": "error_"}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        value = "; ".join(str(v) for v in value)
    return " ".join(str(value).splitlines())  # one record per line, always


def flatten_row(row: dict) -> dict:
    """A result/error row -> flat {column: str} for CSV."""
    flat = {}
    for key, value in row.items():
        if key in _FLAT_PREFIX and isinstance(value, dict):
            for k, v in value.items():
                flat[_FLAT_PREFIX[key] + k] = _cell(v)
        else:
            flat[key] = _cell(value)
    return flat


class _Sink:
    """Where rows go. `emit(row)` writes one row whole; `rows` keeps the texts written (for resume)."""

    def emit(self, row: dict) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _StdoutSink(_Sink):
    def emit(self, row: dict) -> str:
        text = json.dumps(row) + "\n"
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. `medblip-infer ... | head -1`: stop, without a traceback at exit
            sys.stdout = open(os.devnull, "w")
            raise MedblipError("stdout was closed by the reader; stopped", code="output_closed") from None
        return text


class _FileSink(_Sink):
    """Appends whole lines with one write() each, then fsync."""

    def __init__(self, path: Path, fmt: str, include_paths: bool):
        self.path, self.fmt = path, fmt
        self.columns = _csv_columns(include_paths)
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


def _out_format(path: Path) -> str:
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


# ------------------------------------------------------------------ resume


@dataclass
class _OldRow:
    text: str  # the row's text as it will be written: one whole line
    path: str | None
    name: str | None
    sha: str | None
    failed: bool


def _read_old_rows(sink: _FileSink) -> tuple[list[_OldRow], bool]:
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
    rows: list[_OldRow] = []
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
            rows.append(_OldRow(line + "\n", row.get("path"), row["scan"], row.get("scan_sha256"), "error" in row))
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
            rows.append(_OldRow(sink.serialize_values([d.get(c, "") for c in sink.columns]), d.get("path") or None,
                                d["scan"], d.get("scan_sha256") or None, bool(d.get("error_code"))))
    rewrite = (sink.header() if rows or text else "") + "".join(r.text for r in rows) != text
    return rows, rewrite


class _ResumeIndex:
    """Old rows by path and by (name, sha); `reserve` hands each row to at most one scan."""

    def __init__(self, rows: list[_OldRow]):
        self.by_path: dict[str, deque] = {}
        self.by_key: dict[tuple, deque] = {}
        for i, r in enumerate(rows):
            if r.path:
                self.by_path.setdefault(r.path, deque()).append(i)
            self.by_key.setdefault((r.name, r.sha), deque()).append(i)
        self.used: set[int] = set()
        self.lock = threading.Lock()

    def reserve(self, path: str, name: str, sha: str | None) -> int | None:
        with self.lock:
            for q in (self.by_path.get(path), self.by_key.get((name, sha))):
                while q:
                    i = q.popleft()
                    if i not in self.used:
                        self.used.add(i)
                        return i
        return None


# ------------------------------------------------------------------ prefetching


class _Task:
    __slots__ = ("index", "item", "started", "done", "result", "abandoned", "released", "lock", "thread", "in_torch")

    def __init__(self, index: int, item: ScanItem):
        self.index, self.item = index, item
        self.started: float | None = None
        self.done = threading.Event()
        self.result = None  # ("prepared", PreparedScan) | ("error", row) | ("skip", old row index)
        self.abandoned = False
        self.released = False
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.in_torch = False  # its reader has gone on to the (torch) preprocessing


class _Prefetcher:
    """Runs `work(task)` on daemon threads: at most `workers` at once, at most `ahead` not yet consumed."""

    def __init__(self, tasks: list[_Task], work, workers: int, ahead: int, timeout_s: float):
        self.tasks, self.work, self.timeout_s = tasks, work, timeout_s
        self.permits = threading.Semaphore(workers)
        self.slots = threading.Semaphore(ahead)
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.abandoned: list[_Task] = []
        self.graveyard: list = []  # late results of abandoned readers: freed by the main thread, not theirs
        self.feeder = threading.Thread(target=self._feed, name="medblip-feeder", daemon=True)

    def start(self) -> "_Prefetcher":
        self.feeder.start()
        return self

    def _acquire(self, sem: threading.Semaphore) -> bool:
        while not self.stopped.is_set():
            if sem.acquire(timeout=0.1):
                return True
        return False

    def _feed(self) -> None:
        for task in self.tasks:
            if not (self._acquire(self.slots) and self._acquire(self.permits)):
                return
            with self.lock:  # close() sees every reader started before it stopped the feeder
                if self.stopped.is_set():
                    return
                task.thread = threading.Thread(target=self._run, args=(task,), name=f"medblip-read-{task.index}",
                                               daemon=True)
                task.thread.start()

    def _release(self, task: _Task) -> None:
        with task.lock:
            if not task.released:
                task.released = True
                self.permits.release()

    def _run(self, task: _Task) -> None:
        task.started = time.monotonic()
        try:
            result = self.work(task)
        except BaseException as e:  # never lose a task: an unexpected failure is its error row
            result = ("error", error_row(task.item.name, None, "internal_error",
                                         _scrub(f"unexpected {type(e).__name__} while reading: {e}", task.item.path)))
        # From here on this thread holds no reference to a tensor: the last reference to a volume must
        # never be dropped by a reader, since a daemon thread that releases the GIL inside torch's
        # deallocator while the interpreter exits is killed there, and C++ aborts the process.
        with task.lock:
            if task.abandoned:
                self.graveyard.append(result)
            else:
                task.result = result
            result = None
            task.done.set()
        self._release(task)

    def wait(self, task: _Task) -> bool:
        """Block until `task` is done (True) or over its time limit (False: abandoned, its reader replaced)."""
        while True:
            started = task.started
            remaining = 0.05 if started is None else started + self.timeout_s - time.monotonic()
            if task.done.wait(max(0.0, min(remaining, 0.5))):
                return True
            if started is not None and time.monotonic() >= started + self.timeout_s:
                with task.lock:
                    if task.done.is_set():
                        return True
                    task.abandoned = True
                self.abandoned.append(task)
                self._release(task)  # a new reader may start in its place
                return False

    def consumed(self, task: _Task) -> None:
        task.result = None  # free the volume
        self.slots.release()

    def close(self) -> None:
        """Start no more readers and no more preprocessing; wait for the readers inside torch code; free
        every volume here, in the calling (main) thread.

        Readers still reading are not waited for (one may be stuck): they hold no tensor, and
        finding the run stopped they skip the torch preprocessing. See the module docstring.
        """
        with self.lock:
            self.stopped.set()
        for task in self.tasks:
            thread = task.thread
            if thread is not None and thread.is_alive() and (task.in_torch or task.done.is_set()):
                thread.join(60.0 if not task.done.is_set() else 5.0)
        if self.feeder.is_alive():
            self.feeder.join(5.0)
        for task in self.tasks:
            task.result = None
        self.graveyard.clear()


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


def _prepare(pipe, path: Path, sha: str | None, task: _Task, stop: threading.Event):
    """`Pipeline.prepare`, step by step: reuses a SHA-256 already computed, and skips the preprocessing
    (torch code) of a scan abandoned for its time limit while it was being read."""
    t0 = time.perf_counter()
    loaded = _pipeline.load_volume(path)  # looked up at call time: tests wrap it to simulate a hung reader
    load_ms = _ms(t0)
    digest = sha or sha256_file(path)
    with task.lock:
        if task.abandoned or stop.is_set():
            return None  # dropped anyway: do not start torch work that nobody waits for
        task.in_torch = True
    t1 = time.perf_counter()
    volume = _pipeline.to_model_input(loaded.array, pipe.spec.size)  # [1,1,S,S,S]
    return _pipeline.PreparedScan(scan_name(path), digest, volume, list(loaded.warnings),
                                  {"load": load_ms, "preprocess": _ms(t1)})


# ------------------------------------------------------------------ progress


class _Progress:
    """A one-line bar on stderr when it is a terminal and there is more than one scan; always a final count line."""

    def __init__(self, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.bar = total > 1 and getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.done = self.failed = self.timeouts = self.skipped = 0

    def update(self, *, failed: bool = False, timeout: bool = False, skipped: bool = False) -> None:
        self.done += 1
        self.failed += failed
        self.timeouts += timeout
        self.skipped += skipped
        now = time.monotonic()
        if self.bar and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            width = 30
            fill = int(width * self.done / self.total)
            rate = self.done / max(now - self.t0, 1e-9)
            self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} scans, "
                              f"{self.failed} failed, {rate:.1f}/s ")
            self.stream.flush()

    def finish(self) -> None:
        if self.bar:
            self.stream.write("\r\033[K")
        parts = [f"{self.total} scan{'s' if self.total != 1 else ''}: {self.total - self.failed} ok",
                 f"{self.failed} failed" + (f" ({self.timeouts} timed out)" if self.timeouts else "")]
        if self.skipped:
            parts.append(f"{self.skipped} already in the output")
        self.stream.write(", ".join(parts) + f", {time.monotonic() - self.t0:.1f} s\n")
        self.stream.flush()


# ------------------------------------------------------------------ the run


def _check(opts: InferOptions) -> None:
    if opts.workers < 1:
        raise MedblipError("--workers must be at least 1", code="usage")
    if not opts.timeout_s > 0:
        raise MedblipError("--timeout must be more than 0 seconds", code="usage")
    if opts.resume and opts.out is None:
        raise MedblipError("--resume needs --out (the results file to continue)", code="usage")


def run_infer(opts: InferOptions) -> int:
    """Run every scan; returns the number of scans whose row is an error (resumed rows included)."""
    _check(opts)
    items = expand_scans(opts.scans, opts.include_paths)

    pipe = _pipeline.Pipeline.from_bundle(opts.bundle, backend=opts.backend, device=opts.device,
                                          precision=opts.precision)
    print(f"backend: vision={pipe.chosen['vision']} llm={pipe.chosen['llm']}", file=sys.stderr, flush=True)

    # -- the sink, and what --resume finds there
    old_rows: list[_OldRow] = []
    index: _ResumeIndex | None = None
    if opts.out is None:
        sink: _Sink = _StdoutSink()
    else:
        out = Path(opts.out)
        sink = _FileSink(out, _out_format(out), opts.include_paths)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if opts.resume:
                old_rows, rewrite = _read_old_rows(sink)
                if rewrite:
                    _replace(out, sink.header() + "".join(r.text for r in old_rows))
                index = _ResumeIndex(old_rows)
            if not opts.resume or not out.exists() or out.stat().st_size == 0:
                _replace(out, sink.header())
            sink.open_append()
        except OSError as e:
            raise MedblipError(f"cannot write {out.name}: {e.strerror or e}", code="bad_output") from None

    def work(task: _Task):
        item = task.item
        sha = None
        if index is not None:
            sha = _sha_or_none(item.path)
            found = index.reserve(_abspath(item.path), item.name, sha)
            if found is not None:
                return ("skip", found)
        try:
            return ("prepared", _prepare(pipe, item.path, sha, task, prefetch.stopped))
        except ScanError as e:
            row = error_row(item.name, sha or _sha_or_none(item.path), e.code, _scrub(str(e), item.path))
        except MemoryError:
            row = error_row(item.name, sha or _sha_or_none(item.path), "out_of_memory",
                            "not enough memory to read and preprocess this scan")
        except OSError as e:  # e.g. the file vanished between reading and hashing
            row = error_row(item.name, None, "unreadable", f"cannot read {item.name}: {e.strerror or e}")
        return ("error", row)

    tasks = [_Task(i, item) for i, item in enumerate(items)]
    max_batch = max(1, int(getattr(pipe.vision, "max_batch", 1) or 1))
    prefetch = _Prefetcher(tasks, work, opts.workers, max_batch + opts.workers, opts.timeout_s)
    prefetch.start()
    progress = _Progress(len(tasks))
    final: list[str] = [""] * len(tasks)  # each scan's row text, for the final file
    failed = 0
    try:
        i = 0
        while i < len(tasks):
            group = [tasks[i]]
            if not prefetch.wait(tasks[i]):
                tasks[i].result = ("timeout", None)
            n_prepared = tasks[i].result[0] == "prepared"
            j = i + 1
            while j < len(tasks) and n_prepared < max_batch and tasks[j].done.is_set():
                group.append(tasks[j])
                n_prepared += tasks[j].result[0] == "prepared"
                j += 1
            prepared = [t.result[1] for t in group if t.result[0] == "prepared"]
            visual = None
            if prepared:
                t0 = time.perf_counter()
                visual = pipe.visual_tokens(torch.cat([p.volume for p in prepared], dim=0))
                share = round((time.perf_counter() - t0) * 1000.0 / len(prepared), 3)
            k = 0
            for task in group:
                item = task.item
                kind, value = task.result
                is_failed = kind in ("error", "timeout")
                if kind == "skip":
                    old = old_rows[value]
                    final[task.index] = old.text
                    is_failed = old.failed
                else:
                    if kind == "prepared":
                        value.timings_ms["vision"] = share
                        text = item.patient_text if item.patient_text is not None else opts.patient_text
                        row = pipe.answer(value, visual[k : k + 1], text, opts.question)
                        row["timings_ms"]["total"] = round(sum(row["timings_ms"].values()), 3)
                        k += 1
                    elif kind == "timeout":
                        row = error_row(item.name, None, "timeout",
                                        f"reading + preprocessing took more than {opts.timeout_s:g} s: {item.name}")
                    else:
                        row = value
                    if opts.include_paths:
                        row["path"] = _abspath(item.path)
                    final[task.index] = sink.emit(row)
                failed += is_failed
                progress.update(failed=is_failed, timeout=kind == "timeout", skipped=kind == "skip")
                prefetch.consumed(task)
            del visual, prepared
            i = j
    finally:
        prefetch.close()
        sink.close()
    progress.finish()

    if isinstance(sink, _FileSink) and opts.resume:
        want = sink.header() + "".join(final)
        if Path(sink.path).read_bytes() != want.encode("utf-8", "surrogateescape"):
            _replace(sink.path, want)
        dropped = len(old_rows) - len(index.used)
        if dropped:
            print(f"resume: {dropped} row{'s' if dropped != 1 else ''} matching no scan of this run "
                  f"dropped from {sink.path.name}", file=sys.stderr)
    return failed


def _replace(path: Path, text: str) -> None:
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

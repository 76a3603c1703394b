"""Many scans: inputs (files, folders, CSV), prefetching, batching, JSON Lines / CSV output, resume.

How a run goes
--------------
The SCANS arguments are expanded first (`scan_inputs.expand_scans`: folders walked for
NIfTI files and DICOM series, one scan per series), so a bad CSV stops the run before
the bundle is loaded; what the walk skipped is counted on stderr. A pool of `workers`
reader threads then reads and preprocesses scans ahead of the model (at most `max_batch + workers` scans are read and
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
Rows and messages name a scan by its file name (a DICOM series: its folder's name and
the short hash of its series UID) and SHA-256 only; with `include_paths` rows get a
`path` (absolute, symlinks not resolved). Patient text and DICOM tag values are never
written.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MedblipError, ScanError
from ..preprocess.dicom_series import describe_skipped
from . import pipeline as _pipeline
from .prefetch import Prefetcher, Task, prepare_scan
from .results_io import (
    CALIBRATED_COLUMNS,
    DETAIL_COLUMNS,
    FileSink,
    OldRow,
    ResumeIndex,
    Sink,
    StdoutSink,
    abspath,
    digest_or_none,
    error_row,
    exception_row,
    out_format,
    read_old_rows,
    replace_file,
)
from .scan_inputs import ScanItem, expand_scans


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
    rebuild_trt: bool = False
    huge_pages: bool = True
    decision_detail: bool = False  # rows also carry answer_tokens and greedy_answer (one greedy decode per scan)
    conform: str | None = None  # None: the bundle's recorded conform spec (qc/options.py)
    strict_qc: bool = False
    explain: object | None = None  # explain.run.ExplainOptions: maps and an `explanation` block per row


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


def check_options(opts: InferOptions) -> None:
    if opts.workers < 1:
        raise MedblipError("--workers must be at least 1", code="usage")
    if not opts.timeout_s > 0:
        raise MedblipError("--timeout must be more than 0 seconds", code="usage")
    if opts.resume and opts.out is None:
        raise MedblipError("--resume needs --out (the results file to continue)", code="usage")
    if opts.explain is not None and opts.out is not None and out_format(Path(opts.out)) == "csv":
        raise MedblipError("--explain adds a block to JSON Lines rows: use --out FILE.jsonl (or stdout)", code="usage")


def expand_inputs(opts: InferOptions, stream=None) -> list[ScanItem]:
    """expand_scans with a file count on a terminal while folders are walked, and one line saying what was skipped."""
    stream = stream or sys.stderr
    tty = getattr(stream, "isatty", lambda: False)()
    last = [0.0]

    def on_file(n: int) -> None:
        now = time.monotonic()
        if tty and now - last[0] > 0.2:
            last[0] = now
            stream.write(f"\rreading folders: {n} files examined ")
            stream.flush()

    skipped: Counter = Counter()
    items = expand_scans(opts.scans, opts.include_paths, skipped, on_file)
    if tty and last[0]:
        stream.write("\r\033[K")
    n_series = sum(item.found is not None for item in items)
    if n_series or skipped:
        parts = [f"{n_series} DICOM series"] + ([f"skipped {describe_skipped(skipped)}"] if skipped else [])
        stream.write(f"inputs: {len(items)} scans; {'; '.join(parts)}\n")
        stream.flush()
    return items


def run_infer(opts: InferOptions) -> int:
    """Run every scan; returns the number of scans whose row is an error (resumed rows included)."""
    check_options(opts)
    items = expand_inputs(opts)

    pipe = _pipeline.Pipeline.from_bundle(opts.bundle, backend=opts.backend, device=opts.device,
                                          precision=opts.precision, rebuild_trt=opts.rebuild_trt,
                                          huge_pages=opts.huge_pages, conform=opts.conform,
                                          strict_qc=opts.strict_qc)
    pipe.decision_detail = opts.decision_detail
    why = f" ({pipe.chosen['why']})" if pipe.chosen.get("why") else ""  # e.g. why TensorRT was passed over
    pages = f"; {pipe.huge_pages.describe()}" if opts.device == "cpu" else ""
    print(f"backend: vision={pipe.chosen['vision']} llm={pipe.chosen['llm']}{why}{pages}", file=sys.stderr,
          flush=True)
    if pipe.qc.conform.active:
        print(f"conform: {pipe.qc.conform} before the published loader (from the {pipe.qc.conform_from})",
              file=sys.stderr, flush=True)

    extra = (CALIBRATED_COLUMNS if pipe.calibration else []) + (DETAIL_COLUMNS if opts.decision_detail else [])
    out = RunOutput(opts, len(items), extra)
    index = out.index
    explainer = None
    if opts.explain is not None:
        from ..explain.run import Explainer

        explainer = Explainer(pipe, opts.explain, opts.device)

    def work(task: Task):
        item = task.item
        scan = item.scan()
        sha = None
        if index is not None:
            sha = digest_or_none(scan)
            found = index.reserve(abspath(item.path), item.name, sha, item.series)
            if found is not None:
                return ("skip", found)
        return prepare_or_error(lambda: prepare_scan(pipe, scan, sha, task, prefetch.stopped), item, sha)

    tasks = [Task(i, item) for i, item in enumerate(items)]
    max_batch = max(1, int(getattr(pipe.vision, "max_batch", 1) or 1))
    prefetch = Prefetcher(tasks, work, opts.workers, max_batch + opts.workers, opts.timeout_s)
    prefetch.start()
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
                share = _pipeline.elapsed_ms(t0, len(prepared))
            k = 0
            for task in group:
                item = task.item
                kind, value = task.result
                if kind == "skip":
                    out.resumed(task.index, value)
                else:
                    if kind == "prepared":
                        text = item.patient_text if item.patient_text is not None else opts.patient_text
                        row = scan_row(pipe, value, visual[k : k + 1], share, text, opts.question)
                        if explainer is not None:
                            from ..explain.run import explain_row

                            explain_row(explainer, item.scan, value.volume, row, text)
                        k += 1
                    elif kind == "timeout":
                        row = timeout_row(item, opts.timeout_s)
                    else:
                        row = value
                    out.emit(task.index, item, row, timeout=kind == "timeout")
                prefetch.consumed(task)
            del visual, prepared
            i = j
    finally:
        prefetch.close()
        out.close()
    return out.finish()


def scan_row(pipe, prepared, visual: torch.Tensor, vision_ms: float, patient_text: str, question: str | None) -> dict:
    """The result row of a prepared scan whose visual tokens [1,Q,d] took `vision_ms` (its share of a batch)."""
    prepared.timings_ms["vision"] = vision_ms
    try:
        row = pipe.answer(prepared, visual, patient_text, question)
    except ScanError as e:  # --strict-qc: out of distribution
        return error_row(prepared.name, prepared.sha256, e.code, str(e), prepared.series)
    row["timings_ms"]["total"] = round(sum(row["timings_ms"].values()), 3)
    return row


def prepare_or_error(prepare, item, sha: str | None) -> tuple[str, object]:
    """`prepare()` -> ("prepared", PreparedScan or None), or ("error", the scan's error row)."""
    try:
        return ("prepared", prepare())
    except (ScanError, MemoryError, OSError) as e:
        return ("error", exception_row(e, item.name, item.path, lambda: sha or digest_or_none(item.scan()),
                                       item.series))


def timeout_row(item, timeout_s: float) -> dict:
    return error_row(item.name, None, "timeout", f"reading + preprocessing took more than {timeout_s:g} s: {item.name}",
                     item.series)


class RunOutput:
    """Where a run's rows go: the sink (stdout, or --out with what --resume found there), the progress line,
    and each scan's final row text; `finish()` leaves --out holding exactly one row per scan, in input order."""

    def __init__(self, opts: InferOptions, n_scans: int, extra_columns: list[str] = ()):
        self.opts = opts
        self.old_rows: list[OldRow] = []
        self.index: ResumeIndex | None = None
        if opts.out is None:
            self.sink: Sink = StdoutSink()
        else:
            out = Path(opts.out)
            self.sink = FileSink(out, out_format(out), opts.include_paths, extra_columns)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                if opts.resume:
                    self.old_rows, rewrite = read_old_rows(self.sink)
                    if rewrite:
                        replace_file(out, self.sink.header() + "".join(r.text for r in self.old_rows))
                    self.index = ResumeIndex(self.old_rows)
                if not opts.resume or not out.exists() or out.stat().st_size == 0:
                    replace_file(out, self.sink.header())
                self.sink.open_append()
            except OSError as e:
                raise MedblipError(f"cannot write {out.name}: {e.strerror or e}", code="bad_output") from None
        self.progress = _Progress(n_scans)
        self.final: list[str] = [""] * n_scans  # each scan's row text, for the final file
        self.failed = 0

    def resumed(self, i: int, old_index: int) -> None:
        """Scan i already has row `old_index` in --out."""
        old = self.old_rows[old_index]
        self.final[i] = old.text
        self.failed += old.failed
        self.progress.update(failed=old.failed, skipped=True)

    def emit(self, i: int, item, row: dict, timeout: bool = False) -> None:
        """Write scan i's row (a result or an error row)."""
        if self.opts.include_paths:
            row["path"] = abspath(item.path)
        self.final[i] = self.sink.emit(row)
        failed = "error" in row
        self.failed += failed
        self.progress.update(failed=failed, timeout=timeout)

    def close(self) -> None:
        self.sink.close()

    def finish(self) -> int:
        """The final count line; with --resume, --out rewritten if needed. Returns the number of failed scans."""
        self.progress.finish()
        sink = self.sink
        if isinstance(sink, FileSink) and self.opts.resume:
            want = sink.header() + "".join(self.final)
            if Path(sink.path).read_bytes() != want.encode("utf-8", "surrogateescape"):
                replace_file(sink.path, want)
            dropped = len(self.old_rows) - len(self.index.used)
            if dropped:
                print(f"resume: {dropped} row{'s' if dropped != 1 else ''} matching no scan of this run "
                      f"dropped from {sink.path.name}", file=sys.stderr)
        return self.failed

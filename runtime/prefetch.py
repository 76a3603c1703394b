"""Reading and preprocessing scans ahead of the model, each with a time limit (see cohort.py's notes)."""

from __future__ import annotations

import threading
import time

from .results_io import exception_row
from .scan_inputs import ScanItem

# ------------------------------------------------------------------ prefetching


class Task:
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


class Prefetcher:
    """Runs `work(task)` on daemon threads: at most `workers` at once, at most `ahead` not yet consumed."""

    def __init__(self, tasks: list[Task], work, workers: int, ahead: int, timeout_s: float):
        self.tasks, self.work, self.timeout_s = tasks, work, timeout_s
        self.permits = threading.Semaphore(workers)
        self.slots = threading.Semaphore(ahead)
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.abandoned: list[Task] = []
        self.graveyard: list = []  # late results of abandoned readers: freed by the main thread, not theirs
        self.feeder = threading.Thread(target=self._feed, name="medblip-feeder", daemon=True)

    def start(self) -> "Prefetcher":
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

    def _release(self, task: Task) -> None:
        with task.lock:
            if not task.released:
                task.released = True
                self.permits.release()

    def _run(self, task: Task) -> None:
        task.started = time.monotonic()
        try:
            result = self.work(task)
        except BaseException as e:  # never lose a task: an unexpected failure is its error row
            result = ("error", exception_row(e, task.item.name, task.item.path))
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

    def wait(self, task: Task) -> bool:
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

    def consumed(self, task: Task) -> None:
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


def prepare_scan(pipe, scan, sha: str | None, task: Task, stop: threading.Event):
    """`Pipeline.prepare` for a reader thread (`scan`: a path or a scan object): reuses the SHA-256 already
    computed, and skips the torch preprocessing of a scan abandoned for its time limit while it was being read
    (None then)."""

    def may_preprocess() -> bool:
        with task.lock:
            if task.abandoned or stop.is_set():
                return False  # dropped anyway: do not start torch work that nobody waits for
            task.in_torch = True
            return True

    return pipe.prepare(scan, sha256=sha, may_preprocess=may_preprocess)

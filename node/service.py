"""`medblip-node`: a DICOM Storage SCP that runs the bundle on each study it receives and sends back an SR.

Threads:
- the SCP (pynetdicom, one thread per association): spools each instance, then acknowledges it, and
  restarts its study's quiet timer;
- the clock: a study whose last instance is `quiet_s` old is queued (association release is ignored: a
  study may come over several associations, and a sender may never release);
- the worker (one, it owns the model): for a queued study, the series not answered yet are checked
  against the rules, the best is run (the next if it cannot be read), and an SR is put in the outbox;
  the ledger records the job as done;
- the sender: every SR in the outbox goes to each destination, retried with exponential back-off until
  acknowledged; the ledger records each acknowledgement.

Stop (stop()): the SCP stops taking associations, the worker finishes the study it is running, the sender
gets `drain_s` to deliver what is in the outbox; everything else stays in the spool for the next start.
On start, every study with unanswered series is queued again (after its quiet time) and the outbox resent.

Output: stdout has one JSON line when listening and one per finished job ({"event": "result", ...}:
label and probabilities, or the failure code; studies and series by hash only). stderr has progress
lines. No line carries a tag value (name, ID, date, UID, description).
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedblipError, ScanError
from ..preprocess.dicom_files import quiet_pydicom
from ..quiet import detached_logs
from . import rules as rules_mod
from . import scp
from .destinations import CStoreDestination, SendError, StowDestination
from .metrics import NodeMetrics
from .spool import OutboxItem, Spool
from .sr import AlgorithmInfo, Report, build_sr, uid_from


@dataclass
class NodeOptions:
    bundle: str
    spool: str
    ae_title: str = "MEDBLIP"
    host: str = "127.0.0.1"
    port: int = 11112
    send_to: str | None = None
    dicomweb: str | None = None
    rules: str | None = None
    quiet_s: float = 10.0
    report_failures: bool = False
    metrics_port: int | None = None
    patient_text: str = ""
    question: str | None = None
    backend: str = "auto"
    threads: int | None = None
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    drain_s: float = 10.0
    min_free_mb: float = 0.0
    idle_timeout_s: float = 60.0


class Node:
    def __init__(self, opts: NodeOptions, out=None, err=None):
        from ..bundle.format import MANIFEST, sha256_file
        from ..runtime.pipeline import Pipeline

        self.opts = opts
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._print_lock = threading.Lock()
        if not opts.send_to and not opts.dicomweb:
            raise MedblipError("give --send-to AET@HOST:PORT, --dicomweb URL, or both", code="usage")
        if opts.quiet_s <= 0 or opts.retry_initial_s <= 0 or opts.retry_max_s < opts.retry_initial_s:
            raise MedblipError("--quiet-s and the retry delays must be more than 0", code="usage")
        self.destinations = []
        if opts.send_to:
            self.destinations.append(CStoreDestination(opts.send_to, opts.ae_title))
        if opts.dicomweb:
            self.destinations.append(StowDestination(opts.dicomweb))
        self.rules = rules_mod.load_rules(opts.rules)
        try:
            self.spool = Spool(Path(opts.spool), opts.min_free_mb)
        except OSError as e:
            raise MedblipError(f"--spool {Path(opts.spool).name}: cannot use it ({e.strerror or type(e).__name__})",
                               code="spool_unusable") from None
        self.pipe = Pipeline.from_bundle(opts.bundle, backend=opts.backend, threads=opts.threads)
        bundle = Path(opts.bundle)
        self.algorithm = AlgorithmInfo(bundle.resolve().name, sha256_file(bundle / MANIFEST),
                                       self.pipe.bundle.random_weights)
        self.metrics = NodeMetrics()
        self.stop_event = threading.Event()
        self._seen: dict[str, float] = {}  # study -> monotonic time of its last instance (waiting for quiet)
        self._last_wall: dict[str, float] = {}  # study -> wall time of its last instance
        self._queued: list[str] = []
        self._running: str | None = None
        self._lock = threading.Condition()
        self._wake_sender = threading.Event()
        self._threads: list[threading.Thread] = []
        self.server = None

    # -- output ---------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        with self._print_lock:
            print(f"node: {msg}", file=self.err, flush=True)

    def emit(self, obj: dict) -> None:
        with self._print_lock:
            print(json.dumps(obj), file=self.out, flush=True)

    # -- SCP ------------------------------------------------------------------------------------

    def _on_store(self, event):
        if self.stop_event.is_set():
            self.metrics.refused.labels("stopping").inc()
            return scp.STATUS_OUT_OF_RESOURCES
        uids = scp.instance_uids(event)
        if uids is None:
            self.metrics.refused.labels("bad_instance").inc()
            self.log("refused an instance without study, series or SOP instance UID")
            return scp.STATUS_CANNOT_UNDERSTAND
        if not self.spool.has_room():
            self.metrics.refused.labels("spool_full").inc()
            self.log("refused an instance: the spool has less free space than --min-free-mb")
            return scp.STATUS_OUT_OF_RESOURCES
        try:
            study, _series = self.spool.store_instance(*uids, event.encoded_dataset())
        except OSError as e:
            self.metrics.refused.labels("spool_error").inc()
            self.log(f"refused an instance: cannot write to the spool ({e.strerror or type(e).__name__})")
            return scp.STATUS_OUT_OF_RESOURCES
        with self._lock:
            if study not in self._seen and study not in self._queued and study != self._running:
                self.metrics.queue.inc()
            self._seen[study] = time.monotonic()
            self._last_wall[study] = time.time()
        self.metrics.instances.inc()
        return scp.STATUS_OK

    def _on_accepted(self, event):
        text = scp.refused_summary(event.assoc)
        if text:
            self.log(f"association accepted; refused: {text}")

    def _on_rejected(self, event):
        self.log("rejected an association (wrong called AE title, or too many associations)")

    def _on_aborted(self, event):
        self.log("an association was aborted; what was acknowledged is kept")

    def start_scp(self) -> int:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.opts.ae_title)
        ae.require_called_aet = True
        ae.network_timeout = self.opts.idle_timeout_s
        ae.acse_timeout = ae.dimse_timeout = 30
        ae.maximum_associations = 16
        syntaxes = scp.decodable_syntaxes()
        for sop in scp.MR_STORAGE:
            ae.add_supported_context(sop, syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ABORTED, self._on_aborted)]
        self.ae = ae
        try:
            with detached_logs("pynetdicom"):
                self.server = ae.start_server((self.opts.host, self.opts.port), block=False,
                                              evt_handlers=handlers)
        except OSError as e:
            raise MedblipError(f"cannot listen on {self.opts.host}:{self.opts.port}: {e.strerror or e}",
                               code="port_unavailable") from None
        self.syntaxes = syntaxes
        return self.server.server_address[1]

    # -- start / stop ---------------------------------------------------------------------------

    def start(self) -> dict:
        """Resume the spool, start every thread; -> the listening line (also printed on stdout)."""
        import logging

        logging.getLogger("pynetdicom").propagate = False  # its debug output would dump datasets
        for study in self.spool.unanswered_studies():
            self._seen[study] = time.monotonic()
            self._last_wall[study] = self.spool.last_instance_time(study)
            self.metrics.queue.inc()
        resumed, waiting = len(self._seen), len(self.spool.waiting(self._dest_names()))
        try:
            metrics_port = self.metrics.serve(self.opts.metrics_port) if self.opts.metrics_port is not None else None
        except OSError as e:
            raise MedblipError(f"--metrics-port {self.opts.metrics_port}: {e.strerror or e}",
                               code="port_unavailable") from None
        port = self.start_scp()
        for name, target in (("clock", self._clock), ("worker", self._worker), ("sender", self._sender)):
            t = threading.Thread(target=target, name=f"medblip-node-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        info = {"event": "listening", "ae_title": self.opts.ae_title, "host": self.opts.host, "port": port,
                "metrics": f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port is not None else None,
                "destinations": [str(d) for d in self.destinations], "quiet_s": self.opts.quiet_s,
                "resumed_studies": resumed, "outbox": waiting, "random_weights": self.algorithm.random_weights,
                "transfer_syntaxes": len(self.syntaxes)}
        self.emit(info)
        self.log(f"listening on {self.opts.host}:{port} as {self.opts.ae_title}; {resumed} studies resumed, "
                 f"{waiting} results waiting to be sent; SIGTERM stops after the study in progress")
        return info

    def stop(self) -> None:
        """Graceful stop: no new associations, the running study finished, the outbox drained for drain_s."""
        if self.stop_event.is_set():
            return
        self.log("stopping: finishing the study in progress")
        self.stop_event.set()
        if self.server is not None:
            self.server.shutdown()
        with self._lock:
            self._lock.notify_all()
        worker = next((t for t in self._threads if t.name.endswith("worker")), None)
        if worker is not None:
            worker.join()
        self._wake_sender.set()
        sender = next((t for t in self._threads if t.name.endswith("sender")), None)
        if sender is not None:
            sender.join(self.opts.drain_s + 35.0)
        self.spool.close()
        self.log("stopped")

    # -- clock and worker -------------------------------------------------------------------------

    def _clock(self) -> None:
        while not self.stop_event.wait(0.1):
            now = time.monotonic()
            with self._lock:
                for study, seen in list(self._seen.items()):
                    if now - seen >= self.opts.quiet_s:
                        del self._seen[study]
                        self._queued.append(study)
                        self.metrics.studies.inc()
                        self._lock.notify_all()

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._queued and not self.stop_event.is_set():
                    self._lock.wait(0.5)
                if self.stop_event.is_set():
                    return
                study = self._queued.pop(0)
                self._running = study
            try:
                self.run_study(study)
            except Exception as e:  # noqa: BLE001 -- one study's failure never stops the node
                self.log(f"study {study[:8]}: unexpected {type(e).__name__}; left in the spool")
                self.metrics.failed.labels("internal_error").inc()
            finally:
                with self._lock:
                    self._running = None
                    if study not in self._seen and study not in self._queued:
                        self.metrics.queue.dec()
                self._wake_sender.set()

    def run_study(self, study: str) -> None:
        """Run the unanswered series of one study: select, read, diagnose, write the SR, record the job."""
        every = self.spool.series_of(study)
        position = {key: i + 1 for i, (key, _) in enumerate(every)}
        pending = [(k, f) for k, f in every if (study, k) not in self.spool.done_series]
        if not pending:
            return
        infos = [rules_mod.describe(k, files, position[k]) for k, files in pending]
        job = uid_from("job", study, *sorted(k for k, _ in pending)).split(".")[-1][:20]
        passed, skipped = rules_mod.select(infos, self.rules)
        for s, code in skipped:
            self.log(f"study {study[:8]}: skipped {rules_mod.label(s)}: {code}")
        row, chosen, failure = None, None, (skipped[-1][1] if skipped else "no_series")
        for s in passed:
            try:
                row = self.pipe(s.files[0].parent, self.opts.patient_text, self.opts.question)
                chosen = s
                break
            except ScanError as e:
                failure = e.code
                self.log(f"study {study[:8]}: {rules_mod.label(s)} cannot be read: {e.code}")
        last_wall = self._last_wall.get(study, time.time())
        result = {"event": "result", "study": study, "job": job, "series_run": chosen.key if chosen else None,
                  "series_received": len(pending)}
        if row is not None:
            self.log(f"study {study[:8]}: ran {rules_mod.label(chosen)} of {len(pending)} new series: {row['label']}")
            report = Report(job, _headers(chosen.files), self.algorithm, row=row)
            result.update(label=row["label"], probabilities=row["probabilities"], answer=row.get("answer"),
                          warnings=row.get("warnings", []), random_weights=row["random_weights"],
                          **({"calibrated": row["calibrated"]} if row.get("calibrated") else {}))
            self.metrics.run.inc()
        else:
            self.log(f"study {study[:8]}: no series could be run ({len(pending)} new series): {failure}")
            self.metrics.failed.labels(failure).inc()
            result.update(error={"code": failure})
            report = None
            if self.opts.report_failures:
                report = Report(job, _headers([f for _, files in pending for f in files]), self.algorithm,
                                reason=failure)
        if report is not None:
            sr = build_sr(report)
            buf = io.BytesIO()
            with quiet_pydicom():
                sr.save_as(buf, enforce_file_format=True)
            self.spool.put_result(job, buf.getvalue(), {"study": study, "last_instance": last_wall,
                                                        "finding": row is not None})
            result["sr"] = True
        self.spool.record({"event": "done", "job": job, "study": study, "series": [k for k, _ in pending],
                           "sr": report is not None})
        self.emit(result)

    # -- sender ---------------------------------------------------------------------------------

    def _dest_names(self) -> list[str]:
        return [str(d) for d in self.destinations]

    def _sender(self) -> None:
        delay: dict[str, float] = {}
        next_try: dict[str, float] = {}
        while True:
            stopping = self.stop_event.is_set()
            deadline = time.monotonic() + self.opts.drain_s if stopping else None
            items = self.spool.waiting(self._dest_names())
            self.metrics.outbox.set(len(items))
            for item in items:
                if time.monotonic() < next_try.get(item.job, 0) and not stopping:
                    continue
                if self._send(item):
                    delay.pop(item.job, None)
                    next_try.pop(item.job, None)
                else:
                    d = min(self.opts.retry_max_s, delay.get(item.job, self.opts.retry_initial_s / 2) * 2)
                    delay[item.job], next_try[item.job] = d, time.monotonic() + d
            if stopping:
                if not self.spool.waiting(self._dest_names()) or deadline is None or time.monotonic() > deadline:
                    return
                if not self._drain_wait(deadline):
                    return
                continue
            self._wake_sender.wait(0.5)
            self._wake_sender.clear()

    def _drain_wait(self, deadline: float) -> bool:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return time.monotonic() < deadline

    def _send(self, item: OutboxItem) -> bool:
        ok = True
        for dest in self.destinations:
            if (item.job, str(dest)) in self.spool.sent:
                continue
            try:
                dest.send(item.sr)
            except SendError as e:
                self.metrics.send_failures.inc()
                self.log(f"result {item.job[:8]}: {e} ({e.code}); kept in the outbox, retrying")
                ok = False
                continue
            except Exception as e:  # noqa: BLE001 -- a network library's failure: retried like any other
                self.metrics.send_failures.inc()
                self.log(f"result {item.job[:8]}: {dest}: {type(e).__name__}; kept in the outbox, retrying")
                ok = False
                continue
            self.spool.record({"event": "sent", "job": item.job, "to": str(dest)})
        if ok:
            self.spool.mark_sent(item)
            if "last_instance" in item.meta:
                self.metrics.latency.observe(max(0.0, time.time() - float(item.meta["last_instance"])))
            self.log(f"result {item.job[:8]}: acknowledged by every destination")
        return ok


@quiet_pydicom()
def _headers(files: list[Path]) -> list:
    import pydicom

    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]

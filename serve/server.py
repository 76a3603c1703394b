"""`medblip-serve`: the bundle behind an HTTP API on Ray Serve, until SIGTERM or Ctrl-C.

Start-up: the bundle is verified here first (a bad bundle fails in seconds, before Ray starts),
Ray is started on 127.0.0.1 (or joined with `address`), Serve's HTTP proxy listens on host:port,
and the replicas load and verify the bundle again. One JSON line on stdout says where everything
is once the first replica answers /v1/ready; progress goes to stderr.

Shutdown (SIGTERM, SIGINT): the application is deleted, which makes Serve stop routing new
requests to the replicas and lets each finish the requests it holds (up to the per-request
timeout) before it exits; then a cluster started here is shut down and any of its processes
still alive are killed, so none is left behind. A joined cluster is left running. A second SIGTERM
or SIGINT during that stop kills the processes started here at once and exits (128 + signal).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MedblipError
from . import ray_cluster
from .config import ReplicaConfig

APP = "medblip"


@dataclass
class ServeOptions:
    replica: ReplicaConfig
    replicas: int | None = None  # default: 1 on CPU, one per GPU on cuda
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 8080
    address: str | None = None
    access_log: bool = True
    ready_timeout_s: float = 600.0


def _check(opts: ServeOptions) -> None:
    r = opts.replica
    for name, value in (("--max-batch", 1 if r.max_batch is None else r.max_batch),
                        ("--preprocess-workers", r.preprocess_workers)):
        if value < 1:
            raise MedblipError(f"{name} must be at least 1", code="usage")
    if opts.replicas is not None and opts.replicas < 1:
        raise MedblipError("--replicas must be at least 1", code="usage")
    if r.threads is not None and r.threads < 1:
        raise MedblipError("--threads must be at least 1", code="usage")
    if not (r.timeout_s > 0 and r.max_body_mb > 0 and r.batch_wait_ms >= 0):
        raise MedblipError("--timeout and --max-body-mb must be more than 0, --batch-wait-ms at least 0", code="usage")


def _plan(opts: ServeOptions, cluster: ray_cluster.Cluster) -> tuple[int, dict, int]:
    """-> (replicas, ray_actor_options, compute threads per replica)."""
    if opts.replica.device.startswith("cuda"):
        gpus = cluster.gpus()
        if gpus < 1:
            raise MedblipError("--device cuda: the Ray cluster has no GPU", code="backend_unavailable")
        replicas = opts.replicas or gpus  # one replica per GPU
        threads = opts.replica.threads or 1
        return replicas, {"num_gpus": 1, "num_cpus": threads}, threads
    replicas = opts.replicas or 1
    threads = opts.replica.threads or max(1, int(cluster.cpus()) // replicas)
    return replicas, {"num_cpus": threads}, threads


def _wait_ready(url: str, timeout_s: float, stop: threading.Event) -> dict:
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return json.loads(r.read())
        except OSError:
            pass
        stop.wait(0.5)
    raise MedblipError("stopped before the server was ready" if stop.is_set() else
                       f"the server was not ready within {timeout_s:g} s", code="not_ready")


def run_server(opts: ServeOptions, stop: threading.Event | None = None, on_started=None) -> None:
    """Serve until `stop` is set. `on_started()` runs once Ray is up (the command line's signal handlers go in
    then: Ray installs its own SIGTERM handler when it starts, which would end the process at once)."""
    from ..bundle.reader import Bundle

    _check(opts)
    Bundle.open(opts.replica.bundle, verify=True)  # fail fast, before Ray starts
    stop = stop or threading.Event()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.monotonic()
    with ray_cluster.connected(opts.address, metrics_port=opts.metrics_port) as cluster:
        if on_started is not None:
            on_started()
        from ray import serve

        replicas, actor_options, threads = _plan(opts, cluster)
        config = ReplicaConfig(**{**asdict(opts.replica), "bundle": str(Path(opts.replica.bundle).resolve()),
                                  "threads": threads})
        serve.start(http_options={"host": opts.host, "port": opts.port,
                                  "request_timeout_s": config.timeout_s + 30.0},  # backstop; replicas answer 504 first
                    logging_config={"enable_access_log": opts.access_log})
        from .replica import MedblipReplica

        deployment = serve.deployment(
            MedblipReplica, name=APP, num_replicas=replicas, ray_actor_options=actor_options,
            max_ongoing_requests=max(16, 4 * (config.max_batch or 8) + config.preprocess_workers),
            graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=config.timeout_s + 5.0,
            health_check_period_s=5.0, health_check_timeout_s=30.0)
        log(f"serve: loading {Path(config.bundle).name} on {replicas} replica{'s' if replicas != 1 else ''} "
            f"({threads} thread{'s' if threads != 1 else ''} each)")
        try:
            serve.run(deployment.bind(asdict(config)), name=APP, route_prefix="/", blocking=False)
            base = f"http://{opts.host}:{opts.port}"
            ready = _wait_ready(f"{base}/v1/ready", opts.ready_timeout_s, stop)
            info = {"url": f"{base}/v1/infer", "ready": f"{base}/v1/ready", "live": f"{base}/-/healthz",
                    "metrics": f"http://127.0.0.1:{opts.metrics_port}/metrics" if cluster.owned else None,
                    "replicas": replicas, "threads": threads, "backend": ready["backend"],
                    "max_batch": ready["max_batch"], "ray": cluster.address, "ray_logs": cluster.temp_dir, "startup_s": round(time.monotonic() - t0, 1)}
            print(json.dumps(info), flush=True)
            log(f"serve: ready at {info['url']} in {info['startup_s']} s; SIGTERM or Ctrl-C stops it")
            while not stop.wait(0.5):
                pass
        finally:
            # Deleting the application first: the replicas stop taking requests and finish the ones they hold
            # while the HTTP proxy is still there to deliver the answers; only then does the proxy go.
            log("serve: stopping: finishing requests in flight")
            serve.delete(APP)
            time.sleep(1.0)  # the proxy writes out the last answers
            if cluster.owned:
                serve.shutdown()
    log("serve: stopped")


def run_from_command_line(opts: ServeOptions) -> None:
    """run_server with SIGTERM and SIGINT turned into a graceful stop; a second one stops at once: the processes
    this one started (a local Ray cluster's) are killed and it exits with 128 + the signal (a graceful stop
    waiting on Ray could otherwise hang for a minute)."""
    stop = threading.Event()
    seen = {"n": 0}

    def on_signal(signum, _frame):
        seen["n"] += 1
        if seen["n"] == 1:
            stop.set()
            return
        os.write(2, b"serve: second signal: killing the processes started here and exiting now\n")
        for p in ray_cluster._descendants():
            try:
                p.kill()
            except Exception:  # noqa: BLE001 -- already gone
                pass
        os._exit(128 + signum)

    def handle_signals():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

    handle_signals()
    run_server(opts, stop, on_started=handle_signals)

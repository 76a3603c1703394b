"""Start a local Ray cluster that listens on 127.0.0.1 only, or join one; stop it leaving no process behind.

Ray (2.60) turns a node address of 127.0.0.1 into the machine's routable address and binds its
gRPC servers to every interface. Its switch for a single-machine cluster,
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (off by default on Linux, on by default on macOS and Windows),
makes the node address 127.0.0.1, and then the GCS, raylet, object manager, workers, metrics
agent and runtime-env agent bind to it. It must be set before Ray starts its processes, which
inherit it. One listener ignores it: a Serve replica's inter-deployment gRPC server, bound to
[::] in Ray's code; `serve/replica.py` moves that one onto the loopback address too.

Token authentication is on (RAY_AUTH_MODE=token unless set). The dashboard is off. Ray's own logs go to a private temporary folder that is removed on stop.
Joining (`address`) uses the cluster as it is: nothing is started, and stopping only disconnects.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import MedblipError

LOOPBACK = "127.0.0.1"
PROXY_CHECK_TIMEOUT_S = 30  # under serve.start's own 60 s wait for the proxies


def loopback_only_env() -> None:
    """Make Ray's node address 127.0.0.1 in this process and in the processes it starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reporting home from a hospital network
    if "ray" in sys.modules:  # already imported: its constant was read at import
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


@dataclass
class Cluster:
    """A connected Ray cluster: `owned` when this process started it (and so stops it)."""

    address: str
    owned: bool
    temp_dir: str | None = None
    metrics_port: int | None = None

    def cpus(self) -> float:
        import ray

        return float(ray.cluster_resources().get("CPU", 0))

    def gpus(self) -> int:
        import ray

        return int(ray.cluster_resources().get("GPU", 0))


def start(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
          metrics_port: int | None = None, log_to_driver: bool = True) -> Cluster:
    """Join the Ray cluster at `address`, or start a local one on 127.0.0.1 (dashboard off)."""
    # token authentication, explicitly: the token is ~/.ray/auth_token (made when a local cluster starts without
    # one); a driver joining a cluster only sends it when the mode is set
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # Serve's HTTP proxy must answer its ready check within 5 s and its health check within 10 s, or it is
    # restarted and serve.start gives up; on a 2-core machine busy loading a model it can miss both
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(name, str(PROXY_CHECK_TIMEOUT_S))
    if address is None or address.split(":")[0] in (LOOPBACK, "localhost"):
        loopback_only_env()
    if address is None:
        # Ray starts its workers at nice 15, so any busy process at the default priority (Ray's own GCS, raylet
        # and agents included) preempts the model, which on a 2-core machine shows in the served row's stage
        # timings. The replicas are the service here: run them at the default priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if address is not None:
        try:
            ray.init(address=address, log_to_driver=log_to_driver, logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise MedblipError(f"cannot join the Ray cluster at {address}: {' '.join(str(e).split())[:300]}",
                               code="ray_unavailable") from None
        return Cluster(ray.get_runtime_context().gcs_address, owned=False)
    temp_dir = tempfile.mkdtemp(prefix="medblip-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    kwargs = {"_metrics_export_port": metrics_port} if metrics_port else {}
    try:
        ray.init(include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus, _temp_dir=temp_dir,
                 log_to_driver=log_to_driver, logging_level="WARNING", **kwargs)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return Cluster(ray.get_runtime_context().gcs_address, owned=True, temp_dir=temp_dir, metrics_port=metrics_port)


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def stop(cluster: Cluster, wait_s: float = 20.0) -> list[int]:
    """Disconnect; a cluster this process started is shut down, and any of its processes still alive after
    `wait_s` are killed. Returns the pids that had to be killed."""
    import psutil
    import ray

    started = _descendants() if cluster.owned else []
    ray.shutdown()
    killed = []
    if started:
        gone, alive = psutil.wait_procs(started, timeout=wait_s)
        for p in alive:
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5.0)
    if cluster.temp_dir:
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return killed


@contextmanager
def connected(address: str | None = None, **kwargs):
    """`with connected(address) as cluster:` a started or joined cluster, stopped on the way out."""
    t0 = time.monotonic()
    cluster = start(address, **kwargs)
    what = f"joined Ray at {address}" if address else f"started a local Ray cluster on {LOOPBACK}"
    print(f"ray: {what} ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
    try:
        yield cluster
    finally:
        stop(cluster)


def main() -> None:
    """`python -m medblip_edge.serve.ray_cluster`: a local cluster on 127.0.0.1 for `--address`, held until stdin
    closes (its address is the one line on stdout), then stopped with all its processes."""
    cluster = start(log_to_driver=False)
    print(cluster.address, flush=True)
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    finally:
        stop(cluster)


if __name__ == "__main__":
    main()

"""Load run against `medblip-serve`, beside the in-process pipeline's sequential rate, in one run.

    python -m medblip_edge.benchmarks.serve_load --bundle BUNDLE --out DIR [--clients 8] [--requests 200] [--fault]

1. In process: `Pipeline.from_bundle(BUNDLE)(scan)` called one after another (`--sequential` calls
   after a warm-up): latency p50, scans per second. The pipeline is freed before the server starts.
2. The server (the real `medblip-serve`, local Ray cluster on 127.0.0.1): the same scan POSTed by
   one client, one after another (p50 overhead of the server over the in-process call), then by
   `--clients` clients at once, `--requests` in all (p50/p99 latency, requests per second, failed
   requests, the vision batch sizes from the server's medblip_vision_batch_size histogram).
3. With `--fault`: a second load run during which the replica process is killed (SIGKILL) after
   `--kill-after` seconds: every request's status and latency, and how long until rows came again.
Writes DIR/serve_load.json and DIR/report.md. The machine's load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests

from .machine import machine_info


def _pct(xs, q) -> float:
    return round(float(np.percentile(np.asarray(xs) * 1000.0, q)), 1)


def in_process(bundle: Path, scan: Path, n: int) -> dict:
    from ..runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    for _ in range(2):
        pipe(scan)
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        pipe(scan)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    del pipe
    gc.collect()
    return {"calls": n, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "per_s": round(n / wall, 3)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, args) -> tuple[subprocess.Popen, dict]:
    cmd = [str(Path(sys.executable).with_name("medblip-serve")), "--bundle", str(bundle), "--port", str(_free_port()),
           "--metrics-port", str(_free_port()), "--max-batch", str(args.max_batch), "--batch-wait-ms",
           str(args.batch_wait_ms), "--timeout", str(args.timeout), "--no-access-log"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.strip():
        raise SystemExit("medblip-serve did not start")
    return proc, json.loads(line)


def _batches(metrics_url: str) -> dict:
    """{batch size upper bound: cumulative count} of medblip_vision_batch_size."""
    out: dict[float, float] = {}
    for line in requests.get(metrics_url, timeout=30).text.splitlines():
        if line.startswith("ray_medblip_vision_batch_size_bucket{"):
            le = float(line.split('le="', 1)[1].split('"', 1)[0])
            out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _sizes(before: dict, after: dict) -> dict:
    """Batches per size (1, 2, 3, ...) between two cumulative histograms (bucket bounds 1,2,3,4,6,8,...)."""
    bounds = sorted(after)
    cum = [after[b] - before.get(b, 0.0) for b in bounds]
    per, prev = {}, 0.0
    for b, c in zip(bounds, cum):
        if c - prev:
            per[f"<={b:g}" if b not in (1, 2, 3, 4) else f"{b:g}"] = int(c - prev)
        prev = c
    return per


def load(url: str, scan: Path, clients: int, n: int, timeout: float, during=None) -> list[tuple]:
    """n POSTs from `clients` threads -> [(status or None, seconds, error code or exception name)]."""
    data = scan.read_bytes()

    def one(i):
        t = time.perf_counter()
        try:
            r = requests.post(url, files={"scan": (scan.name, data)}, timeout=timeout)
            code = r.json().get("error", {}).get("code") if r.headers.get("content-type", "").startswith(
                "application/json") else r.text[:80]
            return r.status_code, time.perf_counter() - t, code
        except requests.RequestException as e:
            return None, time.perf_counter() - t, type(e).__name__

    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        if during is not None:
            during()
        return [f.result() for f in futures]


def summarize(results: list[tuple], wall: float) -> dict:
    ok = [s for st, s, _ in results if st == 200]
    statuses: dict[str, int] = {}
    for st, _, code in results:
        key = f"{st} {code}" if st != 200 else "200"
        statuses[key] = statuses.get(key, 0) + 1
    return {"requests": len(results), "ok": len(ok), "failed": len(results) - len(ok), "statuses": statuses,
            "p50_ms": _pct(ok, 50) if ok else None, "p99_ms": _pct(ok, 99) if ok else None,
            "max_ms": _pct([s for _, s, _ in results], 100), "per_s": round(len(ok) / wall, 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--scan", type=Path, default=None, help="default: the MNI152 T1 in nilearn's wheel")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--sequential", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--fault", action="store_true")
    ap.add_argument("--kill-after", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.scan is None:
        from ..demo_scan import mni_t1_path

        args.scan = Path(mni_t1_path())
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"command": "python -m medblip_edge.benchmarks.serve_load " + " ".join(argv or sys.argv[1:]),
           "machine": machine_info(), "load_before": os.getloadavg()}
    print("in process ...", file=sys.stderr, flush=True)
    res["in_process"] = in_process(args.bundle, args.scan, args.sequential)
    print(f"  {res['in_process']}\nserver ...", file=sys.stderr, flush=True)
    proc, info = start_server(args.bundle, args)
    try:
        res["server"] = {k: info[k] for k in ("replicas", "threads", "backend", "max_batch", "startup_s")}
        res["server"]["batch_wait_ms"] = args.batch_wait_ms
        load(info["url"], args.scan, 1, 2, args.timeout + 30)  # warm-up
        t0 = time.perf_counter()
        res["one_client"] = summarize(load(info["url"], args.scan, 1, args.sequential, args.timeout + 30),
                                      time.perf_counter() - t0)
        res["overhead_p50_ms"] = round(res["one_client"]["p50_ms"] - res["in_process"]["p50_ms"], 1)
        print(f"  one client: {res['one_client']}", file=sys.stderr, flush=True)
        time.sleep(6)
        before = _batches(info["metrics"])
        t0 = time.perf_counter()
        res["load"] = summarize(load(info["url"], args.scan, args.clients, args.requests, args.timeout + 30),
                                time.perf_counter() - t0)
        res["load"]["clients"] = args.clients
        res["throughput_vs_in_process"] = round(res["load"]["per_s"] / res["in_process"]["per_s"], 2)
        time.sleep(12)  # Ray's metrics agent exports every few seconds
        res["load"]["vision_batches"] = _sizes(before, _batches(info["metrics"]))
        print(f"  load: {res['load']}", file=sys.stderr, flush=True)
        if args.fault:
            replica = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "ServeReplica" in " ".join(p.cmdline())][0]
            killed = {}

            def kill():
                time.sleep(args.kill_after)
                killed["at"] = time.perf_counter()
                replica.kill()

            t0 = time.perf_counter()
            results = load(info["url"], args.scan, args.clients, args.requests, args.timeout + 30,
                           during=threading.Thread(target=kill, daemon=True).start)
            res["fault"] = summarize(results, time.perf_counter() - t0)
            res["fault"]["killed_after_s"] = args.kill_after
            res["fault"]["client_timeout_s"] = args.timeout + 30
            t = time.perf_counter()
            while requests.post(info["url"], files={"scan": (args.scan.name, args.scan.read_bytes())},
                                timeout=args.timeout + 30).status_code != 200:
                time.sleep(1)
            res["fault"]["rows_again_s_after_kill"] = round(time.perf_counter() - killed["at"], 1)
            res["fault"]["checked_at_s_after_kill"] = round(t - killed["at"], 1)
            print(f"  fault: {res['fault']}", file=sys.stderr, flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        res["server_exit"] = proc.wait(180)
    res["load_after"] = os.getloadavg()
    (args.out / "serve_load.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "report.md").write_text(report(res))
    print(report(res))


def report(r: dict) -> str:
    m, ip, one, ld = r["machine"], r["in_process"], r["one_client"], r["load"]
    lines = [f"# medblip-serve load run, {m.get('date', '')}", "",
             f"`{r['command']}`", "",
             f"Machine: {m.get('cpu', {}).get('model', '?')}, {m.get('cores', {}).get('usable', '?')} cores; load average before "
             f"{r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f}. Server: {r['server']}.", "",
             "| run | requests | failed | p50 ms | p99 ms | scans/s |", "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| in process, sequential | {ip['calls']} | 0 | {ip['p50_ms']} | {ip['p99_ms']} | {ip['per_s']} |",
             f"| server, 1 client | {one['requests']} | {one['failed']} | {one['p50_ms']} | {one['p99_ms']} | "
             f"{one['per_s']} |",
             f"| server, {ld['clients']} clients | {ld['requests']} | {ld['failed']} | {ld['p50_ms']} | {ld['p99_ms']} | "
             f"{ld['per_s']} |", "",
             f"Throughput with {ld['clients']} clients / in-process sequential: {r['throughput_vs_in_process']}x. "
             f"p50 overhead of the server over the in-process call (1 client): {r['overhead_p50_ms']} ms. "
             f"Vision batches seen (size: count): {ld['vision_batches']}.", ""]
    if "fault" in r:
        f = r["fault"]
        lines += [f"Fault run: replica killed {f['killed_after_s']} s into {f['requests']} requests: answers "
                  f"{f['statuses']}; slowest answer {f['max_ms']} ms (client limit {f['client_timeout_s']} s); rows "
                  f"again {f['rows_again_s_after_kill']} s after the kill.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Load run against `medblip-serve`, beside the in-process pipeline in the same run.

    python -m medblip_edge.benchmarks.serve_load --bundle BUNDLE --out DIR [--config SPEC ...] [--fault]

1. In process, no server: `Pipeline.from_bundle(BUNDLE)(scan)` called one after another (the
   sequential rate), the vision stage's cost per scan at batch 1, 2, 4 (does batching pay on this
   machine?), and two calls at a time on one pipeline with one compute thread each (what running
   scans side by side can give on this machine at best).
2. For each server configuration (`--config "max_batch=4,batch_wait_ms=10"`: medblip-serve options,
   `_` for `-`; the first is the default server; default list: the default server, --max-batch 4,
   two replicas of one thread): the real `medblip-serve` on a local Ray cluster on 127.0.0.1.
   - One client, interleaved with in-process calls on the same scan (one, then the other, so both
     see the same machine): the server's p50 overhead is the median of the pairs' differences; the
     response's Server-Timing header splits it (upload, read, vision, llm as the replica saw them;
     the rest is HTTP and Ray's proxy-to-replica hop).
   - `--clients` clients at once, `--requests` in all, right after a block of in-process sequential
     calls with the server idle: p50/p99, scans per second and its ratio to that block's rate, failed
     requests, vision batch sizes from the server's medblip_vision_batch_size histogram.
3. With `--fault`, on the first configuration: another load run during which the replica process is
   killed (SIGKILL) after `--kill-after` seconds: every request's status and latency, and how long
   until rows came again.
Writes DIR/serve_load.json and DIR/report.md. The machine's load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests

from .machine import machine_info
from .timing import p50_ms

DEFAULT_CONFIGS = ("", "max_batch=4,batch_wait_ms=10", "replicas=2,threads=1")


def _pct(xs, q) -> float:
    return round(float(np.percentile(np.asarray(xs) * 1000.0, q)), 1)


def _timed(fn, n: int) -> tuple[list[float], float]:
    """n calls of fn() -> (seconds per call, wall seconds)."""
    lat, t0 = [], time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0


def sequential(pipe, scan: Path, n: int) -> dict:
    lat, wall = _timed(lambda: pipe(scan), n)
    return {"calls": n, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "per_s": round(n / wall, 3)}


def vision_batch_costs(pipe, scan: Path, iters: int = 3) -> dict:
    """{batch: vision ms per scan} for batches of 1, 2, 4 (capped by the vision graph)."""
    import torch

    volume = pipe.prepare(scan).volume
    cap = int(getattr(pipe.vision, "max_batch", 0) or 4)
    out = {}
    for b in [b for b in (1, 2, 4) if b <= cap]:
        batch = torch.cat([volume] * b)
        ms, _ = p50_ms(lambda: pipe.visual_tokens(batch), iters=iters)
        out[str(b)] = round(ms / b, 1)
    return out


def side_by_side(bundle: Path, scan: Path, n: int, lanes: int = 2) -> dict:
    """`lanes` calls at a time on one pipeline whose compute uses one thread: the scans per second that
    running scans side by side gives on this machine, with no server in the way."""
    import torch

    from ..runtime.pipeline import Pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = Pipeline.from_bundle(bundle, threads=1)
        pipe(scan)
        with cf.ThreadPoolExecutor(lanes) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda _: pipe(scan), range(n)))
            wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"calls": n, "lanes": lanes, "threads_each": 1, "per_s": round(n / wall, 3)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_flags(spec: str) -> list[str]:
    """"max_batch=4,batch_wait_ms=10" -> ["--max-batch", "4", "--batch-wait-ms", "10"]."""
    flags = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--config: {item!r} is not key=value")
        flags += ["--" + key.strip().replace("_", "-"), value.strip()]
    return flags


def start_server(bundle: Path, spec: str, timeout: float) -> tuple[subprocess.Popen, dict]:
    cmd = [str(Path(sys.executable).with_name("medblip-serve")), "--bundle", str(bundle), "--port", str(_free_port()),
           "--metrics-port", str(_free_port()), "--timeout", str(timeout), "--no-access-log", *config_flags(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.strip():
        raise SystemExit(f"medblip-serve did not start: {' '.join(cmd)}")
    return proc, json.loads(line)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(180)


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


def parse_server_timing(header: str) -> dict:
    """'upload;dur=4.2, read;dur=80' -> {"upload": 4.2, "read": 80.0}."""
    out = {}
    for item in filter(None, (s.strip() for s in header.split(","))):
        name, _, rest = item.partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


def interleaved(pipe, url: str, scan: Path, n: int, timeout: float) -> dict:
    """n pairs (in-process call, then one POST): both p50s, the median of the differences, and the p50 split
    of the server's time by its Server-Timing header."""
    data, session = scan.read_bytes(), requests.Session()
    local, served, timing = [], [], []
    for _ in range(n):
        t = time.perf_counter()
        pipe(scan)
        local.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = session.post(url, files={"scan": (scan.name, data)}, timeout=timeout)
        served.append(time.perf_counter() - t)
        if r.status_code != 200:
            raise SystemExit(f"the server answered {r.status_code}: {r.text[:200]}")
        st = parse_server_timing(r.headers.get("Server-Timing", ""))
        st["compute"] = r.json()["timings_ms"]["total"]
        st["http_and_hop"] = served[-1] * 1000.0 - st.get("app", 0.0)
        timing.append(st)
    return {"pairs": n, "in_process_p50_ms": _pct(local, 50), "server_p50_ms": _pct(served, 50),
            "overhead_p50_ms": round(statistics.median((b - a) * 1000.0 for a, b in zip(local, served)), 1),
            "server_timing_p50_ms": {k: round(statistics.median(t[k] for t in timing), 1) for k in timing[0]}}


def load(url: str, scan: Path, clients: int, n: int, timeout: float, during=None) -> list[tuple]:
    """n POSTs from `clients` threads -> [(status or None, seconds, error code or exception name, start, end)]
    (start and end: perf_counter seconds)."""
    data = scan.read_bytes()

    def one(i):
        t = time.perf_counter()
        try:
            r = requests.post(url, files={"scan": (scan.name, data)}, timeout=timeout)
            code = r.json().get("error", {}).get("code") if r.headers.get("content-type", "").startswith(
                "application/json") else r.text[:80]
            return r.status_code, time.perf_counter() - t, code, t, time.perf_counter()
        except requests.RequestException as e:
            return None, time.perf_counter() - t, type(e).__name__, t, time.perf_counter()

    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        if during is not None:
            during()
        return [f.result() for f in futures]


def summarize(results: list[tuple], wall: float) -> dict:
    ok = [r[1] for r in results if r[0] == 200]
    statuses: dict[str, int] = {}
    for st, _, code, *_ in results:
        key = f"{st} {code}" if st != 200 else "200"
        statuses[key] = statuses.get(key, 0) + 1
    return {"requests": len(results), "ok": len(ok), "failed": len(results) - len(ok), "statuses": statuses,
            "p50_ms": _pct(ok, 50) if ok else None, "p99_ms": _pct(ok, 99) if ok else None,
            "max_ms": _pct([r[1] for r in results], 100), "per_s": round(len(ok) / wall, 3)}


def run_config(pipe, spec: str, args, log, fault: bool) -> dict:
    proc, info = start_server(args.bundle, spec, args.timeout)
    res: dict = {"config": spec or "default"}
    try:
        res["server"] = {k: info[k] for k in ("replicas", "threads", "backend", "max_batch", "startup_s")}
        load(info["url"], args.scan, 1, 3, args.timeout + 30)  # warm-up
        res["one_client"] = interleaved(pipe, info["url"], args.scan, args.sequential, args.timeout + 30)
        log(f"  one client: {res['one_client']}")
        time.sleep(3)
        res["in_process"] = sequential(pipe, args.scan, args.sequential)  # server idle, just before the load
        before = _batches(info["metrics"])
        t0 = time.perf_counter()
        res["load"] = summarize(load(info["url"], args.scan, args.clients, args.requests, args.timeout + 30),
                                time.perf_counter() - t0)
        res["load"]["clients"] = args.clients
        res["throughput_vs_in_process"] = round(res["load"]["per_s"] / res["in_process"]["per_s"], 2)
        time.sleep(12)  # Ray's metrics agent exports every few seconds
        res["load"]["vision_batches"] = _sizes(before, _batches(info["metrics"]))
        log(f"  load: {res['load']}, {res['throughput_vs_in_process']}x in process")
        if fault:
            res["fault"] = fault_run(proc, info, args)
            log(f"  fault: {res['fault']}")
    finally:
        res["server_exit"] = stop_server(proc)
    return res


def fault_run(proc: subprocess.Popen, info: dict, args) -> dict:
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
    out = summarize(results, time.perf_counter() - t0)
    out.update(killed_after_s=args.kill_after, client_timeout_s=args.timeout + 30)
    # the new replica's first row: the first 200 that ended over a second after the kill (an answer from the killed
    # replica would have been on its way within milliseconds)
    again = [end for status, _, _, _, end in results if status == 200 and end > killed["at"] + 1.0]
    if not again:  # the run ended before the replacement answered: ask until it does
        while requests.post(info["url"], files={"scan": (args.scan.name, args.scan.read_bytes())},
                            timeout=args.timeout + 30).status_code != 200:
            time.sleep(1)
        again = [time.perf_counter()]
    out["rows_again_s_after_kill"] = round(min(again) - killed["at"], 1)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--scan", type=Path, default=None, help="default: the MNI152 T1 in nilearn's wheel")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", action="append", default=None,
                    help='medblip-serve options as "key=value,..." (repeatable; "" is the default server)')
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--sequential", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--fault", action="store_true")
    ap.add_argument("--kill-after", type=float, default=5.0)
    args = ap.parse_args(argv)
    from ..runtime.pipeline import Pipeline

    if args.scan is None:
        from ..demo_scan import mni_t1_path

        args.scan = Path(mni_t1_path())
    configs = DEFAULT_CONFIGS if args.config is None else tuple(args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    res = {"command": "python -m medblip_edge.benchmarks.serve_load " + " ".join(argv or sys.argv[1:]),
           "machine": machine_info(), "load_before": os.getloadavg()}
    log("in process ...")
    pipe = Pipeline.from_bundle(args.bundle)
    for _ in range(2):
        pipe(args.scan)
    res["in_process"] = sequential(pipe, args.scan, args.sequential)
    res["vision_ms_per_scan_by_batch"] = vision_batch_costs(pipe, args.scan)
    res["side_by_side"] = side_by_side(args.bundle, args.scan, args.sequential)
    log(f"  {res['in_process']}, vision per scan by batch {res['vision_ms_per_scan_by_batch']}, "
        f"two at a time {res['side_by_side']}")
    res["configs"] = []
    for i, spec in enumerate(configs):
        log(f"server {spec or 'default'} ...")
        res["configs"].append(run_config(pipe, spec, args, log, fault=args.fault and i == 0))
    res["load_after"] = os.getloadavg()
    (args.out / "serve_load.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "report.md").write_text(report(res))
    print(report(res))


def report(r: dict) -> str:
    m, ip, sbs = r["machine"], r["in_process"], r["side_by_side"]
    lines = [f"# medblip-serve load run, {m.get('date', '')}", "",
             f"`{r['command']}`", "",
             f"Machine: {m.get('cpu', {}).get('model', '?')} ({', '.join(m.get('cpu', {}).get('flags', []))}), "
             f"{m.get('cores', {}).get('usable', '?')} cores; load average before {r['load_before'][0]:.2f}, after "
             f"{r['load_after'][0]:.2f}.", "",
             "In process, no server:", "",
             f"- sequential: p50 {ip['p50_ms']} ms, {ip['per_s']} scans/s",
             f"- {sbs['lanes']} calls at a time, one compute thread each: {sbs['per_s']} scans/s "
             f"({sbs['per_s'] / ip['per_s']:.2f}x sequential)",
             "- vision per scan by batch size (ms): " + ", ".join(f"{b}: {ms}" for b, ms in
                                                             r["vision_ms_per_scan_by_batch"].items()), "",
             f"| server | max batch | one client p50 | in process p50 (interleaved) | overhead p50 | "
             f"{r['configs'][0]['load']['clients']} clients p50 / p99 | failed | scans/s | vs in process | batches |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in r["configs"]:
        one, ld, s = c["one_client"], c["load"], c["server"]
        name = f"{c['config']} ({s['replicas']} x {s['threads']} threads)"
        lines.append(f"| {name} | {s['max_batch']} | {one['server_p50_ms']} ms | {one['in_process_p50_ms']} ms | "
                     f"{one['overhead_p50_ms']} ms | {ld['p50_ms']} / {ld['p99_ms']} ms | {ld['failed']} | "
                     f"{ld['per_s']} | {c['throughput_vs_in_process']}x | {ld['vision_batches']} |")
    lines += ["", "Server-Timing p50 (ms) of the one-client requests: upload, read (load + preprocess), vision, "
              "llm as the replica saw them (queues and batch waits included), app (the replica's whole handler), "
              "compute (the row's own stage timings), http_and_hop (client wall time minus app):", ""]
    for c in r["configs"]:
        lines.append(f"- {c['config']}: {c['one_client']['server_timing_p50_ms']}")
    lines.append("")
    for c in r["configs"]:
        if "fault" in c:
            f = c["fault"]
            lines += [f"Fault run ({c['config']}): replica killed {f['killed_after_s']} s into {f['requests']} "
                      f"requests: answers {f['statuses']}; slowest answer {f['max_ms']} ms (client limit "
                      f"{f['client_timeout_s']} s); rows again {f['rows_again_s_after_kill']} s after the kill.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

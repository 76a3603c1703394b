"""`medblip-bench serve-load`: a load run against `medblip-serve`, beside the in-process pipeline in the same run.

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
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click

from ..errors import MedblipError
from .suite import Outcome, Run, suite
from .timing import Clock, now, p50_ms, summary, time_calls

DEFAULT_CONFIGS = ("", "max_batch=4,batch_wait_ms=10", "replicas=2,threads=1")


@dataclass
class LoadOptions:
    """The suite's options, as every step of the run reads them."""

    bundle: Path
    scan: Path
    configs: tuple[str, ...]
    clients: int
    requests: int
    sequential: int
    timeout: float
    fault: bool
    kill_after: float


def sequential(pipe, scan: Path, n: int) -> dict:
    clock = Clock()
    s = summary(time_calls(lambda: pipe(scan), "cpu", n, warmup=0)[0])
    return {"calls": n, "p50_ms": s["p50"], "p99_ms": s["p99"], "per_s": round(n / clock.elapsed_s(), 3)}


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
            clock = Clock()
            list(pool.map(lambda _: pipe(scan), range(n)))
            wall = clock.elapsed_s()
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
        raise MedblipError(f"medblip-serve did not start: {' '.join(cmd)}", code="bench_failed")
    return proc, json.loads(line)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(180)


def _batches(metrics_url: str) -> dict:
    """{batch size upper bound: cumulative count} of medblip_vision_batch_size."""
    import requests

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
    import requests

    data, session, clock = scan.read_bytes(), requests.Session(), Clock()
    local, served, timing = [], [], []
    for _ in range(n):
        t = clock.now()
        pipe(scan)
        local.append(clock.ms_since(t))
        t = clock.now()
        r = session.post(url, files={"scan": (scan.name, data)}, timeout=timeout)
        served.append(clock.ms_since(t))
        if r.status_code != 200:
            raise MedblipError(f"the server answered {r.status_code}: {r.text[:200]}", code="bench_failed")
        st = parse_server_timing(r.headers.get("Server-Timing", ""))
        st["compute"] = r.json()["timings_ms"]["total"]
        st["http_and_hop"] = served[-1] - st.get("app", 0.0)
        timing.append(st)
    return {"pairs": n, "in_process_p50_ms": summary(local)["p50"], "server_p50_ms": summary(served)["p50"],
            "overhead_p50_ms": round(statistics.median(b - a for a, b in zip(local, served)), 1),
            "server_timing_p50_ms": {k: round(statistics.median(t[k] for t in timing), 1) for k in timing[0]}}


def load(url: str, scan: Path, clients: int, n: int, timeout: float, during=None) -> list[tuple]:
    """n POSTs from `clients` threads -> [(status or None, ms, error code or exception name, start, end)]
    (start and end: the shared clock's seconds, timing.now())."""
    import requests

    data = scan.read_bytes()

    def one(i):
        t = now()
        try:
            r = requests.post(url, files={"scan": (scan.name, data)}, timeout=timeout)
            code = r.json().get("error", {}).get("code") if r.headers.get("content-type", "").startswith(
                "application/json") else r.text[:80]
            status = r.status_code
        except requests.RequestException as e:
            status, code = None, type(e).__name__
        end = now()
        return status, (end - t) * 1e3, code, t, end

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
    s = summary(ok)
    return {"requests": len(results), "ok": len(ok), "failed": len(results) - len(ok), "statuses": statuses,
            "p50_ms": s["p50"], "p99_ms": s["p99"], "max_ms": summary([r[1] for r in results])["max"],
            "per_s": round(len(ok) / wall, 3)}


def run_config(run: Run, pipe, spec: str, opts: LoadOptions, fault: bool) -> dict:
    proc, info = start_server(opts.bundle, spec, opts.timeout)
    res: dict = {"config": spec or "default"}
    client_s = opts.timeout + 30
    try:
        res["server"] = {k: info[k] for k in ("replicas", "threads", "backend", "max_batch", "startup_s")}
        load(info["url"], opts.scan, 1, 3, client_s)  # warm-up
        res["one_client"] = interleaved(pipe, info["url"], opts.scan, opts.sequential, client_s)
        run.say(f"  one client: {res['one_client']}")
        time.sleep(3)
        res["in_process"] = sequential(pipe, opts.scan, opts.sequential)  # server idle, just before the load
        before = _batches(info["metrics"])
        clock = Clock()
        res["load"] = summarize(load(info["url"], opts.scan, opts.clients, opts.requests, client_s),
                                clock.elapsed_s())
        res["load"]["clients"] = opts.clients
        res["throughput_vs_in_process"] = round(res["load"]["per_s"] / res["in_process"]["per_s"], 2)
        time.sleep(12)  # Ray's metrics agent exports every few seconds
        res["load"]["vision_batches"] = _sizes(before, _batches(info["metrics"]))
        run.say(f"  load: {res['load']}, {res['throughput_vs_in_process']}x in process")
        if fault:
            res["fault"] = fault_run(proc, info, opts)
            run.say(f"  fault: {res['fault']}")
    finally:
        res["server_exit"] = stop_server(proc)
    return res


def fault_run(proc: subprocess.Popen, info: dict, opts: LoadOptions) -> dict:
    import psutil
    import requests

    replica = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "ServeReplica" in " ".join(p.cmdline())][0]
    killed, client_s = {}, opts.timeout + 30

    def kill():
        time.sleep(opts.kill_after)
        killed["at"] = now()
        replica.kill()

    clock = Clock()
    results = load(info["url"], opts.scan, opts.clients, opts.requests, client_s,
                   during=threading.Thread(target=kill, daemon=True).start)
    out = summarize(results, clock.elapsed_s())
    out.update(killed_after_s=opts.kill_after, client_timeout_s=client_s)
    # the new replica's first row: the first 200 that ended over a second after the kill (an answer from the killed
    # replica would have been on its way within milliseconds)
    again = [end for status, _, _, _, end in results if status == 200 and end > killed["at"] + 1.0]
    if not again:  # the run ended before the replacement answered: ask until it does
        while requests.post(info["url"], files={"scan": (opts.scan.name, opts.scan.read_bytes())},
                            timeout=client_s).status_code != 200:
            time.sleep(1)
        again = [now()]
    out["rows_again_s_after_kill"] = round(min(again) - killed["at"], 1)
    return out


def measure(run: Run, opts: LoadOptions) -> dict:
    from ..runtime.pipeline import Pipeline

    run.say("in process ...")
    pipe = Pipeline.from_bundle(opts.bundle)
    for _ in range(2):
        pipe(opts.scan)
    res = {"in_process": sequential(pipe, opts.scan, opts.sequential),
           "vision_ms_per_scan_by_batch": vision_batch_costs(pipe, opts.scan),
           "side_by_side": side_by_side(opts.bundle, opts.scan, opts.sequential)}
    run.say(f"  {res['in_process']}, vision per scan by batch {res['vision_ms_per_scan_by_batch']}, "
            f"two at a time {res['side_by_side']}")
    res["configs"] = []
    for i, spec in enumerate(opts.configs):
        run.say(f"server {spec or 'default'} ...")
        res["configs"].append(run_config(run, pipe, spec, opts, fault=opts.fault and i == 0))
    return res


def report(r: dict) -> str:
    ip, sbs = r["in_process"], r["side_by_side"]
    lines = ["In process, no server:", "",
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


def _configs(ctx, param, value: tuple) -> tuple[str, ...]:
    """--config values checked at parse time (a bad one is a usage error before any server starts)."""
    for spec in value:
        try:
            config_flags(spec)
        except SystemExit as e:
            raise click.BadParameter(str(e)) from None
    return value or DEFAULT_CONFIGS


@suite("serve-load")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Bundle to serve and to run in process.")
@click.option("--scan", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Scan every request uploads [default: the MNI152 T1 in nilearn's wheel].")
@click.option("--config", "configs", multiple=True, callback=_configs,
              help='medblip-serve options as "key=value,..." (`_` for `-`; repeatable; "" is the default server) '
                   '[default: "", "max_batch=4,batch_wait_ms=10", "replicas=2,threads=1"].')
@click.option("--clients", type=int, default=8, show_default=True, help="Clients at once in the load run.")
@click.option("--requests", type=int, default=200, show_default=True, help="Requests in the load run.")
@click.option("--sequential", type=int, default=20, show_default=True,
              help="In-process calls per sequential block and one-client pairs.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="The server's per-request limit in seconds (clients wait 30 s more).")
@click.option("--fault", is_flag=True, help="On the first configuration, another load run during which the replica "
              "is killed (SIGKILL): every request's status and latency, and how long until rows came again.")
@click.option("--kill-after", type=float, default=5.0, show_default=True, help="--fault: seconds into that run.")
def command(run: Run, bundle: Path, scan: Path | None, configs: tuple, clients: int, requests: int, sequential: int,
            timeout: float, fault: bool, kill_after: float) -> Outcome:
    """Run the real medblip-serve (a local Ray cluster on 127.0.0.1) under load, beside the in-process pipeline
    on the same machine in the same run; needs the serve extra.

    \b
    Measures:
      in process: the sequential rate, vision per scan at batch 1, 2, 4, two calls at a time
      per server configuration: one client interleaved with in-process calls (the server's overhead,
        split by its Server-Timing header); --clients at once (p50/p99, scans/s against the
        in-process rate, failed requests, vision batch sizes from the server's metrics)
      with --fault: a replica killed mid-run
    """
    if scan is None:
        from .bundles import mni_scan

        scan = mni_scan()
    opts = LoadOptions(bundle, scan, configs, clients, requests, sequential, timeout, fault, kill_after)
    return Outcome("medblip-serve load run", measure(run, opts), report)


if __name__ == "__main__":  # the old module path
    from .moved import forward

    forward("serve-load")

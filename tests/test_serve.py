"""`medblip-serve` on a real local Ray cluster on 127.0.0.1: rows, health, metrics, bad requests, load, faults, stop.

One server (the real console command, tiny bundle) is shared by the tests that leave it as they found it; the
two that kill a replica or stop the server with SIGTERM start their own, so the tests pass in any order. Every
HTTP call has a client timeout. The whole module is in the slow tier (a Ray cluster per server).
"""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import json
import re
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest

requests = pytest.importorskip("requests", reason="the serve extra is not installed")
pytest.importorskip("ray.serve", reason="the serve extra (Ray Serve) is not installed")

from commands import console_command  # noqa: E402
from medblip_edge.benchmarks.serve_load import config_flags, parse_server_timing  # noqa: E402
from medblip_edge.serve.replica import default_max_batch  # noqa: E402
from volumes import real_volume  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT_S = 60.0  # the server's per-request limit
CLIENT_S = TIMEOUT_S + 40.0  # a client that waits longer than that has found a hang
MAX_BODY_MB = 20
SECRET_TEXT = "Jane Doe, born 1970-01-01, MRN 99887766. "
SECRET_NAME = "Doe_Jane_MRN99887766.nii"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory) -> Path:
    """A real T1 (nibabel's anatomical.nii, 33x41x25): quick to upload."""
    src = real_volume("anatomical")
    if src is None:
        pytest.skip("nibabel's anatomical.nii is not installed")
    return src


@contextmanager
def _serving(bundle: Path, folder: Path):
    """Start medblip-serve on `bundle` and stop it on leaving (unless a test stopped it):
    -> {"info": its ready line, "proc", "stderr": path, "url", "base"}."""
    port, metrics_port = _free_port(), _free_port()
    err_path = folder / "stderr.txt"
    err = open(err_path, "w")
    proc = subprocess.Popen([*console_command("medblip-serve"), "--bundle", str(bundle), "--port", str(port),
                             "--metrics-port", str(metrics_port), "--max-body-mb", str(MAX_BODY_MB),
                             "--timeout", str(TIMEOUT_S), "--batch-wait-ms", "50", "--max-batch", "4"],
                            stdout=subprocess.PIPE, stderr=err, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(300)
    if not line or not line[0].strip():
        proc.kill()
        proc.wait(30)
        err.close()
        pytest.fail("medblip-serve did not become ready: " + err_path.read_text()[-3000:])
    info = json.loads(line[0])
    try:
        yield {"info": info, "proc": proc, "stderr": err_path, "url": info["url"],
               "base": info["url"].rsplit("/v1/", 1)[0]}
    finally:
        if proc.poll() is None:  # still running: the test did not stop it
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        err.close()


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """The server shared by the tests that leave it as they found it."""
    with _serving(tiny_bundle, tmp_path_factory.mktemp("serve")) as state:
        yield state


@pytest.fixture
def own_server(tiny_bundle, tmp_path_factory):
    """A server for one test that kills part of it or stops it."""
    with _serving(tiny_bundle, tmp_path_factory.mktemp("serve-own")) as state:
        yield state


def _post(url, path=None, data=None, name=None, **kw):
    files = None if path is None else {"scan": (name or Path(path).name, Path(path).read_bytes())}
    return requests.post(url, files=files, data=data, timeout=CLIENT_S, **kw)


def _without_floats(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("timings_ms", "probabilities", "log_likelihoods")}


def test_served_row_equals_the_infer_row(server, mni_path, infer_cmd, tiny_bundle):
    text, question = "The subject is a 74 year old female. ", "Is there atrophy?"
    r = _post(server["url"], mni_path, data={"patient_text": text, "question": question})
    assert r.status_code == 200, r.text
    served = r.json()
    proc = subprocess.run([*infer_cmd, str(mni_path), "--bundle", str(tiny_bundle), "--patient-text", text,
                           "--question", question], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    local = json.loads(proc.stdout)
    assert served.keys() == local.keys() and served["timings_ms"].keys() == local["timings_ms"].keys()
    assert _without_floats(served) == _without_floats(local)
    assert served["probabilities"] == pytest.approx(local["probabilities"], rel=1e-5, abs=1e-7)
    assert served["log_likelihoods"] == pytest.approx(local["log_likelihoods"], rel=1e-5, abs=1e-5)
    # the Server-Timing header splits the replica's time; its steps hold the row's own stage timings
    timing = parse_server_timing(r.headers["Server-Timing"])
    assert list(timing) == ["upload", "read", "vision", "llm", "app"]
    stages = served["timings_ms"]
    assert timing["read"] >= stages["load"] + stages["preprocess"] - 0.01
    assert timing["llm"] >= stages["llm"] - 0.01
    assert timing["app"] >= sum(timing[k] for k in ("upload", "read", "vision", "llm")) - 0.01


def test_load_run_helpers_read_configurations_and_headers():
    assert config_flags("max_batch=4, batch_wait_ms=10") == ["--max-batch", "4", "--batch-wait-ms", "10"]
    assert config_flags("") == [] and config_flags("replicas=2,threads=1")[:2] == ["--replicas", "2"]
    with pytest.raises(SystemExit):
        config_flags("replicas")
    assert parse_server_timing("upload;dur=4.2, read;dur=80, x;desc=y") == {"upload": 4.2, "read": 80.0}


def test_default_vision_batch_is_one_on_cpu_and_the_graphs_largest_on_a_gpu():
    assert default_max_batch("cpu", 8, None) == 1
    assert default_max_batch("cuda", 8, None) == 8 and default_max_batch("cuda:1", 4, None) == 4
    assert default_max_batch("cuda", None, None) == 8
    assert default_max_batch("cpu", 8, 4) == 4 and default_max_batch("cpu", 2, 4) == 2
    assert default_max_batch("cuda", 8, 16) == 8


def test_health_readiness_and_routes(server):
    live = requests.get(server["info"]["live"], timeout=30)
    assert live.status_code == 200
    ready = requests.get(server["info"]["ready"], timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["random_weights"] is True
    assert ready.json()["max_batch"] == 4
    missing = requests.get(server["base"] + "/v1/nothing", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = requests.get(server["url"], timeout=30)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def _bad_requests(tmp: Path, scan: Path) -> list[tuple[str, dict, int, str]]:
    """(what, requests.post kwargs, status, code)."""
    raw = scan.read_bytes()
    cut = tmp / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw)[:2000])
    const = tmp / "constant.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 9, 10), 7, np.int16), np.eye(4)), const)
    big = b"\0" * (MAX_BODY_MB * 2**20 + 1)
    return [
        ("wrong content type", {"data": raw, "headers": {"Content-Type": "application/octet-stream"}}, 415,
         "unsupported_media_type"),
        ("json body", {"json": {"scan": "x"}}, 415, "unsupported_media_type"),
        ("corrupt gzip upload", {"files": {"scan": (cut.name, cut.read_bytes())}}, 422, "corrupt_gzip"),
        ("constant volume", {"files": {"scan": (const.name, const.read_bytes())}}, 422, "constant_volume"),
        ("not a scan at all", {"files": {"scan": ("notes.nii", b"hello")}}, 422, "not_nifti"),
        ("oversized body", {"files": {"scan": ("big.nii", big)}}, 413, "body_too_large"),
        ("no scan part", {"files": {"patient_text": (None, "x")}}, 400, "missing_scan"),
        ("unknown field", {"files": {"scan": ("a.nii", raw), "patient-text": (None, "x")}}, 400, "unknown_field"),
        ("broken multipart", {"data": b"--b\r\nContent-Disposition: form-data; name=\"scan\"; filename=\"a.nii\"\r\n",
                              "headers": {"Content-Type": "multipart/form-data; boundary=b"}}, 400, "bad_multipart"),
    ]


def test_bad_requests_get_their_code_and_the_next_request_is_served(server, small_scan, tmp_path):
    for what, kwargs, status, code in _bad_requests(tmp_path, small_scan):
        r = requests.post(server["url"], timeout=CLIENT_S, **kwargs)
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        body = r.json()
        assert body["error"]["code"] == code, (what, body)
        assert "\n" not in body["error"]["message"] and str(tmp_path) not in r.text
        if status == 422:  # a scan that was read: the error row medblip-infer writes
            assert body["scan"] == kwargs["files"]["scan"][0] and len(body["scan_sha256"]) == 64
        ok = _post(server["url"], small_scan)
        assert ok.status_code == 200 and ok.json()["label"] in ("AD", "MCI", "NC"), (what, ok.text[:300])


def _metrics(server) -> str:
    return requests.get(server["info"]["metrics"], timeout=30).text


def _value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_load_run_batches_across_requests(server, small_scan):
    """8 clients, 48 requests: every one answered with a row, and some vision batches hold several scans."""
    def one(i):
        t0 = time.monotonic()
        r = _post(server["url"], small_scan, data={"patient_text": f"subject {i}. "})
        return r.status_code, time.monotonic() - t0

    count = lambda text, name, **labels: _value(text, f"ray_medblip_{name}_count", **labels)  # noqa: E731
    before = _metrics(server)
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(48)))
    assert [s for s, _ in results] == [200] * 48
    deadline = time.monotonic() + 90  # Ray's metrics agent exports every few seconds
    while True:
        text = _metrics(server)
        scans = count(text, "stage_ms", stage="vision") - count(before, "stage_ms", stage="vision")
        if scans >= 48:
            break
        assert time.monotonic() < deadline, "the load run never reached the metrics endpoint"
        time.sleep(2)
    batches = count(text, "vision_batch_size") - count(before, "vision_batch_size")
    # Both deltas come from the same two snapshots, so scans an earlier test sent that reached the endpoint
    # only after `before` count in both: fewer batches than scans means some batch held several scans
    assert 0 < batches < scans


def test_metrics_endpoint_has_ray_and_pipeline_series(server, small_scan):
    # the series this test reads come from its own requests: a scan answered, a corrupt one, a wrong body
    assert _post(server["url"], small_scan).status_code == 200
    cut = gzip.compress(small_scan.read_bytes())[:2000]
    assert requests.post(server["url"], files={"scan": ("cut.nii.gz", cut)}, timeout=CLIENT_S).status_code == 422
    requests.post(server["url"], data=b"x", headers={"Content-Type": "text/plain"}, timeout=CLIENT_S)
    deadline = time.monotonic() + 60
    while True:
        text = _metrics(server)
        if _value(text, "ray_medblip_errors_total", code="unsupported_media_type") >= 1 and \
                _value(text, "ray_medblip_stage_ms_count", stage="vision") >= 1 and \
                _value(text, "ray_medblip_errors_total", code="corrupt_gzip") >= 1:
            break
        assert time.monotonic() < deadline, "pipeline series missing from the metrics endpoint"
        time.sleep(2)
    for stage in ("upload", "load", "preprocess", "vision", "llm", "total"):
        assert _value(text, "ray_medblip_stage_ms_count", stage=stage) >= 1, stage
    assert _value(text, "ray_medblip_requests_total", status="200") >= 1
    assert re.search(r"^ray_serve_deployment_processing_latency_ms_bucket", text, re.M)  # Ray Serve's own
    assert _value(text, "ray_medblip_errors_total", code="corrupt_gzip") >= 1


def test_no_scan_bytes_names_or_patient_text_in_logs(server, small_scan):
    r = _post(server["url"], small_scan, data={"patient_text": SECRET_TEXT}, name=SECRET_NAME)
    assert r.status_code == 200 and r.json()["scan"] == SECRET_NAME
    bad = requests.post(server["url"], files={"scan": (SECRET_NAME, b"not a scan " + SECRET_TEXT.encode())},
                        data={"patient_text": SECRET_TEXT}, timeout=CLIENT_S)
    assert bad.status_code == 422
    time.sleep(2)  # log lines are flushed
    logs = [server["stderr"]] + [p for p in Path(server["info"]["ray_logs"]).rglob("*") if p.is_file()
                                 and p.suffix in (".log", ".out", ".err", ".txt", "")]
    assert len(logs) > 5
    for path in logs:
        try:
            text = path.read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        for secret in ("Jane Doe", "99887766", "1970-01-01"):
            assert secret not in text, f"{secret!r} in {path.name}"


def _replica(server) -> psutil.Process:
    tree = psutil.Process(server["proc"].pid).children(recursive=True)
    found = [p for p in tree if "ServeReplica" in " ".join(p.cmdline())]
    assert len(found) == 1, [p.cmdline()[:1] for p in tree]
    return found[0]


def test_the_replica_runs_at_the_default_priority(server):
    """Ray starts workers at nice 15; a local cluster started by medblip-serve runs them at 0."""
    assert _replica(server).nice() == 0


def test_a_killed_replica_is_replaced_and_no_request_hangs(own_server, small_scan):
    server = own_server
    victim = _replica(server)
    answers: list = []

    def one(i):
        t0 = time.monotonic()
        try:
            r = _post(server["url"], small_scan)
            answers.append((r.status_code, r.headers.get("content-type", ""), r.text[:200], time.monotonic() - t0))
        except requests.RequestException as e:  # a dropped connection is an answer too, not a hang
            answers.append((None, "", type(e).__name__, time.monotonic() - t0))

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        deadline = time.monotonic() + CLIENT_S
        while not answers and time.monotonic() < deadline:  # the replica is serving: kill it amid the requests
            time.sleep(0.01)
        victim.kill()
        cf.wait(futures, timeout=CLIENT_S + 30)
    assert len(answers) == 24 and max(a[3] for a in answers) < CLIENT_S
    assert any(a[0] == 200 for a in answers)
    for status, ctype, body, _ in answers:
        assert status == 200 or status is None or status >= 500, body
    deadline = time.monotonic() + 180
    while True:  # Serve starts a new replica, which loads and verifies the bundle again
        r = _post(server["url"], small_scan)
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, r.text[:300]
        time.sleep(2)
    assert _replica(server).pid != victim.pid


def _held_post(url: str, scan: Path, sent: threading.Event, go: threading.Event) -> int:
    """POST `scan` with all of the body but its last bytes, set `sent`, and finish it once `go` is set: the request
    is in the server, and cannot be answered, until then. -> the status code."""
    prepared = requests.Request("POST", url, files={"scan": (scan.name, scan.read_bytes())}).prepare()
    body = prepared.body

    def chunks():
        yield body[:-64]
        sent.set()  # the first chunk was written when the next one is asked for
        go.wait(CLIENT_S)
        yield body[-64:]

    return requests.post(url, data=chunks(), headers={"Content-Type": prepared.headers["Content-Type"]},
                         timeout=CLIENT_S).status_code


def test_sigterm_finishes_requests_in_flight_and_leaves_no_process(own_server, small_scan):
    server = own_server
    proc = server["proc"]
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) >= 4  # gcs, raylet, controller, proxy, replica, ...
    results: list = []
    sent, go = [threading.Event() for _ in range(3)], threading.Event()
    threads = [threading.Thread(target=lambda e=e: results.append(_held_post(server["url"], small_scan, e, go)))
               for e in sent]
    for t in threads:
        t.start()
    assert all(e.wait(CLIENT_S) for e in sent), "the requests never reached the server"
    time.sleep(0.5)  # the proxy hands each request to the replica on its headers, before the body ends
    proc.send_signal(signal.SIGTERM)
    go.set()  # the rest of the bodies: answered while the server stops
    for t in threads:
        t.join(CLIENT_S)
    assert proc.wait(120) == 0
    assert results == [200, 200, 200]
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [p.pid for p in alive]
    assert not Path(server["info"]["ray_logs"]).exists()
    assert "Traceback" not in server["stderr"].read_text()

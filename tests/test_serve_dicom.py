"""medblip-serve's DICOM uploads: a zip of a series' files and a multipart/related (application/dicom) body, parsed
by the server's real upload reader from a Starlette request, give the row medblip-infer's pipeline gives for the
series folder; bad zips and wrong part types get their codes. The last test posts both to a running server."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import threading
import time
import uuid
import zipfile

import pytest

import dicom_fixtures as fx
from commands import console_command
from node_study import FakeStudy
from orthanc import free_port

pytest.importorskip("python_multipart")
pytest.importorskip("starlette")
pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-dicom")
    s = FakeStudy(root / "studies", "echo")
    try:
        return s.add_series("T1", 5, root)
    except fx.Missing as e:
        pytest.skip(f"{e} is not installed")


def _zip(folder, members=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in fx.files(folder):
            zf.write(f, f"T1/{f.name}")
        for name, data in (members or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def _form(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"scan\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/zip\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _related(files, part_type="application/dicom") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for f in files:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _read(body: bytes, content_type: str, query: str = "", max_bytes: int = 1 << 30):
    """The server's upload reader on a real Starlette request carrying `body`."""
    from starlette.requests import Request

    from medblip_edge.serve.upload import read_upload

    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)] or [b""]
    state = {"i": 0}

    async def receive():
        i = state["i"]
        state["i"] += 1
        if i >= len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    scope = {"type": "http", "method": "POST", "path": "/v1/infer", "query_string": query.encode(),
             "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]}
    return asyncio.run(read_upload(Request(scope, receive), max_bytes))


def test_zip_and_related_uploads_read_as_the_series_folder(series, tiny_bundle):
    from medblip_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(tiny_bundle, huge_pages=False)
    local = pipe(series)
    zipped = _read(*_form("T1.zip", _zip(series)))
    related = _read(*_related(fx.files(series)), query="patient_text=74+year+old.+")
    try:
        assert zipped.path.name == "T1" and zipped.path.is_dir()
        assert related.patient_text == "74 year old. " and len(fx.files(related.path)) == len(fx.files(series))
        for upload in (zipped, related):
            row = pipe(upload.path)
            assert row["label"] == local["label"] and row["series"] == local["series"]
            assert row["probabilities"] == pytest.approx(local["probabilities"], abs=1e-6)
        assert pipe(zipped.path)["scan"] == local["scan"] == "T1"
    finally:
        zipped.cleanup()
        related.cleanup()


@pytest.mark.parametrize("case, status, code", [
    ("traversal", 400, "bad_zip"), ("bomb", 413, "zip_too_large"), ("broken", 400, "bad_zip"),
    ("wrong_part", 415, "unsupported_media_type"), ("empty_related", 400, "missing_scan")])
def test_bad_dicom_uploads_get_their_code(series, case, status, code):
    from medblip_edge.serve.upload import RequestError

    if case == "traversal":
        args = _form("T1.zip", _zip(series, {"../../etc/evil": b"x"}))
    elif case == "bomb":
        args = _form("T1.zip", _zip(series, {"big.bin": b"\0" * (8 << 20)}))
    elif case == "broken":
        args = _form("T1.zip", _zip(series)[:2000])
    elif case == "wrong_part":
        args = _related(fx.files(series)[:2], part_type="text/plain")
    else:
        boundary = uuid.uuid4().hex
        args = (f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}')
    with pytest.raises(RequestError) as e:
        _read(*args, max_bytes=4 << 20)
    assert (e.value.status, e.value.code) == (status, code)


@pytest.mark.slow
def test_server_takes_a_zip_and_a_stow_body_and_a_second_sigterm_stops_it(series, tiny_bundle, tmp_path):
    import requests

    port = free_port()
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([*console_command("medblip-serve"), "--bundle", str(tiny_bundle), "--port", str(port),
                             "--metrics-port", str(free_port())], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line: list[str] = []
        t = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        t.start()
        t.join(300)
        assert line and line[0].strip(), (tmp_path / "stderr.txt").read_text()[-3000:]
        url = json.loads(line[0])["url"]
        z = requests.post(url, files={"scan": ("T1.zip", _zip(series))}, timeout=300)
        body, ctype = _related(fx.files(series))
        r = requests.post(url, data=body, headers={"Content-Type": ctype}, timeout=300)
        assert z.status_code == 200 and r.status_code == 200, (z.text, r.text)
        assert z.json()["scan"] == "T1" and z.json()["label"] == r.json()["label"]
        assert z.json()["probabilities"] == pytest.approx(r.json()["probabilities"], abs=1e-6)
        # a second SIGTERM during the graceful stop ends it at once, leaving no process of the server behind
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the local Ray cluster
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 128 + signal.SIGTERM and time.monotonic() - t0 < 10
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
        assert "second signal" in (tmp_path / "stderr.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        err.close()

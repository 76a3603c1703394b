"""Where a result goes: a DICOM C-STORE SCP (AET@HOST:PORT) or a DICOMweb STOW-RS service. One class each.

`send(path)` sends one SR file and returns once the destination acknowledged it, or raises SendError
(a one-line reason with a code, no tag value). Retrying is the outbox's job (node.py), not theirs.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import MedblipError
from ..preprocess.dicom_files import quiet_pydicom
from ..quiet import detached_logs

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


class SendError(MedblipError):
    code = "send_failed"


def parse_peer(text: str) -> tuple[str, str, int]:
    """'AET@HOST:PORT' -> (aet, host, port); raises MedblipError(usage)."""
    m = re.fullmatch(r"([^@\\]{1,16})@([^:@]+):(\d{1,5})", text or "")
    if not m or not 0 < int(m.group(3)) < 65536:
        raise MedblipError(f"--send-to: expected AET@HOST:PORT (an AE title of at most 16 characters), got {text!r}",
                           code="usage")
    return m.group(1), m.group(2), int(m.group(3))


class CStoreDestination:
    """C-STORE over one association per result (Comprehensive 3D SR, Explicit VR Little Endian)."""

    def __init__(self, peer: str, calling_aet: str, timeout_s: float = 30.0):
        self.aet, self.host, self.port = parse_peer(peer)
        self.calling_aet, self.timeout_s = calling_aet, timeout_s

    def __str__(self) -> str:
        return f"C-STORE to {self.aet}@{self.host}:{self.port}"

    def send(self, path: Path) -> None:
        import pydicom
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # noqa: F401 -- registers the SOP class names
        from pydicom.uid import ExplicitVRLittleEndian

        with quiet_pydicom():
            ds = pydicom.dcmread(path)
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.add_requested_context(COMPREHENSIVE_3D_SR, ExplicitVRLittleEndian)
        with detached_logs("pynetdicom"):
            assoc = ae.associate(self.host, self.port, ae_title=self.aet)
            if not assoc.is_established:
                raise SendError(f"{self}: association {'rejected' if assoc.is_rejected else 'not established'}",
                                code="destination_unreachable")
            try:
                status = assoc.send_c_store(ds)
            finally:
                if assoc.is_established:
                    assoc.release()
        code = int(status.Status) if status is not None and "Status" in status else None
        if code is None:
            raise SendError(f"{self}: no C-STORE response", code="send_failed")
        if code != 0 and not 0xB000 <= code <= 0xBFFF:  # success, or warning (the instance was stored)
            raise SendError(f"{self}: C-STORE status 0x{code:04X}", code="send_refused")


class StowDestination:
    """STOW-RS (dicomweb-client) to a DICOMweb root URL, e.g. http://127.0.0.1:8042/dicom-web."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        if not re.match(r"https?://", url or ""):
            raise MedblipError(f"--dicomweb: expected an http(s) URL, got {url!r}", code="usage")
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def __str__(self) -> str:
        return "STOW-RS to the --dicomweb service"

    def send(self, path: Path) -> None:
        import pydicom
        import requests
        from dicomweb_client.api import DICOMwebClient

        with quiet_pydicom():
            ds = pydicom.dcmread(path)
        session = requests.Session()
        client = DICOMwebClient(url=self.url, session=session)
        try:
            with detached_logs("dicomweb_client"):
                response = client.store_instances([ds])
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else "?"
            raise SendError(f"{self}: HTTP {status}", code="send_refused") from None
        except requests.RequestException as e:
            raise SendError(f"{self}: {type(e).__name__}", code="destination_unreachable") from None
        finally:
            session.close()
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            raise SendError(f"{self}: the service refused the SR", code="send_refused")

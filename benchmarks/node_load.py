"""`medblip-bench node-load`: senders at once against one medblip-node, every study answered exactly once.

The studies are the MNI152 T1 template (nilearn's wheel) downsampled 4x (50x59 pixels, 48 slices of
4 mm), written in memory as MR Image Storage instances with pydicom, one study each with its own
UIDs. The node runs in this process (`node.service.Node`, the command's code, on a spool in a
temporary folder); its destination is a C-STORE SCP here that records every SR it receives. Each
sender sends its studies one after another, one association per study.

Measured: the time to send everything, the time until every study had its SR, per study the time
from its last instance acknowledged to its SR received (the quiet timer is part of it), and the SRs
per study (the run fails unless every study got exactly one).
"""

from __future__ import annotations

import io
import json
import tempfile
import threading
import time
from pathlib import Path

import click

from ..errors import MedblipError
from .suite import Outcome, Run, suite
from .timing import summary

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
RULES = {"min_slices": 16, "max_pixel_spacing_mm": 5, "max_slice_thickness_mm": 5}  # the 4 mm test volume


def _volume():
    import nibabel as nib
    import numpy as np

    from .bundles import mni_scan

    data = np.asarray(nib.load(mni_scan()).dataobj)[::4, ::4, ::4]  # x, y, z; 4 mm
    return data.astype(np.int16)


def _study(volume, n: int) -> list:
    """One study of one series: pydicom Datasets (MR Image Storage, explicit VR little endian), slices along z."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    study, series = generate_uid(), generate_uid()
    out = []
    for z in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = MR_IMAGE, ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE, generate_uid()
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"Bench^{n}", f"BENCH{n}", "", ""
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261205", "120000", "", str(n)
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, z + 1
        ds.ImageType, ds.MRAcquisitionType = ["ORIGINAL", "PRIMARY", "M", "ND"], "3D"
        ds.ImagePositionPatient = [0.0, 0.0, 4.0 * z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [4.0, 4.0], 4.0
        plane = volume[:, :, z].T  # rows along y, columns along x
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = plane.astype("<i2").tobytes()
        out.append(ds)
    return out


class _Destination:
    """A C-STORE SCP taking Comprehensive 3D SRs: (study UID, SOP instance UID, monotonic time) per SR."""

    def __init__(self):
        from pynetdicom import AE, evt

        self.received: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="BENCHDEST")
        ae.add_supported_context(SR_3D)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event):
        ds = event.dataset
        with self.lock:
            self.received.append((str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), time.monotonic()))
        return 0x0000

    def stop(self):
        self.server.shutdown()


def _send(datasets: list, port: int) -> float:
    """C-STORE one study over one association; -> monotonic time its last instance was acknowledged."""
    from pynetdicom import AE

    ae = AE(ae_title="BENCHSCU")
    ae.dimse_timeout = ae.network_timeout = 120  # a loaded machine can hold a store past pynetdicom's 30 s default
    ae.add_requested_context(MR_IMAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDBLIP")
    if not assoc.is_established:
        raise MedblipError("the node refused the association", code="bench_failed")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if "Status" in status else None
            if code != 0:
                raise MedblipError(f"the node answered an instance with status "
                                   f"{'none (no response)' if code is None else hex(code)}", code="bench_failed")
        return time.monotonic()
    finally:
        assoc.release()


def measure(run: Run, bundle: Path, senders: int, studies: int, quiet_s: float, timeout_s: float) -> dict:
    import logging

    from ..node.service import Node, NodeOptions

    logging.getLogger("pynetdicom").propagate = False
    volume = _volume()
    work = [[_study(volume, i * studies + j) for j in range(studies)] for i in range(senders)]
    run.say(f"{senders * studies} studies of {volume.shape[2]} instances made")
    dest = _Destination()
    with tempfile.TemporaryDirectory(prefix="medblip-node-load-") as tmp:
        rules = Path(tmp) / "rules.json"
        rules.write_text(json.dumps(RULES))
        node = Node(NodeOptions(bundle=str(bundle), spool=str(Path(tmp) / "spool"), port=0,
                                send_to=f"BENCHDEST@127.0.0.1:{dest.port}", rules=str(rules), quiet_s=quiet_s,
                                min_free_mb=0, retry_max_s=1.0), out=io.StringIO(), err=io.StringIO())
        port = node.start()["port"]
        last: dict[str, float] = {}
        errors: list[str] = []

        def sender(i: int) -> None:
            try:
                for datasets in work[i]:
                    last[str(datasets[0].StudyInstanceUID)] = _send(datasets, port)
            except Exception as e:  # noqa: BLE001 -- reported as the run's failure
                errors.append(f"{type(e).__name__}: {e}")

        t0 = time.monotonic()
        threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sent_s = time.monotonic() - t0
        run.say(f"sent in {sent_s:.1f} s; waiting for the SRs")
        want = {str(w[0].StudyInstanceUID) for row in work for w in row}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not errors:
            with dest.lock:
                if want <= {r[0] for r in dest.received}:
                    break
            time.sleep(0.1)
        answered_s = time.monotonic() - t0
        time.sleep(quiet_s + 2.0)  # anything sent twice would arrive by now
        node.stop()
    dest.stop()
    first: dict[str, float] = {}
    count: dict[str, int] = {}
    for study, _sop, t in dest.received:
        count[study] = count.get(study, 0) + 1
        first.setdefault(study, t)
    latency = [1000.0 * (first[s] - last[s]) for s in want if s in first and s in last]
    per_study = sorted(count.get(s, 0) for s in want)
    return {"senders": senders, "studies_each": studies, "instances_per_study": int(volume.shape[2]),
            "quiet_s": quiet_s, "send_s": round(sent_s, 2), "all_answered_s": round(answered_s, 2),
            "last_instance_to_sr_ms": summary(latency), "srs_per_study": {"min": per_study[0], "max": per_study[-1]},
            "exactly_once": per_study == [1] * len(want), "errors": errors,
            "random_weights": node.algorithm.random_weights}


def report(res: dict) -> str:
    lat = res["last_instance_to_sr_ms"]
    n = res["senders"] * res["studies_each"]
    return "\n".join([
        f"{res['senders']} senders x {res['studies_each']} studies ({n} studies of {res['instances_per_study']} "
        f"instances), quiet timer {res['quiet_s']:g} s:", "",
        "| sent in s | all answered in s | last instance -> SR p50 ms | p90 ms | max ms | SRs per study | exactly once |",
        "| ---: | ---: | ---: | ---: | ---: | --- | --- |",
        f"| {res['send_s']} | {res['all_answered_s']} | {lat['p50']} | {lat['p90']} | {lat['max']} | "
        f"{res['srs_per_study']['min']}..{res['srs_per_study']['max']} | {res['exactly_once']} |"])


@suite("node-load")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Bundle the node runs.")
@click.option("--senders", type=int, default=4, show_default=True, help="Senders at once.")
@click.option("--studies", type=int, default=5, show_default=True, help="Studies per sender.")
@click.option("--quiet-s", type=float, default=2.0, show_default=True, help="The node's quiet timer.")
@click.option("--timeout-s", type=float, default=600.0, show_default=True, help="Give up waiting after this.")
def command(run: Run, bundle: Path, senders: int, studies: int, quiet_s: float, timeout_s: float) -> Outcome:
    """Send studies from several senders at once to one medblip-node (in this process) and time each study's
    answer: last instance acknowledged to SR received by a C-STORE SCP standing in for the PACS. Fails
    unless every study got exactly one SR.
    """
    if senders < 1 or studies < 1:
        raise MedblipError("--senders and --studies must be at least 1", code="usage")
    data = measure(run, bundle, senders, studies, quiet_s, timeout_s)
    failed = None if data["exactly_once"] and not data["errors"] else "not every study got exactly one SR"
    return Outcome("medblip-node under load", data, report, failed=failed)

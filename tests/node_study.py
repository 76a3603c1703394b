"""Studies, senders and a node process for the medblip-node tests.

Each study is the marked MNI series of dicom_fixtures (47 slices of 49x58, 4 mm), written with fake but
recognisable patient data (names, IDs, dates, UIDs) that the tests then look for in the node's logs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dicom_fixtures as fx

REPO = Path(__file__).resolve().parent.parent
# Rules for the test series: the default rules want a 1 mm 3D T1; these are 4 mm, 47 slices.
TEST_RULES = {"min_slices": 16, "max_pixel_spacing_mm": 5, "max_slice_thickness_mm": 5}
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _mni_cache(root: Path) -> Path:
    """The marked MNI series written once per test session (copied for each study)."""
    base = root / "_mni_base"
    if not base.exists():
        fx.write_series(fx.marked_mni(), base)
    return base


class FakeStudy:
    """A study folder (one or more series) with its fake identifiers, to be sent and looked for."""

    def __init__(self, root: Path, tag: str):
        self.root = root / tag
        self.tag = tag
        self.study_uid = fx.uid(f"study-{tag}-{root}")
        self.patient_name = f"Fakename{tag.capitalize()}^Zelda"
        self.patient_id = f"ZZID-{abs(hash(tag)) % 10**6:06d}"
        self.birth_date = "19410203"
        self.accession = f"ACC{abs(hash(tag + 'a')) % 10**7:07d}"
        self.series: list[Path] = []

    def add_series(self, name: str, number: int, base_root: Path, **edits) -> Path:
        """A copy of the MNI series as series `number` of this study; `edits` are header keywords set on every file
        (None deletes). Returns its folder."""
        import pydicom

        src = _mni_cache(base_root)
        dst = self.root / name
        dst.mkdir(parents=True)
        series_uid = fx.uid(f"series-{self.tag}-{name}-{self.root}")
        for k, f in enumerate(fx.files(src)):
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID = self.study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = fx.uid(f"{series_uid}.{k}")
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = self.patient_name, self.patient_id, self.birth_date
            ds.AccessionNumber, ds.SeriesNumber, ds.SeriesDescription = self.accession, number, f"T1 3D {self.tag}"
            ds.StudyDescription = f"Brain {self.tag}"
            for key, value in edits.items():
                if value is None:
                    if key in ds:
                        delattr(ds, key)
                else:
                    setattr(ds, key, value)
            if "SOPClassUID" in edits:
                ds.file_meta.MediaStorageSOPClassUID = edits["SOPClassUID"]
            ds.save_as(dst / f.name)
        self.series.append(dst)
        return dst

    def secrets(self) -> list[str]:
        """Every identifying value of the study (and its series' and instances' UIDs) that no log may show."""
        import pydicom

        out = {self.patient_name, self.patient_name.split("^")[0], self.patient_id, self.birth_date, self.accession,
               self.study_uid, f"Brain {self.tag}", f"T1 3D {self.tag}"}
        for s in self.series:
            for f in fx.files(s):
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                out.update({str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)})
        return sorted(out)


def send(folder_or_files, port: int, aet: str = "MEDBLIP", *, abort_after: int | None = None,
         keep_open_s: float = 0.0, release=None) -> list[int]:
    """C-STORE files with pynetdicom (one association, every MR storage context); -> status per file sent.
    abort_after: abort the association after that many instances. keep_open_s: wait that long before releasing
    (or until the threading.Event `release` is set)."""
    import pydicom
    from pynetdicom import AE

    files = fx.files(folder_or_files) if isinstance(folder_or_files, Path) else list(folder_or_files)
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="TESTSCU")
    ae.dimse_timeout = ae.network_timeout = 120  # a loaded machine can hold a store past pynetdicom's 30 s default
    for sop in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop, [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:  # nothing proposed was accepted
        return [-1] * len(datasets)
    statuses = []
    try:
        for k, ds in enumerate(datasets):
            if abort_after is not None and k == abort_after:
                assoc.abort()
                return statuses
            try:
                status = assoc.send_c_store(ds)
            except ValueError:  # no accepted presentation context for this SOP class
                statuses.append(-1)
                continue
            statuses.append(int(status.Status) if "Status" in status else -2)
        if keep_open_s:
            if release is not None:
                release.wait(keep_open_s)
            else:
                time.sleep(keep_open_s)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def echo(port: int, aet: str = "MEDBLIP") -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -2
    finally:
        assoc.release()


class NodeProcess:
    """`python -m medblip_edge.cli_node` as a subprocess; stdout lines parsed as JSON, stderr kept in a file."""

    def __init__(self, folder: Path, bundle: Path, port: int, *args: str, quiet_s: float = 1.5, rules=TEST_RULES):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rules = self.folder / "rules.json"
        self.rules.write_text(json.dumps(rules))
        self.cmd = [sys.executable, "-m", "medblip_edge.cli_node", "--bundle", str(bundle), "--port", str(port),
                    "--spool", str(self.folder / "spool"), "--quiet-s", str(quiet_s), "--rules", str(self.rules),
                    "--min-free-mb", "0", "--retry-max-s", "1", *args]
        self.port = port
        self.proc = None
        self.lines: list[dict] = []
        self.runs = 0

    def start(self, timeout_s: float = 180.0) -> dict:
        self.launch()
        return self.wait_listening(timeout_s)

    def launch(self) -> None:
        """Start the process without waiting for it to listen (several nodes load their bundle at once)."""
        self.runs += 1
        env = dict(os.environ)
        self.err = open(self.folder / f"node-{self.runs}.err", "w")
        self.out_path = self.folder / f"node-{self.runs}.out"
        self.out = open(self.out_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=self.err, env=env, text=True)

    def wait_listening(self, timeout_s: float = 180.0) -> dict:
        run = self.runs
        listening = self.wait_line(lambda d: d.get("event") == "listening" and d.get("run", run) == run, timeout_s,
                                   only_last_run=True)
        assert listening, f"the node did not start: {self.stderr()[-3000:]}"
        return listening

    def read_lines(self, only_last_run: bool = False) -> list[dict]:
        out = []
        paths = [self.out_path] if only_last_run else sorted(self.folder.glob("node-*.out"))
        for path in paths:
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"unparsed": line})
        return out

    def wait_line(self, predicate, timeout_s: float, only_last_run: bool = False):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [d for d in self.read_lines(only_last_run) if predicate(d)]
            if found:
                return found[-1]
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        return None

    def results(self) -> list[dict]:
        return [d for d in self.read_lines() if d.get("event") == "result"]

    def stderr(self) -> str:
        return "".join(p.read_text() for p in sorted(self.folder.glob("node-*.err")))

    def stdout(self) -> str:
        return "".join(p.read_text() for p in sorted(self.folder.glob("node-*.out")))

    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.err.close()
            self.out.close()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.err.close()
        self.out.close()


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

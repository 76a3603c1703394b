"""Privacy: outputs and logs carry a scan's file name and SHA-256 only.

Never its directories, the NIfTI descrip/aux_file/intent_name fields or header
extensions, or the patient text, unless --include-paths is given (which adds the
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

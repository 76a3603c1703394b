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
    out = tmp_path / "results.csv"
    args = ["--bundle", str(tiny_bundle), "--patient-text", PATIENT_TEXT, "--question", "What do you see?"]
    scans = [str(private), str(private / "folder.nii.gz"), str(private / "missing.nii"),
             str(private / "cohort.csv")]
    proc = run(infer_cmd, *args, *scans)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["scan"] for r in rows] == ["scan01.nii.gz", "scan02.nii.gz", "folder.nii.gz", "missing.nii",
                                         "scan01.nii.gz", "scan03.nii"]
    assert [r.get("error", {}).get("code") for r in rows] == [None, "corrupt_gzip", "not_a_file", "not_found",
                                                              None, "not_found"]
    assert all("path" not in r for r in rows)
    assert_private(proc.stdout + proc.stderr, private)

    proc = run(infer_cmd, *args, "--out", str(out), *scans)  # the CSV output, and its logs
    assert proc.returncode == 1 and proc.stdout == ""
    assert_private(out.read_text() + proc.stderr, private)


def test_run_level_error_is_private(private, tiny_bundle, infer_cmd):
    proc = run(infer_cmd, "--bundle", str(tiny_bundle), str(private / "bad.csv"))
    assert proc.returncode == 2 and "error [bad_csv]" in proc.stderr and "Traceback" not in proc.stderr
    assert_private(proc.stdout + proc.stderr, private)


def test_include_paths_adds_the_path(private, tiny_bundle, infer_cmd):
    proc = run(infer_cmd, "--bundle", str(tiny_bundle), "--include-paths", "--patient-text", PATIENT_TEXT,
               str(private / "scan01.nii.gz"), str(private / "scan02.nii.gz"))
    assert proc.returncode == 1, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(private / "scan01.nii.gz"), str(private / "scan02.nii.gz")]
    # only the path: still no header fields or patient text
    rest = proc.stdout.replace(str(private), "<dir>") + proc.stderr
    assert_private(rest, private)


def test_copy_of_the_folder_gives_same_rows_minus_paths(private, tiny_bundle, infer_cmd, tmp_path):
    """Rows depend on the file contents, never on where the file is."""
    shutil.copy(private / "scan01.nii.gz", tmp_path / "scan01.nii.gz")
    rows = []
    for p in (private / "scan01.nii.gz", tmp_path / "scan01.nii.gz"):
        proc = run(infer_cmd, "--bundle", str(tiny_bundle), str(p))
        row = json.loads(proc.stdout)
        row.pop("timings_ms")
        rows.append(row)
    assert rows[0] == rows[1]

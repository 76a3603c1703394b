"""A study folder through the real `medblip-infer`: one row per series, a diagnosis or an error code each,
non-image objects skipped and counted; and what a converter (dcm2niix) changes about the model's input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import dicom_fixtures as fx

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("highdicom")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """PATIENT/STUDY/<series folders> with a DICOMDIR, a structured report, an RT structure set and a text file."""
    import pydicom

    root = tmp_path_factory.mktemp("study") / "study"
    try:
        img = fx.marked_mni()
        good = fx.write_series(img, root / "SE01_T1")
        fx.write_series(img, root / "SE02_T1_rescaled", rescale=(2.5, -100.0))
        fx.write_series(img, root / "SE03_T1_jpeg", compressor="JPEG")
        fx.multiframe(good, root / "SE04_enhanced" / "IM0001")
        fx.renumber(fx.delete_slice(good, root / "SE05_gap"))
        shutil.copytree(fx.pydicom_file("dicomdirtests/98892003/MR2"), root / "SE06_MR2")  # 3 series, 1 folder
        shutil.copytree(fx.pydicom_file("dicomdirtests/98892003/MR700"), root / "SE07_localizer")
        shutil.copy(fx.pydicom_file("dicomdirtests/DICOMDIR"), root / "DICOMDIR")
        shutil.copy(fx.pydicom_file("test-SR.dcm"), root / "SE01_T1" / "report")  # an SR among the images
        rt = pydicom.dcmread(fx.pydicom_file("rtstruct.dcm"), force=True)  # shipped without a preamble
        rt.save_as(root / "rtstruct", enforce_file_format=True)
    except fx.Missing as e:
        pytest.skip(f"{e} is not installed")
    (root / "README.txt").write_text("exported from a PACS\n")
    return root


def run(cmd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_one_row_per_series(study, tiny_bundle, infer_cmd):
    proc = run(infer_cmd, str(study), "--bundle", str(tiny_bundle))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    got = [(r["scan"], r.get("error", {}).get("code")) for r in rows]
    assert got == [("SE01_T1", None), ("SE02_T1_rescaled", None), ("SE03_T1_jpeg", None), ("SE04_enhanced", None),
                   ("SE05_gap", "slice_gap"), ("SE06_MR2", "bad_dims"), ("SE06_MR2", "mixed_orientation"),
                   ("SE06_MR2", "mixed_orientation"), ("SE07_localizer", "mixed_orientation")]
    assert all(len(r["series"]) == 12 for r in rows) and len({r["series"] for r in rows}) == len(rows)
    for r in rows[:4]:
        assert r["label"] in ("AD", "MCI", "NC") and r["orientation"] == "RAS" and r["scan_sha256"]
    assert rows[0]["probabilities"] == pytest.approx(rows[2]["probabilities"], abs=1e-6)  # JPEG lossless: same volume
    assert rows[0]["probabilities"] == pytest.approx(rows[3]["probabilities"], abs=1e-6)  # the multi-frame file
    assert ("inputs: 9 scans; 9 DICOM series; skipped 1 DICOMDIR, 1 RT object, 1 non-DICOM file, "
            "1 structured report") in proc.stderr
    assert "9 scans: 4 ok, 5 failed" in proc.stderr


def test_a_series_copied_into_two_folders_is_one_series_with_every_slice_twice(study, tmp_path):
    from medblip_edge.preprocess.dicom_series import find_series

    shutil.copytree(study / "SE01_T1", tmp_path / "a" / "copy1")
    shutil.copytree(study / "SE01_T1", tmp_path / "a" / "copy2")
    (found,) = find_series(tmp_path / "a")
    assert found.name == "a" and len(found.files) == 2 * 47


def test_folder_with_several_series_as_one_scan_is_an_error(study, tiny_bundle):
    from medblip_edge.errors import ScanError
    from medblip_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(tiny_bundle, backend="torch")
    row = pipe(study / "SE01_T1")  # a folder with one series (and an SR): one scan
    assert row["orientation"] == "RAS" and len(row["series"]) == 12 and row["scan"] == "SE01_T1"
    assert row["warnings"][0] == "skipped: 1 structured report"  # then the input checks' codes (4 mm voxels)
    assert set(row["warnings"][1:]) == set(row["qc"]["checks"]) and "coarse_voxels" in row["warnings"]
    with pytest.raises(ScanError) as e:
        pipe(study)
    assert e.value.code == "several_series"


def test_csv_rows_name_series_folders_and_resume_matches_series(study, tiny_bundle, tmp_path, capsys):
    """In process (run_infer, as the CLI calls it): a CSV naming series folders, --out CSV, then --resume of a
    folder walk whose rows share folders (SE06_MR2's three series): nothing is run again, the file is unchanged."""
    import csv

    from medblip_edge.runtime.cohort import InferOptions, run_infer

    listing = tmp_path / "cohort.csv"
    listing.write_text(f"scan,patient_text\n{study / 'SE01_T1'},Age 70.\n{study / 'SE06_MR2'},Age 71.\n"
                       f"{study / 'SE04_enhanced' / 'IM0001'},Age 72.\n")
    out = tmp_path / "rows.csv"
    assert run_infer(InferOptions(scans=[listing], bundle=tiny_bundle, backend="torch", out=out)) == 1
    rows = list(csv.DictReader(out.open()))
    assert [(r["scan"], r["error_code"]) for r in rows] == [("SE01_T1", ""), ("SE06_MR2", "several_series"),
                                                            ("IM0001", "")]
    assert rows[0]["orientation"] == "RAS" and len(rows[0]["series"]) == 12 and rows[1]["series"] == ""

    walked = tmp_path / "walked.jsonl"
    opts = InferOptions(scans=[study / "SE06_MR2", study / "SE07_localizer"], bundle=tiny_bundle, backend="torch",
                        out=walked, include_paths=True)
    assert run_infer(opts) == 4
    before = walked.read_bytes()
    opts.resume = True
    assert run_infer(opts) == 4
    assert walked.read_bytes() == before
    assert "4 already in the output" in capsys.readouterr().err


# ---------------------------------------------------------------- what a converter changes


def test_dcm2niix_flips_rows_and_the_orientation_says_so(study, tmp_path):
    """dcm2niix (its default settings) writes the same series as NIfTI with the rows in reverse order and the affine
    adjusted to match. A viewer that applies the affine shows the same anatomy, but the model reads the voxel array
    as stored, so from dcm2niix's file it gets the image mirrored top to bottom; the orientation code differs too."""
    dcm2niix = pytest.importorskip("dcm2niix")
    from medblip_edge.preprocess import load_scan

    binary = Path(dcm2niix.__file__).with_name("dcm2niix")
    out = subprocess.run([str(binary), "-o", str(tmp_path), "-f", "converted", "-z", "n", "-b", "n",
                          str(study / "SE01_T1")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    direct, converted = load_scan(study / "SE01_T1"), load_scan(tmp_path / "converted.nii")
    assert direct.orientation == "RAS" and converted.orientation == "RPS"
    assert np.array_equal(converted.array, direct.array[:, ::-1, :])  # y (rows) reversed, nothing else

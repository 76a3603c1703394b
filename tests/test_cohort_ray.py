"""`medblip-infer --engine ray` on a real local Ray cluster on 127.0.0.1: the local runner's rows, and --resume.

One cluster (python -m medblip_edge.serve.ray_cluster) is shared by the module and joined with
--address; it is stopped, with all its processes, when the module ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest

pytestmark = pytest.mark.slow  # a Ray cluster for the module

pytest.importorskip("ray.data", reason="the serve extra (Ray Data) is not installed")

from medblip_edge.runtime.cohort import InferOptions, run_infer  # noqa: E402

N_SCANS = 12
BROKEN = {"sub-03.nii.gz": "corrupt_gzip", "sub-07.nii": "not_nifti"}


@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.Popen([sys.executable, "-m", "medblip_edge.serve.ray_cluster"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(180)
    assert line and line[0].strip(), "the local Ray cluster did not start"
    tree = psutil.Process(proc.pid).children(recursive=True)
    yield line[0].strip()
    proc.stdin.close()
    assert proc.wait(120) == 0
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [p.pid for p in alive]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, mni_path) -> Path:
    """12 scans cut from a real T1 (small, so preprocessing is quick), two of them broken."""
    folder = tmp_path_factory.mktemp("ray-cohort") / "scans"
    folder.mkdir()
    t1 = np.asanyarray(nib.load(mni_path).dataobj)
    rng = np.random.default_rng(1)
    for i in range(N_SCANS):
        x, y, z = rng.integers(40, 130), rng.integers(50, 160), rng.integers(40, 120)
        block = t1[x : x + 20, y : y + 24, z : z + 20].astype(np.int16)
        path = folder / f"sub-{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(block, np.eye(4)), path)
    raw = (folder / "sub-03.nii.gz").read_bytes()
    (folder / "sub-03.nii.gz").write_bytes(raw[: len(raw) // 2])
    (folder / "sub-07.nii.gz").unlink()
    (folder / "sub-07.nii").write_bytes(bytes(2048))
    return folder


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        strip = lambda r: {k: v for k, v in r.items() if k not in ("timings_ms", "probabilities", "log_likelihoods")}  # noqa: E731
        assert strip(x) == strip(y)
        if "probabilities" in x:
            assert x["probabilities"] == pytest.approx(y["probabilities"], rel=1e-5, abs=1e-7)
            assert x["timings_ms"].keys() == y["timings_ms"].keys()


@pytest.fixture(scope="module")
def local_rows(cohort, tiny_bundle, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("local") / "rows.jsonl"
    failed = run_infer(InferOptions(scans=[cohort], bundle=tiny_bundle, out=out, patient_text="A 70 year old. "))
    assert failed == len(BROKEN)
    return _rows(out)


def _ray(infer_cmd, tiny_bundle, cluster, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*infer_cmd, "--bundle", str(tiny_bundle), "--engine", "ray", "--address", cluster,
                           "--patient-text", "A 70 year old. ", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_ray_rows_equal_the_local_runner_rows(cohort, tiny_bundle, cluster, infer_cmd, local_rows, tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = _ray(infer_cmd, tiny_bundle, cluster, cohort, "--out", out)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{N_SCANS} scans: {N_SCANS - 2} ok, 2 failed" in proc.stderr
    rows = _rows(out)
    assert {r["scan"]: r["error"]["code"] for r in rows if "error" in r} == BROKEN
    _same(rows, local_rows)


def test_ray_resume_runs_only_what_is_missing(cohort, tiny_bundle, cluster, infer_cmd, local_rows, tmp_path):
    out = tmp_path / "rows.jsonl"
    kept = local_rows[:5]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"scan": "sub-0')  # an interrupted write
    proc = _ray(infer_cmd, tiny_bundle, cluster, cohort, "--out", out, "--resume")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "5 already in the output" in proc.stderr
    rows = _rows(out)
    assert rows[:5] == kept  # resumed rows kept as they were (timings included)
    _same(rows, local_rows)


def test_engine_options_need_ray(cohort, tiny_bundle, infer_cmd):
    proc = subprocess.run([*infer_cmd, str(cohort), "--bundle", str(tiny_bundle), "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error [usage]" in proc.stderr


def test_ray_rows_equal_the_local_runner_rows_for_dicom_series(cluster, tiny_bundle, infer_cmd, tmp_path):
    """A DICOM folder on Ray: one row per series (three of them in one folder here), as the local runner gives."""
    import shutil

    import dicom_fixtures as fx

    study = tmp_path / "study"
    try:
        fx.from_pydicom_file("MR_small.dcm", study / "SE01")  # 4 slices, a real header
        shutil.copytree(fx.pydicom_file("dicomdirtests/98892003/MR2"), study / "SE02")  # 3 series, 1 folder
    except fx.Missing as e:
        pytest.skip(str(e))
    local = tmp_path / "local.jsonl"
    assert run_infer(InferOptions(scans=[study], bundle=tiny_bundle, out=local, patient_text="A 70 year old. ")) == 3
    out = tmp_path / "ray.jsonl"
    proc = _ray(infer_cmd, tiny_bundle, cluster, study, "--out", out)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = _rows(out)
    assert [(r["scan"], r.get("error", {}).get("code")) for r in rows] == [
        ("SE01", None), ("SE02", "bad_dims"), ("SE02", "mixed_orientation"), ("SE02", "mixed_orientation")]
    assert all(len(r["series"]) == 12 for r in rows) and rows[0]["orientation"] == "LPS"
    _same(rows, _rows(local))

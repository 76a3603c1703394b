"""medblip-bench qc: its variants keep the anatomy they claim to, balanced accuracy, and (slow) a whole run on a
random-weight tiny bundle writing results.json and report.md."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medblip_edge.benchmarks.qc import balanced_accuracy
from medblip_edge.benchmarks.qc_variants import aniso, permuted, save
from medblip_edge.preprocess import load_scan
from medblip_edge.qc.conform import ConformSpec, conform
from volumes import real_volume


def test_balanced_accuracy():
    assert balanced_accuracy(["AD", "AD", "NC", "MCI"], ["AD", "NC", "NC", "NC"]) == pytest.approx((0.5 + 1 + 0) / 3)
    assert balanced_accuracy(["AD", "NC"], ["AD", "NC"]) == 1.0


@pytest.fixture(scope="module")
def scan():
    path = real_volume("mni_t1")
    if path is None:
        pytest.skip("nilearn's MNI152 T1 template is not installed")
    img = nib.load(path)
    return np.asarray(img.dataobj)[::2, ::2, ::2].astype(np.float32), img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])


def test_permuted_storage_is_the_same_brain(scan, tmp_path):
    vol, aff = scan
    a = load_scan(save(tmp_path / "a.nii.gz", vol, aff))
    b = load_scan(save(tmp_path / "b.nii.gz", *permuted(vol, aff)))
    assert a.array.shape != b.array.shape and a.orientation == "RAS" and b.orientation == "SRA"
    spec = ConformSpec(2.0, "RAS")
    np.testing.assert_array_equal(conform(a.array, a.geometry, spec)[0], conform(b.array, b.geometry, spec)[0])


def test_anisotropic_variant_spans_the_same_field(scan, tmp_path):
    vol, aff = scan
    out, new = aniso((0.5, 0.5, 5.0))(vol, aff)
    assert np.allclose(np.linalg.norm(new[:3, :3], axis=0), [0.5, 0.5, 5.0]) and np.allclose(new[:3, 3], aff[:3, 3])
    spans_old = (np.array(vol.shape) - 1) * 2.0
    spans_new = (np.array(out.shape) - 1) * np.array([0.5, 0.5, 5.0])
    assert np.all(np.abs(spans_new - spans_old) <= 5.0)  # within one 5 mm slice


@pytest.mark.slow
def test_qc_suite_writes_results(tmp_path):
    from medblip_edge.cli import bench_main

    out = tmp_path / "qc"
    r = CliRunner().invoke(bench_main, ["qc", "--preset", "tiny", "--n-ref", "10", "--n-test", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["random_weights"] is True and res["profile"]["scans"] == 10
    assert [r["case"] for r in res["ood"]] == ["held-out scans", "noise volumes", "inverted contrast",
                                               "half the brain", "5 mm slices"]
    assert {(r["variant"], r["conform"]) for r in res["accuracy"]} == {
        (v, c) for v in ("isotropic", "1x1x3 mm", "0.5x0.5x5 mm", "axes permuted") for c in ("none", "iso1mm,RAS")}
    assert all(0 <= r["balanced_accuracy"] <= 1 and r["scans"] == 3 for r in res["accuracy"])
    assert "Balanced accuracy" in (out / "report.md").read_text()

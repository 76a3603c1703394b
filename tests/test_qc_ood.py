"""The out-of-distribution profile: the fit on its own (features with a known distribution), then the whole
chain on a real exported bundle: medblip-export --conform -> medblip-profile -> medblip-infer rows with
`conform`, `qc` and `ood`, the profile hashed in the manifest like every other file."""

from __future__ import annotations

import csv
import json
import subprocess

import nibabel as nib
import numpy as np
import pytest

from commands import console_command
from medblip_edge.bundle.reader import Bundle
from medblip_edge.errors import BundleError, MedblipError
from medblip_edge.qc.ood import ARTIFACT, FILE, OodProfile, pooled
from volumes import real_volume


def test_profile_flags_about_one_percent_of_held_out_and_all_shifted_features():
    rng = np.random.default_rng(0)
    d = 16
    scale = np.linspace(0.5, 3.0, d)
    ref, held = rng.normal(size=(300, d)) * scale, rng.normal(size=(2000, d)) * scale
    prof = OodProfile.fit(ref)
    flagged = np.mean(prof.distance(held) > prof.threshold)
    assert 0.0 < flagged < 0.04  # the threshold is the cross-fitted 99th percentile
    shifted = held + 3.0 * scale  # three standard deviations off in every feature
    assert np.mean(prof.distance(shifted) > prof.threshold) > 0.99
    assert np.all(np.diff(prof.reference) >= 0) and len(prof.reference) == 300
    # cross-fitted reference distances are larger than in-sample ones would be
    assert np.median(prof.reference) > np.median(prof.distance(ref))


def tokens_with(mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """[1, 4, d] visual tokens whose mean over the 4 tokens is `mean` and whose range is `spread` (>= 0)."""
    return (mean[None, :] + np.array([-0.5, 0.5, 0.0, 0.0])[:, None] * spread[None, :])[None]


def test_profile_score_and_storage(tmp_path):
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(40, 4, 4))  # 40 scans' visual tokens [Q = 4, d = 4]
    prof = OodProfile.fit(pooled(reference))
    assert prof.pooling == "mean+range" and prof.mean.shape == (8,)
    prof.save(tmp_path / "p.npz")
    back = OodProfile.load(tmp_path / "p.npz")
    for a in ("mean", "precision", "reference"):
        np.testing.assert_array_equal(getattr(back, a), getattr(prof, a))
    assert back.pooling == prof.pooling and back.meta()["pooling"] == "mean+range"
    visual = tokens_with(prof.mean[:4], prof.mean[4:])  # pools to the profile's mean itself
    score, far = back.score(visual)
    assert score == pytest.approx({"distance": 0.0, "percentile": 0.0}, abs=1e-9) and not far
    score, far = back.score(visual + 100.0)  # the mean moved
    assert score["percentile"] == 100.0 and far
    score, far = back.score(tokens_with(prof.mean[:4], prof.mean[4:] * 20))  # same mean, tokens spread apart
    assert score["percentile"] == 100.0 and far
    with pytest.raises(MedblipError) as e:
        back.score(np.zeros((1, 4, 9)))
    assert e.value.code == "bad_profile"


def test_profile_without_a_recorded_pooling_pools_by_the_mean(tmp_path):
    """A profile stored before the pooling was recorded keeps its features: the mean of the visual tokens."""
    rng = np.random.default_rng(2)
    prof = OodProfile.fit(rng.normal(size=(30, 4)), pooling="mean")
    np.savez(tmp_path / "old.npz", mean=prof.mean, precision=prof.precision, reference=prof.reference,
             shrinkage=np.float64(prof.shrinkage))
    old = OodProfile.load(tmp_path / "old.npz")
    assert old.pooling == "mean" and old.meta()["features"] == "mean of the visual tokens"
    score, far = old.score(np.tile(prof.mean, (1, 3, 1)))
    assert score["distance"] == pytest.approx(0.0, abs=1e-9) and not far
    np.savez(tmp_path / "odd.npz", mean=prof.mean, precision=prof.precision, reference=prof.reference,
             shrinkage=np.float64(prof.shrinkage), pooling=np.array("median"))
    with pytest.raises(MedblipError) as e:
        OodProfile.load(tmp_path / "odd.npz")
    assert e.value.code == "bad_profile" and "median" in str(e.value)


def test_profile_needs_enough_scans():
    with pytest.raises(MedblipError) as e:
        OodProfile.fit(np.zeros((5, 3)))
    assert e.value.code == "too_few_scans"


# ---------------------------------------------------------------- the chain, through the real commands


@pytest.fixture(scope="module")
def conformed_bundle(tmp_path_factory):
    """`medblip-export --preset tiny --no-onnx --conform iso1mm,LIA`, through the real command."""
    out = tmp_path_factory.mktemp("ood") / "tiny-conform"
    subprocess.run(console_command("medblip-export") + ["--preset", "tiny", "--no-onnx", "--quiet", "--out", str(out),
                                                        "--conform", "iso1mm,lia"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 trusted scans (the MNI template at 2 mm, each with its own noise, gain and crop) in a CSV, and a noise
    volume with the same header."""
    path = real_volume("mni_t1")
    if path is None:
        pytest.skip("nilearn's MNI152 T1 template is not installed")
    d = tmp_path_factory.mktemp("cohort")
    data = np.asarray(nib.load(path).dataobj).astype(np.float32)[::2, ::2, ::2]
    rng = np.random.default_rng(7)
    rows = [["scan", "patient_text"]]
    for k in range(12):
        a, b, c = rng.integers(0, 4, size=3)
        vol = data[a : a + 94, b : b + 112, c : c + 90] * rng.uniform(0.8, 1.2) + rng.normal(0, 3, (94, 112, 90))
        nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), d / f"s{k:02d}.nii.gz")
        rows.append([f"s{k:02d}.nii.gz", ""])
    with open(d / "cohort.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    noise = rng.uniform(0, 100, (94, 112, 90)).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, np.diag([2.0, 2.0, 2.0, 1.0])), d / "noise.nii.gz")
    return d


@pytest.mark.slow
def test_export_profile_infer_round_trip(conformed_bundle, cohort, tmp_path):
    manifest = json.loads((conformed_bundle / "manifest.json").read_text())
    assert manifest["conform"] == "iso1mm,LIA"  # recorded, normalised
    assert not Bundle.open(conformed_bundle).has(ARTIFACT)

    out = tmp_path / "profiled"
    run = subprocess.run(console_command("medblip-profile") + [str(cohort / "cohort.csv"), "--bundle",
                                                                str(conformed_bundle), "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    said = json.loads(run.stdout)
    assert said["scans"] == 12 and said["failed"] == {} and said["conform"] == "iso1mm,LIA"
    bundle = Bundle.open(out)  # verified: every file hashed, the profile included
    entry = bundle.artifacts[ARTIFACT]
    assert entry["scans"] == 12 and entry["threshold"] == said["threshold"] and FILE in entry["sha256"]
    assert manifest["conform"] == bundle.manifest["conform"]

    rows_file = tmp_path / "rows.jsonl"
    run = subprocess.run(console_command("medblip-infer") + [str(cohort / "s00.nii.gz"), str(cohort / "noise.nii.gz"),
                                                              "--bundle", str(out), "--out", str(rows_file),
                                                              "--no-huge-pages"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "conform: iso1mm,LIA" in run.stderr
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    for row in rows:
        assert row["conform"] == {"spec": "iso1mm,LIA", "from": "bundle"}
        assert row["qc"]["conformed"]["orientation"] == "LIA" and row["qc"]["orientation"] == "RAS"
        assert set(row["ood"]) == {"distance", "percentile"}
    trusted, noise = rows
    assert trusted["ood"]["percentile"] < 100 and "out_of_distribution" not in trusted["warnings"]
    assert noise["ood"]["distance"] > trusted["ood"]["distance"]
    assert ("out_of_distribution" in noise["warnings"]) == (noise["ood"]["distance"] > entry["threshold"])

    (out / FILE).write_bytes((out / FILE).read_bytes()[:-8] + b"\0" * 8)  # a changed profile is refused
    with pytest.raises(BundleError) as e:
        Bundle.open(out)
    assert e.value.code == "hash_mismatch"


def test_conform_option_and_strict_qc(tiny_bundle, cohort):
    from medblip_edge.errors import ScanError
    from medblip_edge.runtime.pipeline import Pipeline

    assert "conform" not in Bundle.open(tiny_bundle).manifest
    row = Pipeline.from_bundle(tiny_bundle, huge_pages=False)(cohort / "s01.nii.gz")
    assert row["conform"] == {"spec": "none", "from": "default"} and "coarse_voxels" in row["warnings"]
    pipe = Pipeline.from_bundle(tiny_bundle, conform="iso1mm", strict_qc=True, huge_pages=False)
    row = pipe(real_volume("mni_t1"))
    assert row["conform"] == {"spec": "iso1mm", "from": "option"} and row["qc"]["conformed"]["shape"] == [197, 233, 189]
    assert row["warnings"] == [] and "ood" not in row  # this bundle has no profile
    with pytest.raises(ScanError) as e:  # 2 mm voxels over 188 x 224 x 180 mm: coarse
        pipe(cohort / "s01.nii.gz")
    assert e.value.code == "qc_failed" and "coarse_voxels" in str(e.value)


def test_profile_bundle_round_trip_in_python(tiny_bundle, tmp_path):
    """write_profile_bundle (what an evaluation command calls): a verified copy whose rows carry `ood`."""
    from medblip_edge.qc.profile import write_profile_bundle
    from medblip_edge.runtime.pipeline import Pipeline

    src = Bundle.open(tiny_bundle)
    pipe = Pipeline.from_bundle(tiny_bundle, huge_pages=False)
    prepared = pipe.prepare(real_volume("mni_t1"))
    feats = pooled(pipe.visual_tokens(prepared.volume))
    rng = np.random.default_rng(3)
    prof = OodProfile.fit(feats + rng.normal(0, 0.01, (20, feats.shape[1])))  # a reference cloud around this scan
    manifest = write_profile_bundle(tiny_bundle, tmp_path / "b", prof, {"scans": 20})
    assert manifest["artifacts"][ARTIFACT]["cohort"] == {"scans": 20}
    assert {k: v["sha256"] for k, v in manifest["artifacts"].items() if k != ARTIFACT} == \
        {k: v["sha256"] for k, v in src.artifacts.items()}
    pipe2 = Pipeline.from_bundle(tmp_path / "b", huge_pages=False)
    row = pipe2.answer(prepared, pipe2.visual_tokens(prepared.volume))
    assert row["ood"]["percentile"] < 100 and "out_of_distribution" not in row["warnings"]
    far = pipe2.answer(prepared, pipe2.visual_tokens(prepared.volume) + 1.0)
    assert far["ood"]["percentile"] == 100.0 and "out_of_distribution" in far["warnings"]
    # --strict-qc: the far scan is an error row in a cohort run, the near one a result
    from medblip_edge.runtime.cohort import scan_row

    strict = Pipeline.from_bundle(tmp_path / "b", strict_qc=True, huge_pages=False)
    visual = strict.visual_tokens(prepared.volume)
    assert "label" in scan_row(strict, prepared, visual, 1.0, "", None)
    bad = scan_row(strict, prepared, visual + 1.0, 1.0, "", None)
    assert bad["error"]["code"] == "qc_failed" and "out_of_distribution" in bad["error"]["message"]

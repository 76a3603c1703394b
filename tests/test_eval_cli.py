"""`medblip-eval` end to end on a tiny random-weights bundle and real T1 volumes (nibabel's anatomical.nii with
per-scan intensity scale and noise): the real console command runs the cohort, writes metrics.json whose figures
equal scikit-learn's on the rows it wrote, counts and lists the failed scan, compares bundles with a verdict,
writes a calibrated bundle that medblip-infer then reports calibrated probabilities from (named in every row),
and its report.html, opened in a real headless Chromium, shows the confusion matrix, the verdict and the
random-weights warning."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn import metrics as skm

from commands import console_command
from medblip_edge.bundle.format import sha256_file
from medblip_edge.bundle.reader import Bundle
from medblip_edge.model.prompts import LABELS
from volumes import real_volume

LABEL_CELLS = ["AD", "dementia", "MCI", "mild cognitive impairment", "CN", "control"]  # truth AD AD MCI MCI NC NC


def run(cmd, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kw)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    src = real_volume("anatomical")
    if src is None:
        pytest.skip("nibabel's anatomical.nii is not installed")
    root = tmp_path_factory.mktemp("cohort")
    img = nib.load(src)
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    rng = np.random.default_rng(0)
    (root / "scans").mkdir()
    with open(root / "cohort.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scan", "label", "patient_text", "sex"])
        for i, label in enumerate(LABEL_CELLS):
            v = arr * rng.uniform(0.8, 1.2) + rng.normal(0, 20, arr.shape)
            nib.save(nib.Nifti1Image(v.astype(np.int16), img.affine), root / "scans" / f"sub-{i}.nii.gz")
            w.writerow([f"scans/sub-{i}.nii.gz", label, f"The subject is {60 + 3 * i} years old. ", "FM"[i % 2]])
        w.writerow(["scans/gone.nii.gz", "AD", "", "F"])  # fails: counted and listed, never dropped
    return root / "cohort.csv"


@pytest.fixture(scope="module")
def evaluated(cohort, tiny_bundle, tmp_path_factory):
    """One real run: the bundle over the cohort, calibrated on half, the calibrated bundle written."""
    out = tmp_path_factory.mktemp("report")
    cal = out.parent / (out.name + "-calibrated")
    r = run(console_command("medblip-eval") + [str(cohort), "--bundle", str(tiny_bundle), "--out", str(out / "r"),
                                               "--group-by", "sex", "--calibrate", "0.5", "--write-calibrated",
                                               str(cal), "--bootstrap", "300"])
    return r, out / "r", cal


def test_run_writes_metrics_equal_to_scikit_learn(evaluated, tiny_bundle):
    r, out, _ = evaluated
    assert r.returncode == 1, r.stderr[-3000:]  # one scan failed, as medblip-infer says it
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["bundles"][0]["failed"] == 1 and summary["bundles"][0]["evaluated"] == 6
    assert "cohort: 7 scans" in r.stderr and "6 ok, 1 failed" in r.stderr
    doc = json.loads((out / "metrics.json").read_text())
    res = doc["bundles"][0]
    assert res["random_weights"] is True
    assert res["manifest_sha256"] == sha256_file(tiny_bundle / "manifest.json")
    assert res["failed"] == [{"cohort_row": 8, "scan": "gone.nii.gz", "code": "not_found",
                              "message": "no such file: gone.nii.gz"}]
    rows = [json.loads(x) for x in (out / "tiny" / "rows.jsonl").read_text().splitlines()]
    assert [x["true_label"] for x in rows] == ["AD", "AD", "MCI", "MCI", "NC", "NC", "AD"]
    assert all("path" not in x for x in rows)
    ok = [x for x in rows if "error" not in x]
    assert all(x["greedy_answer"] is not None and set(x["answer_tokens"]) == set(LABELS) for x in ok)
    y = np.array([LABELS.index(x["true_label"]) for x in ok])
    pred = np.array([LABELS.index(x["label"]) for x in ok])
    prob = np.array([[x["probabilities"][k] for k in LABELS] for x in ok])
    figs = res["rules"]["sum"]["figures"]
    for name, want in [("accuracy", skm.accuracy_score(y, pred)),
                       ("balanced_accuracy", skm.balanced_accuracy_score(y, pred)),
                       ("macro_auc", skm.roc_auc_score(y, prob, multi_class="ovr")),
                       ("log_loss", skm.log_loss(y, prob, labels=[0, 1, 2]))]:
        assert figs[name]["value"] == pytest.approx(want), name
        assert figs[name]["ci_low"] <= figs[name]["value"] + 1e-12 <= figs[name]["ci_high"] + 2e-12, name
    assert res["rules"]["sum"]["confusion_matrix"]["matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    assert figs["per_class"]["AD"]["sensitivity"]["value"] == pytest.approx(skm.recall_score(y == 0, pred == 0))
    # every rule is a column: the published one from the greedy text (random weights: it matches nothing)
    assert set(res["rules"]) == {"sum", "mean", "published", "calibrated"}
    assert res["rules"]["published"]["figures"]["no_decision_rate"]["value"] == pytest.approx(
        np.mean([x["greedy_answer"] not in ("Dementia", "mild cognitive impairment (MCI)", "Not demented")
                 for x in ok]))
    assert res["rules"]["calibrated"]["n"] == 3  # held out: one of each class's two
    assert set(res["subgroups"]["sex"]) == {"F", "M"} and "warning" in res["subgroups"]["sex"]["F"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and not re.search(r'src="(?!data:)', html)
    assert "RANDOM WEIGHTS" in html


def test_calibration_round_trip_into_infer_rows(evaluated, cohort, tmp_path):
    _, out, cal = evaluated
    doc = json.loads((out / "metrics.json").read_text())
    params = doc["bundles"][0]["calibration_params"]
    bundle = Bundle.open(cal, verify=True)  # a verified bundle: every file listed and hashed
    assert bundle.manifest["calibration"] == params
    assert params["fitted_on"]["cohort_sha256"] == sha256_file(cohort) and params["fitted_on"]["scans"] == 3
    assert doc["calibrated_bundle"]["calibration"] == params["sha256"]
    scans = [str(cohort.parent / "scans" / f"sub-{i}.nii.gz") for i in (0, 3)]
    res = run(console_command("medblip-infer") + scans + ["--bundle", str(cal), "--out", str(tmp_path / "r.jsonl")])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    evald = {x["scan"]: x for x in map(json.loads, (out / "tiny" / "rows.jsonl").read_text().splitlines())}
    name = f"bias+temperature:sum:{params['sha256'][:12]}"
    for row in rows:
        if "error" in row:
            continue
        c = row["calibrated"]
        assert c["calibration"] == name
        s = np.array([row["log_likelihoods"][k] + params["bias"][k] for k in LABELS]) / params["temperature"]
        want = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose([c["probabilities"][k] for k in LABELS], want, rtol=1e-9, atol=1e-12)
        assert c["label"] == LABELS[int(want.argmax())]
        np.testing.assert_allclose([c["probabilities"][k] for k in LABELS],
                                   [evald[row["scan"]]["eval_calibrated"]["probabilities"][k] for k in LABELS],
                                   rtol=1e-5, atol=1e-6)
        assert row["probabilities"] != c["probabilities"]  # the raw ones stay beside them


def _wrong_rows(src: Path, dst: Path) -> None:
    """The same rows with log-likelihoods that always favour a wrong class: a candidate far worse than the first."""
    out = []
    for line in src.read_text().splitlines():
        row = json.loads(line)
        if "error" not in row:
            wrong = LABELS[(LABELS.index(row["true_label"]) + 1) % 3]
            row["log_likelihoods"] = {k: (-1.0 if k == wrong else -6.0) for k in LABELS}
        out.append(json.dumps(row))
    dst.write_text("\n".join(out) + "\n")


def test_rows_comparison_and_report_in_chromium(evaluated, cohort, tiny_bundle, tmp_path):
    _, out, _ = evaluated
    rows = out / "tiny" / "rows.jsonl"
    _wrong_rows(rows, tmp_path / "wrong.jsonl")
    rep = tmp_path / "cmp"
    r = run(console_command("medblip-eval") + [str(cohort), "--bundle", str(tiny_bundle), "--bundle", str(tiny_bundle),
                                               "--rows", str(rows), "--rows", str(tmp_path / "wrong.jsonl"),
                                               "--out", str(rep), "--bootstrap", "200"])
    assert r.returncode == 1, r.stderr[-3000:]
    doc = json.loads((rep / "metrics.json").read_text())
    cmp_ = doc["bundles"][1]["comparison"]
    assert cmp_["verdict"] == "not shown non-inferior" and cmp_["label_agreement"] < 1
    assert cmp_["delta_balanced_accuracy"]["ci_high"] < 0
    assert doc["bundles"][1]["rules"]["sum"]["figures"]["accuracy"]["value"] == 0.0
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium): the report was not opened in a browser")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              "--disable-component-update", "--no-first-run", "--disable-sync",
                              f"--user-data-dir={profile}", "--dump-dom", (rep / "report.html").resolve().as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert "Verdict: not shown non-inferior" in dom
    assert "RANDOM WEIGHTS" in dom
    cm = doc["bundles"][1]["rules"]["sum"]["confusion_matrix"]["matrix"]
    table = re.search(r'<table class="confusion" id="confusion-tiny-2-sum">(.*?)</table>', dom, re.S).group(1)
    cells = [[int(v) for v in re.findall(r"<td>(\d+)</td>", tr)] for tr in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    assert [c for c in cells if c] == cm and sum(map(sum, cm)) == 6


def test_bad_label_and_usage_errors(cohort, tiny_bundle, tmp_path):
    """The real command in this process (click's runner): one line on stderr, exit 2, nothing on stdout."""
    from click.testing import CliRunner

    from medblip_edge.cli import eval_main

    bad = tmp_path / "bad.csv"
    bad.write_text(cohort.read_text().replace("mild cognitive impairment", "stroke"))
    r = CliRunner().invoke(eval_main, [str(bad), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip() == ("error [bad_label]: cohort bad.csv row 5: unknown label 'stroke' (expected AD, MCI, "
                                "NC or a synonym such as CN, control, dementia, mild cognitive impairment)")
    for args, message in [(["--write-calibrated", str(tmp_path / "c")], "error [usage]: --write-calibrated needs "
                                                                        "--calibrate"),
                          (["--group-by", "scanner"], "error [usage]: --group-by 'scanner': no such column"),
                          (["--rows", "a.jsonl", "--rows", "b.jsonl"], "error [usage]: --rows given 2 times for 1")]:
        r = CliRunner().invoke(eval_main, [str(cohort), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "o"),
                                           *args])
        assert r.exit_code == 2 and r.stderr.startswith(message), r.stderr
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are known to be good


def test_rows_are_matched_to_the_cohort(cohort):
    """--rows: in order when they name the cohort's scans one for one; else by path, then by unique file name;
    a cohort scan without a row is a failed scan `no_row`, listed with its cohort row."""
    from medblip_edge.validation.cohort import read_cohort
    from medblip_edge.validation.sources import match_rows

    c = read_cohort(cohort, ["sex"])
    assert [e.label for e in c.entries] == ["AD", "AD", "MCI", "MCI", "NC", "NC", "AD"]
    assert [e.groups["sex"] for e in c.entries][:2] == ["F", "M"]
    rows = [{"scan": e.path.name, "n": i} for i, e in enumerate(c.entries)]
    assert [r["n"] for r in match_rows(c, rows, "x")] == list(range(7))
    shuffled = rows[::-1][:-1]  # reversed, and the first scan's row missing
    got = match_rows(c, shuffled, "--rows r.jsonl")
    assert [r.get("n") for r in got] == [None, 1, 2, 3, 4, 5, 6]
    assert got[0]["error"] == {"code": "no_row", "message": "--rows r.jsonl has no row for cohort row 2 (sub-0.nii.gz)"}
    with_paths = [{"scan": "same.nii.gz", "path": str(e.path.resolve()), "n": i} for i, e in enumerate(c.entries)][::-1]
    assert [r["n"] for r in match_rows(c, with_paths, "x")] == list(range(7))


def test_csv_rows_carry_the_calibration_and_the_detail():
    from medblip_edge.runtime.results_io import CALIBRATED_COLUMNS, DETAIL_COLUMNS, FileSink

    sink = FileSink(Path("r.csv"), "csv", False, CALIBRATED_COLUMNS + DETAIL_COLUMNS)
    row = {"scan": "a.nii", "label": "AD", "probabilities": {"AD": 0.5, "MCI": 0.3, "NC": 0.2},
           "calibrated": {"calibration": "bias+temperature:sum:0123456789ab", "label": "NC",
                          "probabilities": {"AD": 0.2, "MCI": 0.3, "NC": 0.5}},
           "answer_tokens": {"AD": 2, "MCI": 9, "NC": 4}, "greedy_answer": "Not demented"}
    header = next(csv.reader([sink.header()]))
    rec = dict(zip(header, next(csv.reader([sink.serialize(row)]))))
    assert header[-9:] == CALIBRATED_COLUMNS + DETAIL_COLUMNS
    assert rec["calibration"] == "bias+temperature:sum:0123456789ab" and rec["cal_label"] == "NC"
    assert rec["cal_prob_NC"] == "0.5" and rec["prob_NC"] == "0.2" and rec["ntok_MCI"] == "9"
    assert rec["greedy_answer"] == "Not demented"

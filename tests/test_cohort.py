"""Cohorts through `medblip-infer`: inputs, prefetching with a per-scan timeout, batching, output files, resume.

The main test runs the real CLI entry point over 200 small volumes cut from a real
T1 (20x24x20), 10% of them broken in ten ways, one whose reader hangs forever:
every good scan gets a result row, every broken one its error code, the hung one a
`timeout` row, and the process still exits. Then a run over a prefix of the cohort
is interrupted with SIGINT and resumed; the final file holds the same rows, in the
same order, as the uninterrupted run (timings aside, and float noise from vision
batches of different sizes).

The reader hang cannot be made with a real file here (a FIFO is refused before it is
opened), so the CLI runs under `python -c` with `pipeline.load_scan` wrapped to
block forever on one scan name: the real CLI code path otherwise.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from badinputs import anat as real_anat
from medblip_edge.errors import MedblipError
from medblip_edge.qc import CODES as QC_CODES
from medblip_edge.runtime.cohort import InferOptions, run_infer
from medblip_edge.runtime.prefetch import Prefetcher, Task
from medblip_edge.runtime.scan_inputs import ScanItem, expand_scans

N_SCANS = 200
HANG = "sub-027.nii.gz"
TIMEOUT_S = 10.0  # per scan: the hung one waits this long; a good one is read and preprocessed in ~0.1 s
PREFIX = 40  # scans in the interrupted + resumed run

HANGING_CLI = r"""
import os, sys, threading
from pathlib import Path
import medblip_edge.runtime.pipeline as pipeline

_load = pipeline.load_scan
_hang = os.environ["MEDBLIP_TEST_HANG"]

def load_scan(scan, **kw):
    if scan.name == _hang:
        threading.Event().wait()  # a reader that never returns (a dead network mount, say)
    return _load(scan, **kw)

pipeline.load_scan = load_scan
from medblip_edge.cli import infer_main
sys.argv[0] = "medblip-infer"
infer_main()
"""


# ---------------------------------------------------------------- the cohort


def _broken(kind: str, path: Path, block: np.ndarray) -> None:
    good = nib.Nifti1Image(block, np.eye(4))
    if kind == "truncated_gz":
        nib.save(good, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bad_crc":
        nib.save(good, path)
        data = bytearray(path.read_bytes())
        data[-8] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "zeros":
        path.write_bytes(bytes(2048))
    elif kind == "header_only":
        nib.save(good, path)
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:352]))
    elif kind == "constant":
        nib.save(nib.Nifti1Image(np.full(block.shape, 9, np.int16), np.eye(4)), path)
    elif kind == "all_nan":
        nib.save(nib.Nifti1Image(np.full(block.shape, np.nan, np.float32), np.eye(4)), path)
    elif kind == "image_2d":
        nib.save(nib.Nifti1Image(block[:, :, 0], np.eye(4)), path)
    elif kind == "four_d":
        nib.save(nib.Nifti1Image(np.stack([block, block], -1), np.eye(4)), path)
    elif kind == "dangling_symlink":
        path.symlink_to(path.parent / "gone" / path.name)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        raise ValueError(kind)


BROKEN = {"truncated_gz": "corrupt_gzip", "bad_crc": "corrupt_gzip", "zeros": "not_nifti",
          "header_only": "truncated", "constant": "constant_volume", "all_nan": "no_finite_data",
          "image_2d": "bad_dims", "four_d": "bad_dims", "dangling_symlink": "not_found", "fifo": "not_a_file"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, mni_path) -> tuple[Path, dict]:
    """200 scans in one folder: name -> expected outcome ("ok", "timeout" or an error code)."""
    folder = tmp_path_factory.mktemp("cohort") / "scans"
    folder.mkdir()
    t1 = np.asanyarray(nib.load(mni_path).dataobj)
    rng = np.random.default_rng(0)
    kinds = list(BROKEN)
    expect = {}
    for i in range(N_SCANS):
        x, y, z = rng.integers(40, 130), rng.integers(50, 160), rng.integers(40, 120)
        block = t1[x : x + 20, y : y + 24, z : z + 20].astype(np.int16) + rng.integers(0, 3, (20, 24, 20), np.int16)
        path = folder / f"sub-{i:03d}.nii.gz"
        if i % 10 == 3:  # 10% broken, in ten ways
            kind = kinds[(i // 10) % len(kinds)]
            _broken(kind, path, block)
            expect[path.name] = BROKEN[kind]
        else:
            nib.save(nib.Nifti1Image(block, np.eye(4)), path)
            expect[path.name] = "timeout" if path.name == HANG else "ok"
    assert sum(v not in ("ok", "timeout") for v in expect.values()) == N_SCANS // 10
    return folder, expect


def _cli(args, tiny_bundle):
    cmd = [sys.executable, "-c", HANGING_CLI, "--bundle", str(tiny_bundle), "--workers", "2",
           "--timeout", str(TIMEOUT_S), *map(str, args)]
    env = dict(os.environ, MEDBLIP_TEST_HANG=HANG)
    return cmd, env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _rows(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _outcome(row: dict) -> str:
    return row["error"]["code"] if "error" in row else "ok"


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Equal rows in equal order, timings aside; probabilities to float noise (vision batch sizes differ)."""
    assert [r["scan"] for r in got] == [r["scan"] for r in want]
    for g, w in zip(got, want):
        drop = ("timings_ms", "probabilities", "log_likelihoods")
        assert {k: v for k, v in g.items() if k not in drop} == {k: v for k, v in w.items() if k not in drop}
        if "probabilities" in w:
            assert g["probabilities"] == pytest.approx(w["probabilities"], rel=1e-4, abs=1e-6)
            assert g["log_likelihoods"] == pytest.approx(w["log_likelihoods"], rel=1e-4, abs=1e-3)


@pytest.fixture(scope="module")
def full_run(cohort, tiny_bundle, tmp_path_factory):
    folder, _ = cohort
    out = tmp_path_factory.mktemp("full") / "results.jsonl"
    cmd, env = _cli(["--out", out, folder], tiny_bundle)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return _rows(out), proc, time.monotonic() - t0


# ---------------------------------------------------------------- the 200-scan run


@pytest.mark.slow
def test_every_scan_gets_its_row(cohort, full_run):
    folder, expect = cohort
    rows, proc, _ = full_run
    assert proc.returncode == 1, proc.stderr  # scans failed; the run did not
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert [r["scan"] for r in rows] == sorted(expect)  # one row per scan, in input order
    assert {r["scan"]: _outcome(r) for r in rows} == expect
    for row in rows:
        if "error" in row:
            assert set(row) == {"scan", "scan_sha256", "error"}
            assert (row["scan_sha256"] is None) == (expect[row["scan"]] in ("timeout", "not_found", "not_a_file"))
        else:
            assert row["label"] in ("AD", "MCI", "NC")
            assert [w for w in row["warnings"] if w not in QC_CODES] == []  # input checks: test_qc.py
            assert set(row["timings_ms"]) == {"load", "preprocess", "vision", "llm", "total"}
    n_bad = N_SCANS // 10 + 1
    assert f"{N_SCANS} scans: {N_SCANS - n_bad} ok, {n_bad} failed (1 timed out)" in proc.stderr


@pytest.mark.slow
def test_hung_reader_gives_a_timeout_row_and_the_run_exits(full_run):
    rows, proc, elapsed = full_run
    (row,) = [r for r in rows if r["scan"] == HANG]
    assert row["error"]["code"] == "timeout" and row["scan_sha256"] is None
    assert f"{TIMEOUT_S:g} s" in row["error"]["message"]
    # the process exited by itself although one reader thread never returns
    assert proc.returncode == 1 and elapsed < 500


@pytest.mark.slow
def test_same_scan_same_digest(full_run, cohort):
    rows, _, _ = full_run
    folder, _ = cohort
    from medblip_edge.bundle.format import sha256_file

    for row in rows[:5]:
        if row["scan_sha256"]:
            assert row["scan_sha256"] == sha256_file(folder / row["scan"])


@pytest.mark.slow
def test_sigint_then_resume_gives_the_uninterrupted_file(cohort, full_run, tiny_bundle, tmp_path):
    folder, expect = cohort
    rows, _, _ = full_run
    names = sorted(expect)[:PREFIX]
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="") as f:  # a CSV list, paths relative to the CSV's folder
        csv.writer(f).writerows([["scan"]] + [[os.path.relpath(folder / n, tmp_path)] for n in names])
    out = tmp_path / "part.jsonl"

    cmd, env = _cli(["--out", out, listing], tiny_bundle)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)  # a background CI job may run us with SIGINT ignored
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    before = out.read_text()
    partial = _rows(out)  # only whole rows
    assert 10 <= len(partial) < PREFIX
    assert_same_rows(partial, rows[: len(partial)])

    cmd, env = _cli(["--out", out, "--resume", listing], tiny_bundle)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{len(partial)} already in the output" in proc.stderr
    final = out.read_text()
    assert_same_rows(_rows(out), rows[:PREFIX])
    if not any(_outcome(r) == "timeout" for r in partial):
        assert final.startswith(before)  # the finished rows were kept, not computed again


# ---------------------------------------------------------------- in-process: output formats and resume rules


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> list[Path]:
    """Five scans: four good (a real T1 and blocks of it), one truncated."""
    d = tmp_path_factory.mktemp("few")
    data = real_anat()
    paths = []
    for i in range(4):
        p = d / f"s{i}.nii"
        nib.save(nib.Nifti1Image(np.roll(data, 3 * i, axis=0), np.eye(4)), p)
        paths.append(p)
    bad = d / "s9_truncated.nii"
    bad.write_bytes(paths[0].read_bytes()[:1000])
    paths.insert(2, bad)
    return paths


def _opts(tiny_bundle, scans, **kw) -> InferOptions:
    return InferOptions(scans=[str(s) for s in scans], bundle=tiny_bundle, timeout_s=60, **kw)


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_output_and_resume_from_a_prefix(few, tiny_bundle, tmp_path, capsys):
    full = tmp_path / "full.csv"
    assert run_infer(_opts(tiny_bundle, few, out=full)) == 1
    want = _csv_rows(full)
    assert [r["scan"] for r in want] == [p.name for p in few]
    assert list(want[0])[:8] == ["scan", "scan_sha256", "series", "orientation", "label", "prob_AD", "prob_MCI",
                                 "prob_NC"]
    assert want[0]["orientation"] == "RAS" and want[0]["series"] == ""  # np.eye(4) affine: i, j, k to R, A, S
    assert {"t_load", "t_preprocess", "t_vision", "t_llm", "t_total", "error_code", "error_message"} <= set(want[0])
    assert want[2]["error_code"] == "truncated" and want[2]["label"] == "" and want[0]["error_code"] == ""

    part = tmp_path / "part.csv"
    assert run_infer(_opts(tiny_bundle, few[:3], out=part)) == 1  # "interrupted" after three scans
    head = part.read_text()
    assert run_infer(_opts(tiny_bundle, few, out=part, resume=True)) == 1
    got = _csv_rows(part)
    assert part.read_text().startswith(head)
    assert "3 already in the output" in capsys.readouterr().err
    def no_floats(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("t_", "prob_", "ll_"))} for r in rows]

    assert no_floats(got) == no_floats(want)
    for g, w in zip(got, want):
        for k in ("prob_AD", "prob_MCI", "prob_NC"):
            assert float(g[k] or 0) == pytest.approx(float(w[k] or 0), rel=1e-4, abs=1e-6)


def test_resume_repairs_order_partial_line_and_stray_rows(few, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    run_infer(_opts(tiny_bundle, few, out=out))
    want = out.read_text()
    lines = want.splitlines(keepends=True)
    stray = json.dumps({"scan": "other.nii", "scan_sha256": "0" * 64, "label": "NC"}) + "\n"
    # rows out of order, one scan missing, a row for a scan not in this run, a cut-off last line
    out.write_text(lines[3] + stray + lines[0] + lines[1] + lines[4][: len(lines[4]) // 2])
    capsys.readouterr()
    assert run_infer(_opts(tiny_bundle, few, out=out, resume=True)) == 1
    err = capsys.readouterr().err
    assert "3 already in the output" in err and "1 row matching no scan of this run dropped" in err
    got = out.read_text().splitlines(keepends=True)
    assert got[0] == lines[0] and got[1] == lines[1] and got[3] == lines[3]  # kept verbatim, in input order
    assert_same_rows([json.loads(x) for x in got], [json.loads(x) for x in lines])
    assert not list(tmp_path.glob(".r.jsonl.*"))  # no temporary files left


def test_resume_rejects_a_foreign_file(few, tiny_bundle, tmp_path):
    out = tmp_path / "notes.jsonl"
    out.write_text("hello\n")
    with pytest.raises(MedblipError) as ei:
        run_infer(_opts(tiny_bundle, few[:1], out=out, resume=True))
    assert ei.value.code == "bad_resume_file"
    assert out.read_text() == "hello\n"


def test_stdout_rows_patient_text_and_paths(few, tiny_bundle, tmp_path, capsys):
    listing = tmp_path / "l.csv"
    listing.write_text(f"scan,patient_text\n{few[0]},Age 70.\n{few[1]},\n")
    assert run_infer(_opts(tiny_bundle, [listing, few[0]], patient_text="Age 90.", include_paths=True)) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [str(few[0]), str(few[1]), str(few[0])]
    assert all("Age" not in json.dumps(r) for r in rows)
    # the CSV's text (even empty) wins over --patient-text: same scan, different prompt, different scores
    assert rows[0]["log_likelihoods"] != pytest.approx(rows[2]["log_likelihoods"], rel=1e-6)


@pytest.mark.parametrize("kw,code", [({"resume": True}, "usage"), ({"workers": 0}, "usage"),
                                     ({"timeout_s": 0}, "usage")])
def test_usage_errors(few, tiny_bundle, kw, code):
    with pytest.raises(MedblipError) as ei:
        run_infer(InferOptions(scans=[str(few[0])], bundle=tiny_bundle, **kw))
    assert ei.value.code == code


# ---------------------------------------------------------------- the prefetcher alone


def test_prefetcher_abandons_a_hung_reader_on_time_and_replaces_it():
    release = threading.Event()
    items = [ScanItem(Path(f"s{i}.nii")) for i in range(6)]
    tasks = [Task(i, item) for i, item in enumerate(items)]

    def work(task):
        if task.index == 1:
            release.wait()  # hangs until the test ends
            return ("prepared", "late")
        time.sleep(0.02)
        return ("prepared", task.index)

    pf = Prefetcher(tasks, work, workers=1, ahead=3, timeout_s=0.5).start()
    try:
        assert pf.wait(tasks[0]) and tasks[0].result == ("prepared", 0)
        pf.consumed(tasks[0])
        assert not pf.wait(tasks[1])  # over its limit: abandoned
        # measured from when its reader started: never before the limit; the upper bound only catches a wait
        # that ignores the limit (generous: a loaded CI machine may schedule the waiting thread late)
        waited = time.monotonic() - tasks[1].started
        assert 0.5 <= waited <= 10.0, waited
        pf.consumed(tasks[1])
        for t in tasks[2:]:  # with workers=1, only a replacement reader can run these
            assert pf.wait(t) and t.result == ("prepared", t.index)
            pf.consumed(t)
        release.set()
        assert tasks[1].done.wait(30)  # the abandoned reader has returned
        assert tasks[1].result is None  # a late answer from an abandoned reader is dropped
        assert pf.graveyard == [("prepared", "late")]
    finally:
        release.set()
        pf.close()


def test_prefetcher_bounds_read_ahead():
    started = []
    tasks = [Task(i, ScanItem(Path(f"s{i}.nii"))) for i in range(10)]

    def work(task):
        started.append(task.index)
        return ("prepared", task.index)

    pf = Prefetcher(tasks, work, workers=2, ahead=3, timeout_s=5).start()
    try:
        for t in tasks[:3]:  # the window fills, however slowly this machine starts threads
            assert t.done.wait(30)
        time.sleep(0.3)  # time for a fourth reader to start, were the window not enforced
        assert sorted(started) == [0, 1, 2]  # nothing past the read-ahead window while nothing is consumed
        for t in tasks:
            assert pf.wait(t)
            pf.consumed(t)
        assert sorted(started) == list(range(10))
    finally:
        pf.close()


# ---------------------------------------------------------------- SCANS arguments


def test_expand_folder_csv_and_files(tmp_path):
    d = tmp_path / "Smith_John"
    d.mkdir()
    for n in ("b.nii.gz", "a.nii", "C.NII.GZ", "notes.txt", "x.nii.bak"):
        (d / n).write_bytes(b"")
    (d / "sub.nii.gz").mkdir()  # a folder among the scans: not listed
    (d / "deeper").mkdir()
    (d / "deeper" / "z.nii").write_bytes(b"")  # not recursive
    (d / "list.csv").write_text("scan,patient_text,site\na.nii,Age 70.,x\n/abs/q.nii.gz,,y\n\n")
    (tmp_path / "scan.nii.gz").mkdir()

    items = expand_scans([str(d), str(d / "list.csv"), str(tmp_path / "scan.nii.gz"), str(tmp_path / "gone.nii")])
    assert [i.name for i in items] == ["C.NII.GZ", "a.nii", "b.nii.gz", "a.nii", "q.nii.gz", "scan.nii.gz",
                                       "gone.nii"]
    assert items[3] == ScanItem(d / "a.nii", "Age 70.") and items[4] == ScanItem(Path("/abs/q.nii.gz"), "")
    assert items[0].patient_text is None and items[5].path == tmp_path / "scan.nii.gz"


@pytest.mark.parametrize("content,code", [
    ("", "bad_csv"),  # empty
    ("path\nx.nii\n", "bad_csv"),  # no scan column
    ("scan\n", "no_scans"),
    ("scan,patient_text\na.nii\n", "bad_csv"),  # a short row
    ("scan,patient_text\n,Age 70.\n", "bad_csv"),  # an empty scan cell
    (b"scan\n\xff\xfe.nii\n", "bad_csv"),  # not UTF-8
])
def test_bad_csv_is_a_run_error_without_its_path(tmp_path, content, code):
    d = tmp_path / "Doe_Jane"
    d.mkdir()
    p = d / "list.csv"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MedblipError) as ei:
        expand_scans([str(p)])
    assert ei.value.code == code and "Doe_Jane" not in str(ei.value)
    with pytest.raises(MedblipError) as ei:
        expand_scans([str(p)], include_paths=True)
    assert "Doe_Jane" in str(ei.value)


def test_missing_csv_and_empty_folder(tmp_path):
    for arg, code in [(tmp_path / "nope.csv", "bad_csv"), (tmp_path, "no_scans")]:
        with pytest.raises(MedblipError) as ei:
            expand_scans([str(arg)])
        assert ei.value.code == code

"""`medblip-bench ray-cohort`: a cohort on Ray Data beside the local runner: the same scans, rows compared, both
timed, in one run.

The cohort: variants of the real MNI152 T1 (shifted crops with integer noise, each copied a few
times under other names) and 10 % broken files (cut gzip, zero bytes, a constant volume, a 2D
image). Runs `medblip-infer FOLDER --out` with the local engine, then with `--engine ray` (a
local Ray cluster on 127.0.0.1, started and stopped by the command, so its start-up is included),
and compares the rows (timings aside).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import nibabel as nib
import numpy as np

from .suite import Outcome, Run, suite
from .timing import Clock


def make_cohort(folder: Path, n: int, copies: int = 9) -> dict:
    """n scans in `folder`; returns {name: expected error code or None}."""
    from ..demo_scan import mni_t1_path

    img = nib.load(mni_t1_path())
    t1 = np.asanyarray(img.dataobj).astype(np.int16)
    rng = np.random.default_rng(0)
    expect, i = {}, 0
    while i < n:
        if i % 10 == 9:
            name = f"sub-{i:04d}.nii.gz"
            kind = (i // 10) % 4
            if kind == 0:
                raw = Path(mni_t1_path()).read_bytes()
                (folder / name).write_bytes(raw[: len(raw) // 3])
                expect[name] = "corrupt_gzip"
            elif kind == 1:
                name = name[:-3]
                (folder / name).write_bytes(bytes(4096))
                expect[name] = "not_nifti"
            elif kind == 2:
                nib.save(nib.Nifti1Image(np.full((40, 40, 40), 5, np.int16), np.eye(4)), folder / name)
                expect[name] = "constant_volume"
            else:
                nib.save(nib.Nifti1Image(t1[:, :, 90], img.affine), folder / name)
                expect[name] = "bad_dims"
            i += 1
            continue
        dx, dy, dz = rng.integers(0, 12, 3)
        variant = t1[dx : dx + 180, dy : dy + 210, dz : dz + 170] + rng.integers(0, 3, (180, 210, 170), np.int16)
        first = folder / f"sub-{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(variant, img.affine), first)
        expect[first.name] = None
        i += 1
        for _ in range(copies - 1):
            if i >= n or i % 10 == 9:
                break
            shutil.copy(first, folder / f"sub-{i:04d}.nii.gz")
            expect[f"sub-{i:04d}.nii.gz"] = None
            i += 1
    return expect


def run_timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    clock = Clock()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return round(clock.elapsed_s(), 1), proc


def compare(a: list[dict], b: list[dict]) -> dict:
    floats = ("probabilities", "log_likelihoods")
    same_fields = all({k: v for k, v in x.items() if k not in floats + ("timings_ms",)}
                      == {k: v for k, v in y.items() if k not in floats + ("timings_ms",)} for x, y in zip(a, b))
    diff = max((abs(x[f][k] - y[f][k]) for x, y in zip(a, b) if "error" not in x for f in floats for k in x[f]),
               default=0.0)
    return {"rows": [len(a), len(b)], "identical_except_timings_and_floats": same_fields and len(a) == len(b),
            "max_abs_diff_probabilities_and_log_likelihoods": diff,
            "bit_identical_floats": diff == 0.0}


def measure(run: Run, bundle: Path, scans: int) -> dict:
    infer = str(Path(sys.executable).with_name("medblip-infer"))
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="medblip-cohort-") as tmp:
        folder = Path(tmp) / "scans"
        folder.mkdir()
        expect = make_cohort(folder, scans)
        res["scans"] = len(expect)
        res["broken"] = sum(v is not None for v in expect.values())
        rows = {}
        for engine in ("local", "ray"):
            out = Path(tmp) / f"{engine}.jsonl"
            run.say(f"{engine} ...")
            wall, proc = run_timed([infer, str(folder), "--bundle", str(bundle), "--engine", engine, "--out", str(out)])
            rows[engine] = [json.loads(line) for line in out.read_text().splitlines()]
            res[engine] = {"wall_s": wall, "exit": proc.returncode, "summary": proc.stderr.strip().splitlines()[-1],
                           "scans_per_s": round(len(rows[engine]) / wall, 3)}
            run.say(f"  {res[engine]}")
        res["errors_as_expected"] = all(
            (r.get("error", {}).get("code") if "error" in r else None) == expect[r["scan"]] for r in rows["ray"])
        res["compare"] = compare(rows["ray"], rows["local"])
    return res


def report(res: dict) -> str:
    c = res["compare"]
    return (f"{res['scans']} scans ({res['broken']} broken). local: {res['local']['wall_s']} s "
            f"({res['local']['summary']}); ray: {res['ray']['wall_s']} s ({res['ray']['summary']}), cluster start-up "
            f"included. Rows identical apart from timings: {c['identical_except_timings_and_floats']}; largest "
            f"difference in probabilities and log-likelihoods: {c['max_abs_diff_probabilities_and_log_likelihoods']}; "
            f"error codes as made: {res['errors_as_expected']}.")


@suite("ray-cohort")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Bundle both engines run.")
@click.option("--scans", type=int, default=200, show_default=True, help="Scans in the cohort (one in ten broken).")
def command(run: Run, bundle: Path, scans: int) -> Outcome:
    """Run one cohort through `medblip-infer FOLDER --out` with the local engine, then with `--engine ray` (a local
    Ray cluster on 127.0.0.1, started and stopped by the command, so its start-up is included), and compare the
    rows apart from timings; needs the serve extra.

    The cohort: variants of the real MNI152 T1 (shifted crops with integer noise, each copied a few times under
    other names) and 10 % broken files (cut gzip, zero bytes, a constant volume, a 2D image), whose error codes
    are checked.
    """
    return Outcome("Ray Data cohort beside the local runner", measure(run, bundle, scans), report)

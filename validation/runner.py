"""medblip-eval end to end: the cohort, each bundle's rows, the figures, the paired comparisons, the report."""

from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle.format import MANIFEST, sha256_file
from ..bundle.reader import Bundle
from ..errors import MedblipError
from ..model.llm import family
from ..model.tasks import Tasks
from . import bootstrap, calibrate, compare, report
from .cohort import read_cohort
from .evaluate import BundleEvaluation
from .labels import index
from .rules import PRIMARY
from .sources import match_rows, read_rows, run_bundle

MIN_GROUP = 30  # subgroups smaller than this get a warning beside their figures


@dataclass
class EvalOptions:
    cohort: Path
    bundles: list[Path]
    out: Path
    rows: list[Path] = field(default_factory=list)
    group_by: list[str] = field(default_factory=list)
    calibrate: float | None = None
    write_calibrated: Path | None = None
    margin: float = compare.DEFAULT_MARGIN
    n_bootstrap: int = bootstrap.DEFAULT_REPLICATES
    seed: int = bootstrap.DEFAULT_SEED
    backend: str = "auto"
    device: str = "cpu"
    workers: int = 2
    timeout_s: float = 300.0
    min_group: int = MIN_GROUP
    command: str = ""


def check_options(opts: EvalOptions) -> None:
    if not opts.bundles:
        raise MedblipError("give at least one --bundle", code="usage")
    if opts.rows and len(opts.rows) != len(opts.bundles):
        raise MedblipError(f"--rows given {len(opts.rows)} times for {len(opts.bundles)} --bundle: give one rows "
                           f"file per bundle, in the same order", code="usage")
    if opts.n_bootstrap < 100:
        raise MedblipError("--bootstrap needs at least 100 resamples (2000 by default)", code="usage")
    if not 0 <= opts.margin < 1:
        raise MedblipError("--margin is a balanced-accuracy difference between 0 and 1, e.g. 0.02", code="usage")
    if opts.write_calibrated is not None and opts.calibrate is None:
        raise MedblipError("--write-calibrated needs --calibrate FRACTION (the split the calibration is fitted on)",
                           code="usage")
    if opts.calibrate is not None and not 0 < opts.calibrate < 1:
        raise MedblipError(f"--calibrate {opts.calibrate:g}: give a fraction between 0 and 1, e.g. 0.3", code="usage")


def _names(paths: list[Path]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        base = Path(p).resolve().name or "bundle"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_eval(opts: EvalOptions) -> tuple[dict, int]:
    """-> (the metrics document, written to OUT/metrics.json; number of failed scans over all bundles)."""
    check_options(opts)
    cohort = read_cohort(opts.cohort, opts.group_by)
    y = np.array([index(e.label) for e in cohort.entries], np.int64)
    counts = {lab: int((y == k).sum()) for k, lab in enumerate(("AD", "MCI", "NC"))}
    say(f"cohort: {len(y)} scans ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    cal_mask = None
    if opts.calibrate is not None:
        cal_idx, _ = calibrate.split(y, opts.calibrate, opts.seed)
        cal_mask = np.zeros(len(y), bool)
        cal_mask[cal_idx] = True
    cohort_sha = sha256_file(cohort.csv)

    results, evals, bundles, failed_total = [], [], [], 0
    for i, (path, name) in enumerate(zip(opts.bundles, _names(opts.bundles))):
        bundle = Bundle.open(path, verify=True)
        bundles.append(bundle)
        say(f"bundle {name}: {'reading ' + Path(opts.rows[i]).name if opts.rows else 'running the cohort'}")
        if opts.rows:
            rows = read_rows(opts.rows[i])
            source = f"--rows {Path(opts.rows[i]).name}"
        else:
            rows = run_bundle(cohort, path, out / name / "infer-rows.jsonl", opts.backend, opts.device, opts.workers,
                              opts.timeout_s)
            source = "the run"
        rows = match_rows(cohort, rows, source)
        tasks = Tasks(family(bundle.config.variant), bundle.tokenizer(), bundle.manifest["generation"]["max_new_tokens"])
        ev = BundleEvaluation(rows, y, tasks.answer_tokens)
        evals.append(ev)
        if not ev.ok.any():
            raise MedblipError(f"bundle {name}: every scan failed (first: {rows[0]['error']['message']})",
                               code="all_failed")
        say(f"bundle {name}: {int(ev.ok.sum())} scans evaluated, {int((~ev.ok).sum())} failed; "
            f"{opts.n_bootstrap} bootstrap resamples per figure")
        result = describe(bundle, name, rows, ev, cohort)
        result["rules"] = ev.rules(opts.n_bootstrap, opts.seed)
        if cal_mask is not None:
            fitted_on = {"cohort": cohort.csv.name, "cohort_sha256": cohort_sha, "fraction": opts.calibrate,
                         "seed": opts.seed, "bundle_manifest_sha256": result["manifest_sha256"]}
            result["rules"]["calibrated"], params = ev.calibrated(cal_mask, fitted_on, opts.n_bootstrap, opts.seed)
            result["calibration_params"] = params
        result["subgroups"] = ev.subgroups([e.groups for e in cohort.entries], cohort.group_by, opts.n_bootstrap,
                                           opts.seed, opts.min_group)
        failed_total += len(result["failed"])
        results.append(result)

    ref = evals[0]
    for i in range(1, len(evals)):
        results[i]["comparison"] = comparison(ref, evals[i], results[0]["bundle"], opts)

    doc = {"cohort": {"csv": cohort.csv.name, "sha256": cohort_sha, "scans": len(y), "labels": counts,
                      "group_by": cohort.group_by},
           "settings": {"bootstrap": opts.n_bootstrap, "seed": opts.seed, "margin": opts.margin,
                        "calibrate": opts.calibrate, "primary_rule": PRIMARY, "confidence": 0.95,
                        "interval": "stratified bootstrap percentile", "min_group": opts.min_group},
           "provenance": provenance(opts),
           "bundles": results}
    if opts.write_calibrated is not None:
        written = write_calibrated_bundle(bundles[0], opts.write_calibrated, results[0]["calibration_params"])
        doc["calibrated_bundle"] = written
    report.write_all(out, doc, evals, cohort)
    return doc, failed_total


def describe(bundle: Bundle, name: str, rows: list[dict], ev: BundleEvaluation, cohort) -> dict:
    first = next(r for r, ok in zip(rows, ev.ok) if ok)
    failed = [{"cohort_row": e.line, "scan": r["scan"], "code": r["error"]["code"], "message": r["error"]["message"]}
              for e, r, ok in zip(cohort.entries, rows, ev.ok) if not ok]
    return {"bundle": name, "path": str(bundle.root), "manifest_sha256": sha256_file(bundle.root / MANIFEST),
            "random_weights": bundle.random_weights, "variant": bundle.config.variant,
            "checkpoint": bundle.manifest.get("model", {}).get("source", {}).get("checkpoint"),
            "backend": first.get("backend"), "precision": first.get("precision"),
            "bundle_calibration": bundle.manifest.get("calibration", {}).get("sha256"),
            "scans": len(rows), "evaluated": int(ev.ok.sum()), "failed": failed}


def comparison(ref: BundleEvaluation, cand: BundleEvaluation, ref_name: str, opts: EvalOptions) -> dict:
    """The candidate against the reference on the scans both evaluated, under the primary rule."""
    both = ref.ok & cand.ok
    r_sel, c_sel = both[ref.ok], both[cand.ok]
    dr, dc = ref.decisions[PRIMARY], cand.decisions[PRIMARY]
    out = compare.paired(ref.y_all[both], dr.pred[r_sel], dr.prob[r_sel], dc.pred[c_sel], dc.prob[c_sel],
                         opts.n_bootstrap, opts.seed, opts.margin)
    return {"reference": ref_name, "rule": PRIMARY, **out}


def provenance(opts: EvalOptions) -> dict:
    from ..benchmarks.machine import machine_info

    m = machine_info()
    return {"command": opts.command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": m["cpu"]["model"], "cores": m["cores"]["usable"], "ram_gib": m["ram_gib"],
                        "gpu": (m["gpu"] or {}).get("name"), "os": m["os"]},
            "versions": m["versions"]}


def write_calibrated_bundle(bundle: Bundle, out: Path, params: dict) -> dict:
    from .calibrated_bundle import write_calibrated

    say(f"writing the calibrated bundle {Path(out).name}")
    written = write_calibrated(bundle, out, params)
    return {"path": str(written.root), "manifest_sha256": sha256_file(written.root / MANIFEST),
            "calibration": params["sha256"]}

"""`medblip-bench qc`: the OOD score and the conform step on a bundle, measured on synthetic cohorts
(python -m medblip_edge.synth) whose answer is known.

A reference cohort (seed --ref-seed) fits the OOD profile through the bundle; a held-out cohort
(--test-seed) then gives (1) the share of held-out scans under the profile's threshold and the share of
noise volumes, inverted-contrast volumes, half-brain crops and 5 mm thick-slice variants over it, and (2) the
balanced accuracy on the held-out cohort as generated and stored 1 x 1 x 3 mm, 0.5 x 0.5 x 5 mm and with
permuted axes, each without and with `--conform iso1mm,ORIENT` (ORIENT: the cohort's own orientation).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from ..errors import MedblipError
from .qc_variants import CONFORM_CASES, OOD_CASES, save
from .suite import Outcome, Run, device_option, suite

CLASSES = ("AD", "MCI", "NC")


def balanced_accuracy(truth: list[str], pred: list[str]) -> float:
    """Mean recall over the classes present in `truth`."""
    recalls = [np.mean([p == c for t, p in zip(truth, pred) if t == c]) for c in CLASSES if c in truth]
    return float(np.mean(recalls))


def _pipeline(opts: dict, work: Path, run: Run):
    from ..export.run import ExportOptions, export_bundle
    from ..runtime.pipeline import Pipeline

    bundle = opts["bundle"]
    if bundle is None:
        bundle = work / "bundle"
        run.say(f"exporting {opts['checkpoint'] or 'preset ' + str(opts['preset'])}")
        export_bundle(ExportOptions(out=bundle, preset=opts["preset"], checkpoint=opts["checkpoint"],
                                    llm_dir=opts["llm"], onnx=False), quiet=True)
    return Pipeline.from_bundle(bundle, backend=opts["backend"], device=opts["device"], conform="none",
                                huge_pages=False)


def _render(args) -> tuple:
    """One synthetic subject (a process pool's task): (subject, volume, affine)."""
    from ..synth.cohort import render

    seed, index, variant = args
    subj, vol, _, affine = render(seed, index, variant)
    return subj, vol, affine


def _cohort(seed: int, n: int, variant: str = "anatomy") -> list[tuple]:
    import os
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(_render, [(seed, i, variant) for i in range(n)]))


def _through(pipe, paths: list[Path], texts: list[str] | None, workers: int = 2):
    """Each scan through the pipeline, at most `workers` read ahead by threads (each read holds a 224^3 input):
    -> rows (labels with texts given, else only the OOD score)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    out = []
    with ThreadPoolExecutor(workers) as pool:
        ahead = deque(pool.submit(pipe.prepare, p) for p in paths[:workers])
        for k in range(len(paths)):
            prepared = ahead.popleft().result()
            if k + workers < len(paths):
                ahead.append(pool.submit(pipe.prepare, paths[k + workers]))
            visual = pipe.visual_tokens(prepared.volume)
            if texts is None:
                out.append({"ood": pipe.ood.score(visual)[0]})
            else:
                out.append(pipe.answer(prepared, visual, texts[k]))
            del prepared, visual
    return out


def measure(run: Run, **opts) -> dict:
    import nibabel as nib

    from ..qc.conform import ConformSpec
    from ..qc.ood import OodProfile, pooled
    from ..qc.options import QcOptions

    with tempfile.TemporaryDirectory(prefix="medblip-qc-bench-") as tmp:
        work = Path(tmp)
        pipe = _pipeline(opts, work, run)
        run.say(f"reference cohort: {opts['n_ref']} scans, seed {opts['ref_seed']}")
        (work / "ref").mkdir()
        ref = [save(work / "ref" / f"{s.name}.nii.gz", vol, aff) for s, vol, aff in _cohort(opts["ref_seed"], opts["n_ref"])]
        feats = []
        for prepared in map(pipe.prepare, ref):
            feats.append(pooled(pipe.visual_tokens(prepared.volume))[0])
        pipe.ood = OodProfile.fit(np.stack(feats))
        threshold = pipe.ood.threshold

        run.say(f"held-out cohort: {opts['n_test']} scans, seed {opts['test_seed']}")
        held = _cohort(opts["test_seed"], opts["n_test"])
        scans = work / "scans"

        def files(name: str, make, subjects=held) -> list[Path]:
            d = scans / name.replace(" ", "_")
            d.mkdir(parents=True)
            return [save(d / f"{s.name}.nii.gz", *make(vol, aff)) for s, vol, aff in subjects]

        # balanced accuracy per storage variant, without and with the conform step
        orient = "".join(nib.aff2axcodes(held[0][2]))
        spec = f"iso1mm,{orient}"
        truth, texts = [s.label for s, *_ in held], [s.patient_text for s, *_ in held]
        acc_rows, held_dist = [], []
        for name, make in CONFORM_CASES.items():
            paths = files(name, make)
            for conform in ("none", spec):
                pipe.qc = QcOptions(ConformSpec.parse(conform), "option")
                run.say(f"accuracy: {name}, conform {conform}")
                rows = _through(pipe, paths, texts)
                if name == "isotropic" and conform == "none":
                    held_dist = [r["ood"]["distance"] for r in rows]
                acc_rows.append({"variant": name, "conform": conform, "scans": len(rows),
                                 "balanced_accuracy": round(balanced_accuracy(truth, [r["label"] for r in rows]), 4)})

        # OOD: the held-out scans above, and inputs the model never saw (published loader, no conform)
        pipe.qc = QcOptions()
        cases = [("held-out scans", held_dist, False)]
        noise = files("noise", lambda v, a: (v, a), _cohort(opts["test_seed"], opts["n_test"], "noise"))
        for name, paths in [("noise volumes", noise), *[(n, files(n, make)) for n, make in OOD_CASES.items()]]:
            run.say(f"OOD: {name}")
            cases.append((name, [r["ood"]["distance"] for r in _through(pipe, paths, None)], True))
        ood_rows = []
        for name, dist, want_far in cases:
            far = float(np.mean(np.asarray(dist) > threshold))
            ood_rows.append({"case": name, "scans": len(dist), "share_over_threshold": round(far, 4),
                             "share_as_wanted": round(far if want_far else 1 - far, 4),
                             "wanted": "over" if want_far else "under",
                             "median_distance": round(float(np.median(dist)), 3)})
    base = next(r["balanced_accuracy"] for r in acc_rows if r["variant"] == "isotropic" and r["conform"] == "none")
    for r in acc_rows:
        r["vs_isotropic"] = round(r["balanced_accuracy"] - base, 4)
    return {"bundle": str(opts["bundle"] or opts["checkpoint"] or opts["preset"]),
            "random_weights": pipe.bundle.random_weights,
            "profile": {"scans": len(ref), "threshold": round(threshold, 4), "shrinkage": round(pipe.ood.shrinkage, 6)},
            "cohorts": {"reference_seed": opts["ref_seed"], "test_seed": opts["test_seed"], "n_ref": opts["n_ref"],
                        "n_test": opts["n_test"], "conform_spec": spec}, "ood": ood_rows, "accuracy": acc_rows}


def report(res: dict) -> str:
    p = res["profile"]
    lines = [f"Profile: {p['scans']} reference scans, threshold (99th percentile) {p['threshold']:g}, Ledoit-Wolf "
             f"shrinkage {p['shrinkage']:g}; random weights: {res['random_weights']}.", "",
             "## Out-of-distribution score", "",
             "| case | scans | wanted | share over the threshold | share as wanted | median distance |", "|---|---|---|---|---|---|"]
    for r in res["ood"]:
        lines.append(f"| {r['case']} | {r['scans']} | {r['wanted']} | {r['share_over_threshold']:.3f} | "
                     f"{r['share_as_wanted']:.3f} | {r['median_distance']:g} |")
    lines += ["", "## Balanced accuracy per storage, without and with the conform step", "",
              "| variant | conform | scans | balanced accuracy | minus isotropic without conform |", "|---|---|---|---|---|"]
    for r in res["accuracy"]:
        lines.append(f"| {r['variant']} | {r['conform']} | {r['scans']} | {r['balanced_accuracy']:.3f} | "
                     f"{r['vs_isotropic']:+.3f} |")
    return "\n".join(lines)


@suite("qc")
@click.option("--bundle", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Bundle to measure (e.g. one exported from tests/fixtures/known_answer/t5).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Instead of --bundle: a checkpoint to export first (with --llm).")
@click.option("--llm", type=click.Path(file_okay=False, path_type=Path), default=None, help="The checkpoint's LLM folder.")
@click.option("--preset", default=None, help="Instead of --bundle: a random-weight preset (a smoke run: tiny).")
@click.option("--n-ref", type=click.IntRange(10), default=90, show_default=True, help="Reference cohort size.")
@click.option("--n-test", type=click.IntRange(3), default=60, show_default=True, help="Held-out cohort size.")
@click.option("--ref-seed", type=int, default=1001, show_default=True, help="Reference cohort seed.")
@click.option("--test-seed", type=int, default=2002, show_default=True, help="Held-out cohort seed.")
@click.option("--backend", default="auto", show_default=True, help="auto, torch, ort or trt.")
@device_option
def command(run: Run, **opts) -> Outcome:
    """The OOD score and the conform step on synthetic cohorts with a known answer.

    Fits the OOD profile on a reference cohort, then reports the share of held-out scans under its 99th
    percentile and of noise volumes, inverted-contrast volumes, half-brain crops and 5 mm thick-slice
    variants over it; and the balanced accuracy on the held-out cohort as generated, stored 1 x 1 x 3 mm,
    0.5 x 0.5 x 5 mm and with permuted axes, without and with --conform iso1mm,ORIENT.

    \b
    Example (the known-answer T5 model):
      medblip-bench qc --checkpoint tests/fixtures/known_answer/t5/checkpoint.pth \\
          --llm tests/fixtures/known_answer/t5/llm
    """
    given = [opts["bundle"] is not None, opts["checkpoint"] is not None, opts["preset"] is not None]
    if sum(given) != 1 or (opts["checkpoint"] is not None) != (opts["llm"] is not None):
        raise MedblipError("give one of --bundle DIR, --checkpoint PATH --llm DIR, or --preset NAME", code="usage")
    return Outcome("OOD score and conform step on known-answer cohorts", measure(run, **opts), report)

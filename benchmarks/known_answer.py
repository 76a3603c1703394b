"""`medblip-bench known-answer`: the known-answer models (tests/fixtures/known_answer/{t5,biomedlm}, trained by the
published code on medblip_edge.synth's cohort) validated with medblip-eval on a held-out synthetic cohort, one
bundle per LLM format, each compared with fp32; plus the chance-level controls (noise images, shuffled labels).

Per variant: export fp32, INT8, INT4 (and fp16, evaluated only where the export could check it on this CPU),
run medblip-eval (the command, in its own process) over all bundles at once (paired comparison with fp32,
non-inferiority margin 0.02), then medblip-eval on the noise cohort (fp32, patient text left out: it carries a signal of its own) and on the held-out
cohort with its labels shuffled (fp32's rows again, --rows). Each evaluation's metrics.json, report.html, rows and
plots go to OUT/<variant>[-noise|-shuffled]/; summary.md holds one table per variant.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from ..errors import MedblipError
from .suite import Outcome, Run, suite

VARIANTS = ("t5", "biomedlm")
FORMATS = ("int8", "int4", "fp16")  # beside fp32, which is always exported and is the reference
HELD_OUT_SEED = 1000  # the models were trained on seed 0's cohort (tests/official/README.md)
SHUFFLE_SEED = 1
DEFAULT_FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "known_answer"
FIXTURE_FILES = ("checkpoint.pth", "llm", "training.json")


def fixture(root: Path, variant: str) -> Path:
    folder = Path(root) / variant
    missing = [f for f in FIXTURE_FILES if not (folder / f).exists()]
    if missing:
        raise MedblipError(f"no known-answer model at {folder} (missing {', '.join(missing)}): give --fixtures DIR "
                           f"holding {variant}/checkpoint.pth, {variant}/llm/ and {variant}/training.json",
                           code="usage")
    return folder


# -- cohorts ------------------------------------------------------------------

def _rewrite(src: Path, dst: Path, change) -> Path:
    """src's rows through change(rows) into dst (same folder: the relative scan paths still hold)."""
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(change(rows))
    return dst


def make_cohorts(root: Path, n: int, seed: int, run: Run) -> dict[str, Path]:
    """The held-out cohort, the same with its labels shuffled, the noise cohort without patient text, and the two
    halves of the input on their own: the held-out scans with their patient text emptied (image only), and the
    noise volumes with the held-out patient texts (text only)."""
    from ..synth.cohort import make_cohort

    def progress(kind):
        return lambda done, total: (done == total or done % 50 == 0) and run.say(f"{kind} cohort: {done}/{total}")

    held = make_cohort(root / "held-out", n, seed, progress=progress("held-out"))
    def shuffle(rows):
        labels = np.random.default_rng(SHUFFLE_SEED).permutation([r["label"] for r in rows])
        return [{**r, "label": lab} for r, lab in zip(rows, labels)]

    shuffled = _rewrite(held, held.with_name("cohort-shuffled.csv"), shuffle)
    image_only = _rewrite(held, held.with_name("cohort-image-only.csv"),
                          lambda rows: [{**r, "patient_text": ""} for r in rows])
    noise_scans = make_cohort(root / "noise", n, seed, variant="noise", progress=progress("noise"))
    noise = _rewrite(noise_scans, noise_scans.with_name("cohort-no-text.csv"),
                     lambda rows: [{**r, "patient_text": ""} for r in rows])
    return {"held_out": held, "shuffled": shuffled, "noise": noise, "image_only": image_only,
            "text_only": noise_scans}  # the noise variant keeps each subject's patient text


# -- bundles ------------------------------------------------------------------

def llm_check(bundle: Path) -> dict:
    """The export's own check of the LLM graphs (checked, or the reason it could not run them here)."""
    from ..bundle.reader import Bundle

    return Bundle.open(bundle, verify=False).manifest["artifacts"]["llm_onnx"]["parity"]


def export_variant(folder: Path, root: Path, formats: list[str], run: Run) -> tuple[list[Path], dict[str, str]]:
    """fp32 first, then each format; -> (bundles to evaluate, {format: why it is not evaluated here})."""
    from .bundles import export_checkpoint

    quants = ["none", *formats]
    run.say(f"{folder.name}: exporting {', '.join('fp32' if q == 'none' else q for q in quants)}")
    paths = export_checkpoint(folder / "checkpoint.pth", folder / "llm", root, quants)
    keep, skipped = [], {}
    for q, path in zip(quants, paths):
        check = llm_check(path)
        if q == "fp16" and not check.get("checked", True):
            skipped["fp16"] = ("exported, but the export could not run its fp16 LLM graphs on this CPU "
                               f"({check['reason']})")
            continue
        keep.append(path)
    return keep, skipped


# -- evaluations --------------------------------------------------------------

def evaluate(cohort: Path, bundles: list[Path], out: Path, opts: dict, work: Path, rows: list[Path] = ()) -> dict:
    """`medblip-eval` over `bundles` at once, in its own process (run from `work`, so the command line it records
    names the cohort and the bundles as they lie there); -> its metrics.json, with the command added."""
    def rel(p: Path) -> str:
        p = Path(p).resolve()
        return os.path.relpath(p, work.resolve()) if p.is_relative_to(work.resolve()) else str(p)

    args = [rel(cohort), *[a for b in bundles for a in ("--bundle", rel(b))],
            *[a for r in rows for a in ("--rows", rel(r))], "--out", str(Path(out).resolve()),
            "--bootstrap", str(opts["bootstrap"]), "--margin", str(opts["margin"])]
    if opts["group_by"]:
        args += ["--group-by", ",".join(opts["group_by"])]
    proc = subprocess.run([sys.executable, "-c", "from medblip_edge.cli import eval_main; eval_main()", *args],
                          cwd=work, stdout=subprocess.PIPE, text=True)
    if proc.returncode not in (0, 1):  # 1: some scans failed, counted and listed in metrics.json
        raise MedblipError(f"medblip-eval {rel(cohort)} exited with {proc.returncode} (its error is above)",
                           code="bench_failed")
    for b in bundles:  # rows.jsonl holds each of these rows with its label
        (out / b.name / "infer-rows.jsonl").unlink(missing_ok=True)
    doc = json.loads((out / "metrics.json").read_text())
    doc["command"] = shlex.join(["medblip-eval", *args])
    return doc


def _fig(fig: dict | None) -> dict | None:
    return None if fig is None else {k: fig.get(k) for k in ("value", "ci_low", "ci_high")}


def bundle_row(res: dict) -> dict:
    figs = res["rules"]["sum"]["figures"]
    cmp = res.get("comparison")
    return {"format": res["bundle"], "precision": res["precision"], "backend": res["backend"],
            "random_weights": res["random_weights"], "evaluated": res["evaluated"], "failed": len(res["failed"]),
            "balanced_accuracy": _fig(figs["balanced_accuracy"]), "macro_auc": _fig(figs.get("macro_auc")),
            "ece": _fig(figs.get("ece")), "label_agreement": cmp["label_agreement"] if cmp else 1.0,
            "delta_balanced_accuracy": _fig(cmp["delta_balanced_accuracy"]) if cmp else None,
            "verdict": cmp["verdict"] if cmp else "reference"}


def control_row(kind: str, doc: dict) -> dict:
    """A chance-level control: balanced accuracy's interval should hold 1/3, macro AUC's 0.5."""
    figs = doc["bundles"][0]["rules"]["sum"]["figures"]
    ba, auc = _fig(figs["balanced_accuracy"]), _fig(figs.get("macro_auc"))
    def holds(fig, chance):
        return fig is not None and fig["ci_low"] is not None and fig["ci_low"] <= chance <= fig["ci_high"]

    return {"control": kind, "evaluated": doc["bundles"][0]["evaluated"], "balanced_accuracy": ba, "macro_auc": auc,
            "at_chance": holds(ba, 1 / 3) and holds(auc, 0.5), "command": doc["command"]}


def measure(run: Run, variants: list[str], fixtures: Path, n: int, seed: int, formats: list[str], bootstrap: int,
            margin: float, group_by: list[str], keep: Path | None) -> dict:
    from ..bundle.format import sha256_file

    folders = {v: fixture(fixtures, v) for v in variants}  # all checked before any work
    out = run.folder()
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="medblip-known-answer-"))
    opts = {"bootstrap": bootstrap, "margin": margin, "group_by": group_by}
    try:
        cohorts = make_cohorts(work / "cohorts", n, seed, run)
        results, files, failed = {}, [], 0
        for variant, folder in folders.items():
            bundles, skipped = export_variant(folder, work / "bundles" / variant, formats, run)
            run.say(f"{variant}: medblip-eval over {', '.join(b.name for b in bundles)} on {n} scans")
            doc = evaluate(cohorts["held_out"], bundles, out / variant, opts, work)
            failed += sum(len(r["failed"]) for r in doc["bundles"])
            run.say(f"{variant}: controls (noise images; shuffled labels)")
            noise = evaluate(cohorts["noise"], bundles[:1], out / f"{variant}-noise", opts, work)
            shuffled = evaluate(cohorts["shuffled"], bundles[:1], out / f"{variant}-shuffled", opts, work,
                                rows=[out / variant / "fp32" / "rows.jsonl"])
            results[variant] = {
                "checkpoint_sha256": sha256_file(folder / "checkpoint.pth"),
                "training_json_sha256": sha256_file(folder / "training.json"), "fixtures": str(folder),
                "eval_command": doc["command"], "bundles": [bundle_row(r) for r in doc["bundles"]],
                "not_evaluated": skipped, "controls": [control_row("noise images, no patient text", noise),
                                                       control_row("labels shuffled (fp32 rows)", shuffled)]}
            run.say(f"{variant}: one half of the input at a time (image only; text only)")
            results[variant]["halves"] = [
                control_row("image only: held-out scans, patient text emptied",
                            evaluate(cohorts["image_only"], bundles[:1], out / f"{variant}-image-only", opts, work)),
                control_row("text only: noise images, held-out patient texts",
                            evaluate(cohorts["text_only"], bundles[:1], out / f"{variant}-text-only", opts, work))]
            files += [f"{d}/{f}" for d in (variant, f"{variant}-noise", f"{variant}-shuffled", f"{variant}-image-only",
                                           f"{variant}-text-only") for f in ("metrics.json", "report.html")]
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    (out / "summary.md").write_text(summary(results, n, seed, margin) + "\n")
    synth = f"python -m medblip_edge.synth --n {n} --seed {seed}"
    return {"cohort": {"n": n, "seed": seed, "generator": synth, "noise_generator": f"{synth} --variant noise "
                       "(patient_text emptied)", "shuffle_seed": SHUFFLE_SEED},
            "variants": results, "files": ["summary.md", *files], "failed_scans": failed}


# -- report -------------------------------------------------------------------

def _ci(fig: dict | None, spec: str = ".3f") -> str:
    if fig is None or fig.get("value") is None:
        return "-"
    if fig.get("ci_low") is None:
        return format(fig["value"], spec)
    return f"{fig['value']:{spec}} [{fig['ci_low']:{spec}}, {fig['ci_high']:{spec}}]"


def variant_table(res: dict) -> str:
    head = ["format", "balanced accuracy [95 % CI]", "macro AUC [95 % CI]", "ECE", "labels agree with fp32",
            "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["bundles"]:
        verdict = r["verdict"] + (f" (Δ {_ci(r['delta_balanced_accuracy'])})" if r["delta_balanced_accuracy"] else "")
        failed = f" ({r['failed']} scans failed)" if r["failed"] else ""
        lines.append("| " + " | ".join([r["format"] + failed, _ci(r["balanced_accuracy"]), _ci(r["macro_auc"]),
                                        "-" if r["ece"] is None else f"{r['ece']['value']:.3f}",
                                        f"{r['label_agreement']:.3f}", verdict]) + " |")
    for fmt, why in res["not_evaluated"].items():
        lines.append(f"| {fmt} | not evaluated: {why} |" + " |" * (len(head) - 2))
    return "\n".join(lines)


def controls_table(res: dict, key: str = "controls", title: str = "chance-level control (fp32)") -> str:
    lines = [f"| {title} | scans | balanced accuracy [95 % CI] | macro AUC [95 % CI] | "
             "intervals hold 1/3 and 0.5 |", "|---|---|---|---|---|"]
    for c in res.get(key, []):
        lines.append(f"| {c['control']} | {c['evaluated']} | {_ci(c['balanced_accuracy'])} | {_ci(c['macro_auc'])} | "
                     f"{'yes' if c['at_chance'] else 'no'} |")
    return "\n".join(lines)


def summary(results: dict, n: int, seed: int, margin: float) -> str:
    parts = [f"Held-out cohort: `python -m medblip_edge.synth --n {n} --seed {seed}` (the models were trained on "
             f"seed 0). Decision rule `sum` (medblip-infer's); verdict: non-inferior to fp32 when the lower end of "
             f"the 95 % interval of the balanced-accuracy difference is above -{margin:g}."]
    for variant, res in results.items():
        parts += ["", f"## {variant}", "", variant_table(res), "", controls_table(res), "",
                  controls_table(res, "halves", "one half of the input (fp32)"), "",
                  f"Reports: [{variant}/report.html]({variant}/report.html), "
                  f"[{variant}-noise/report.html]({variant}-noise/report.html), "
                  f"[{variant}-shuffled/report.html]({variant}-shuffled/report.html)"]
    return "\n".join(parts)


def report(record: dict) -> str:
    body = summary(record["variants"], record["cohort"]["n"], record["cohort"]["seed"], record["options"]["margin"])
    cmds = [f"- {v}: `{res['eval_command']}` (run in the suite's work folder)" for v, res in record["variants"].items()]
    return body + "\n\nThe medblip-eval runs over the held-out cohort:\n\n" + "\n".join(cmds) + "\n"


def _list(value: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad:
        raise MedblipError(f"unknown {what} {bad[0]}; choose from {', '.join(allowed)}", code="usage")
    return items


@suite("known-answer")
@click.option("--variants", default=",".join(VARIANTS), show_default=True, help="Comma list: t5, biomedlm.")
@click.option("--fixtures", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_FIXTURES,
              show_default="tests/fixtures/known_answer",
              help="Folder with VARIANT/checkpoint.pth, VARIANT/llm/ and VARIANT/training.json per variant.")
@click.option("--n", "n", type=click.IntRange(3), default=300, show_default=True,
              help="Scans in the held-out cohort and in the noise cohort (12 for a smoke run).")
@click.option("--seed", type=int, default=HELD_OUT_SEED, show_default=True,
              help="Cohort seed of medblip_edge.synth (training used 0).")
@click.option("--formats", default=",".join(FORMATS), show_default=True,
              help="Comma list of LLM formats beside fp32 (medblip-export --llm-quant): int8, int4, fp16.")
@click.option("--bootstrap", type=click.IntRange(100), default=2000, show_default=True,
              help="Bootstrap resamples per 95 % interval (medblip-eval --bootstrap).")
@click.option("--margin", type=float, default=0.02, show_default=True,
              help="Non-inferiority margin in balanced accuracy (medblip-eval --margin).")
@click.option("--group-by", default="sex,site,age_band", show_default=True,
              help="Cohort columns for subgroup figures (medblip-eval --group-by; empty for none).")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the cohorts and bundles in this folder (default: a temporary folder, removed).")
def command(run: Run, variants: str, fixtures: Path, n: int, seed: int, formats: str, bootstrap: int, margin: float,
            group_by: str, keep: Path | None) -> Outcome:
    """Validate the known-answer models (trained by the published code) per LLM format with medblip-eval:
    for each variant, a held-out synthetic cohort (python -m medblip_edge.synth, seed 1000), bundles exported
    in fp32, INT8 and INT4 (and fp16 where the export can check it on this CPU; otherwise the output says so),
    all evaluated at once (paired comparison with fp32, non-inferiority at --margin), and two chance-level
    controls on fp32: a noise-image cohort without patient text, and the held-out cohort with shuffled labels.

    Writes per variant VARIANT/metrics.json and VARIANT/report.html (and -noise, -shuffled), summary.md
    (format, balanced accuracy, macro AUC, ECE, labels agree with fp32, verdict), results.json and report.md
    with the command line and the machine.

    \b
    Examples:
      medblip-bench known-answer --out results/known-answer
      medblip-bench known-answer --n 12 --bootstrap 200 --out /tmp/ka-smoke   (smoke run, a few minutes)
    """
    if not 0 <= margin < 1:
        raise MedblipError("--margin is a balanced-accuracy difference between 0 and 1, e.g. 0.02", code="usage")
    data = measure(run, _list(variants, VARIANTS, "variant"), fixtures, n, seed, _list(formats, FORMATS, "format"),
                   bootstrap, margin, _list(group_by, None, "column"), keep)
    failed = data.pop("failed_scans")
    files = data.pop("files")
    return Outcome("Known-answer models: each format against fp32 on a held-out cohort", data, report, files=files,
                   failed=f"{failed} scans failed (listed in each metrics.json)" if failed else None)

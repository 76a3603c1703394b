"""`medblip-bench explain-checks`: the checks that an --explain map is not noise, on a known-answer bundle and a
synthetic cohort whose planted regions are known (`python -m medblip_edge.synth`): pointing game, mass ratio,
randomisation test and deletion curve, per AD scan and as means (explain/checks.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from .suite import Outcome, Run, device_option, suite


def report(res: dict) -> str:
    lines = ["| bundle | AD scans | peak inside the region | top patch on the region (a random patch's odds) | "
             "mass / volume share | randomisation rank corr | "
             "deletion AUC, relevance order (nats) | random order | better by |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in res["bundles"].items():
        s = r["summary"]
        if not s.get("n"):
            lines.append(f"| {name} | 0 | | | | | | | |")
            continue
        lines.append(f"| {name} | {s['n']} | {s['hit']:.0%} | {s['patch_hit']:.0%} ({s['patch_hit_chance']:.0%}) | "
                     f"{s['mass_ratio']:.2f} | "
                     f"{s['randomisation_rank_corr']:.3f} | {s['auc_relevance']:.3f} | {s['auc_random']:.3f} | "
                     f"{s['better_by']:.3f} |")
    return "\n".join(lines)


@suite("explain-checks")
@click.option("--bundle", "bundles", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="A known-answer bundle (repeat the option).")
@click.option("--cohort", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A held-out synthetic cohort folder (its cohort.csv names scan, label, patient_text, mask).")
@device_option
def command(run: Run, bundles: tuple[Path, ...], cohort: Path, device: str) -> Outcome:
    """Pointing game, mass inside the planted region against its volume share, randomisation test (vision
    tower and Q-Former re-initialised) and deletion curve against random orders, for the AD map of every AD
    scan with a planted region in --cohort, on each --bundle.
    """
    from ..explain.checks import read_cohort, run_checks
    from ..runtime.pipeline import Pipeline

    rows = read_cohort(cohort)
    out = {}
    with tempfile.TemporaryDirectory(prefix="medblip-explain-checks-") as tmp:
        for bundle in bundles:
            pipe = Pipeline.from_bundle(bundle, backend="torch", device=device, huge_pages=False)
            out[bundle.name] = run_checks(pipe, rows, Path(tmp) / bundle.name,
                                          progress=lambda i, n: run.say(f"{bundle.name}: {i}/{n} AD scans"))
    return Outcome("Checks that --explain maps are not noise", {"cohort": str(cohort), "bundles": out}, report)

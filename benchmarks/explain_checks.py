"""`medblip-bench explain-checks`: the checks that an --explain map is not noise, on a known-answer bundle and a
synthetic cohort whose planted regions are known (`python -m medblip_edge.synth`): pointing game, mass ratio,
randomisation test and deletion curve, per AD scan and as means (explain/checks.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from .suite import Outcome, Run, device_option, suite

PUBLISHED_PATCH = 32  # the published model's patch size, for the report's note on the default windows


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
    swept = {name: r["summary"]["window_hits"] for name, r in res["bundles"].items() if r["summary"].get("window_hits")}
    if swept:
        from ..explain.relevance import default_windows

        keys = list(next(iter(swept.values())))
        background, smooth = default_windows(PUBLISHED_PATCH)
        lines += ["", "Refined peak inside the region per refinement window (background x smoothing, voxels; "
                  f"the default is {background}x{smooth} at the model's {PUBLISHED_PATCH}-voxel patches):", "",
                  "| bundle | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        lines += [f"| {name} | " + " | ".join(f"{hits[k]:.0%}" for k in keys) + " |" for name, hits in swept.items()]
    placed = {name: r["summary"]["placement"] for name, r in res["bundles"].items() if r["summary"].get("placement")}
    if placed:
        lines += ["", "Placement: the overlay's top patch blanked in the scan's own file (stored four ways) against "
                  "the same patch occluded in the model input; margin drops in nats, means over the scans; the share "
                  "of the model input's change inside the patch:", "",
                  "| bundle | storage | scans | occluded | blanked | largest difference (nats, relative) | "
                  "change inside the patch, smallest |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, variants in placed.items():
            lines += [f"| {name} | {v} | {p['scans']} | {p['mean_occluded_drop']:.3f} | {p['mean_blanked_drop']:.3f} | "
                      f"{p['max_abs_diff']:.3f} ({p['max_rel_diff']:.1%}) | {p['min_inside']:.1%} |"
                      for v, p in variants.items()]
    return "\n".join(lines)


def _window(ctx, param, values) -> tuple[tuple[int, int], ...]:
    out = []
    for v in values:
        try:
            background, smooth = (int(x) for x in v.split(","))
        except ValueError:
            raise click.BadParameter(f"{v!r}: give two odd voxel counts, BACKGROUND,SMOOTH (e.g. 33,9)") from None
        if background < 1 or smooth < 1 or background % 2 == 0 or smooth % 2 == 0:
            raise click.BadParameter(f"{v!r}: both windows must be odd and positive")
        out.append((background, smooth))
    return tuple(out)


@suite("explain-checks")
@click.option("--bundle", "bundles", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="A known-answer bundle (repeat the option).")
@click.option("--cohort", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A held-out synthetic cohort folder (its cohort.csv names scan, label, patient_text, mask).")
@click.option("--window", "windows", multiple=True, callback=_window, metavar="BACKGROUND,SMOOTH",
              help="Also point with the refined map made with these windows (voxels, odd; repeat the option): "
                   "the background mean's and the smoothing's, as in explain.relevance.detail_attribution.")
@click.option("--placement-scans", type=click.IntRange(0), default=0, show_default=True,
              help="Also run the placement check on the first N AD scans: the overlay's top patch blanked in the "
                   "scan's own file, stored as it is, flipped, permuted and anisotropic, against occluding it.")
@device_option
def command(run: Run, bundles: tuple[Path, ...], cohort: Path, windows: tuple, placement_scans: int,
            device: str) -> Outcome:
    """Pointing game, mass inside the planted region against its volume share, randomisation test (vision
    tower and Q-Former re-initialised) and deletion curve against random orders, for the AD map of every AD
    scan with a planted region in --cohort, on each --bundle. With --window, the pointing game of the refined
    map under other refinement windows too (one gradient per scan).
    """
    from ..explain.checks import read_cohort, run_checks
    from ..runtime.pipeline import Pipeline

    rows = read_cohort(cohort)
    out = {}
    with tempfile.TemporaryDirectory(prefix="medblip-explain-checks-") as tmp:
        for bundle in bundles:
            pipe = Pipeline.from_bundle(bundle, backend="torch", device=device, huge_pages=False)
            out[bundle.name] = run_checks(pipe, rows, Path(tmp) / bundle.name, windows=windows,
                                          placement_scans=placement_scans,
                                          progress=lambda i, n: run.say(f"{bundle.name}: {i}/{n} AD scans"))
    return Outcome("Checks that --explain maps are not noise",
                   {"cohort": str(cohort), "windows": [list(w) for w in windows], "bundles": out}, report)

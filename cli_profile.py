"""medblip-profile: fit the out-of-distribution profile on a trusted cohort into a copy of a bundle
(`python -m medblip_edge.cli_profile` where the console script is not installed)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import one_line_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("scans", nargs=-1, required=True)
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle folder written by medblip-export (verified first).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle folder to write: a copy of --bundle carrying the profile (may be --bundle itself: "
              "replaced atomically).")
@click.option("--conform", default=None, metavar="SPEC", help="Conform step for the cohort's scans, as medblip-infer "
              "--conform [default: the bundle's]; use the one medblip-infer will use.")
@click.option("--backend", default="auto", show_default=True, help="auto, torch, ort or trt.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@one_line_errors
def profile_main(scans, bundle_dir, out_dir, conform, backend, device):
    """Fit the out-of-distribution profile of a trusted cohort and write it into a bundle.

    SCANS are what medblip-infer takes: NIfTI files, DICOM series folders, folders, or a CSV with
    a scan column (a cohort.csv). Each scan's visual tokens are averaged into one feature vector;
    the profile holds their mean, a Ledoit-Wolf shrinkage covariance and the reference cohort's own
    (5-fold cross-fitted) Mahalanobis distances. medblip-infer with the written bundle then adds
    ood: {distance, percentile} to every row and the warning out_of_distribution above the
    reference's 99th percentile. At least 10 scans must read; scans that fail are counted and skipped.

    \b
    Example:
      medblip-profile trusted/cohort.csv --bundle bundles/t5 --out bundles/t5-profiled
    """
    from .qc.profile import fit_cohort_profile, write_profile_bundle
    from .runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle_dir, backend=backend, device=device, conform=conform, huge_pages=False)
    profile, summary = fit_cohort_profile(pipe, list(scans))
    manifest = write_profile_bundle(bundle_dir, out_dir, profile, summary)
    entry = manifest["artifacts"]["ood_profile"]
    click.echo(json.dumps({"bundle": str(out_dir), "scans": summary["scans"], "failed": summary["failed"],
                           "threshold": entry["threshold"], "shrinkage": entry["shrinkage"],
                           "conform": summary["conform"]}))


if __name__ == "__main__":
    profile_main()

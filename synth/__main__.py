"""python -m medblip_edge.synth --n N --seed S --out DIR: write a synthetic labelled cohort (see synth/cohort.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cohort import VARIANTS, make_cohort


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--n", "n", type=click.IntRange(1), required=True, help="Number of subjects (classes AD, MCI, NC in turn).")
@click.option("--seed", type=int, required=True, help="Cohort seed; training and held-out cohorts use different seeds.")
@click.option("--start", type=click.IntRange(0), default=0, show_default=True, help="First subject index.")
@click.option("--variant", type=click.Choice(VARIANTS), default="anatomy", show_default=True,
              help="anatomy: the planted-ventricle cohort; noise: noise volumes with the same labels (chance level).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for cohort.csv, scans/, masks/.")
def main(n, seed, start, variant, out):
    """Write a synthetic cohort with a known answer: NIfTI scans, planted-region masks and cohort.csv."""
    def progress(done, total):
        if done == total or done % 25 == 0:
            click.echo(f"synth: {done}/{total}", err=True)

    path = make_cohort(out, n, seed, variant=variant, start=start, progress=progress)
    click.echo(json.dumps({"cohort": str(path), "n": n, "seed": seed, "variant": variant}))


if __name__ == "__main__":
    sys.exit(main())

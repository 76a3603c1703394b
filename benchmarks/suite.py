"""What every suite shares: its output folder, its clock and progress lines, the machine capture around the
measurement, and results.json + report.md written by the one writer. `@suite(name)` turns a suite's
`measure(run, **options) -> Outcome` and its click options into the command `medblip-bench NAME`."""

from __future__ import annotations

import datetime
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from ..errors import MedblipError
from .cli import COMMAND
from .timing import Clock

RESULTS = Path("results")  # committed results live in the repository's top-level results/ folder


@dataclass
class Outcome:
    """What a suite measured. `data` goes into results.json beside the command, the options and the machine;
    `report(record)` renders report.md's tables from that whole record; `files`: other files it wrote into
    the folder; `failed`: a message, after which the command fails once everything is written."""

    title: str
    data: dict
    report: Callable[[dict], str]
    files: list[str] = field(default_factory=list)
    failed: str | None = None


@dataclass
class Run:
    """Handed to a suite: its name, its output folder and the run's clock (progress lines count from it)."""

    name: str
    out: Path
    clock: Clock = field(default_factory=Clock)

    def say(self, msg: str) -> None:
        print(f"[{self.name} {self.clock.elapsed_s():5.0f} s] {msg}", file=sys.stderr, flush=True)

    def folder(self) -> Path:
        """The output folder, made on first use (a run refused for its options leaves none behind)."""
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out


def default_out(suite: str, device: str = "cpu") -> Path:
    """results/<cpu|gpu>-<suite>-<date>, or the first of -b, -c, ... not taken yet."""
    stem = f"{'gpu' if str(device).startswith('cuda') else 'cpu'}-{suite}-{datetime.date.today().isoformat()}"
    out = RESULTS / stem
    for suffix in "bcdefghijklmnopqrstuvwxyz":
        if not out.exists():
            break
        out = RESULTS / f"{stem}-{suffix}"
    return out


def _plain(value):
    """An option's value as JSON holds it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_suite(name: str, measure, out: Path | None, options: dict, command: str) -> dict:
    """Measure under the machine capture, write results.json and report.md, print the tables; -> the record."""
    from .machine import MachineWatch
    from .writer import SCHEMA_VERSION, write_results

    run = Run(name, out or default_out(name, options.get("device", "cpu")))
    with MachineWatch() as watch:
        outcome = measure(run, **options)
    record = {"schema_version": SCHEMA_VERSION, "suite": name, "command": command,
              "options": {k: _plain(v) for k, v in options.items()}, "machine": watch.info, **outcome.data,
              "total_s": round(run.clock.elapsed_s(), 1), "files": ["results.json", "report.md", *outcome.files]}
    body = outcome.report(record)
    write_results(run.out, record, outcome.title, body)
    click.echo(body)
    run.say(f"done in {record['total_s']:.0f} s: {run.out / 'report.md'}")
    if outcome.failed:
        raise MedblipError(outcome.failed, code="bench_failed")
    return record


def suite(name: str):
    """Decorator over `measure(run, **options) -> Outcome` (its click options above it): the suite's command,
    with --out added and its docstring as --help."""

    def make(measure) -> click.Command:
        def callback(out: Path | None, **options):
            ctx = click.get_current_context()
            command = ctx.meta.get(COMMAND) or shlex.join(sys.argv)
            return run_suite(name, measure, out, options, command)

        out = click.Option(["--out"], type=click.Path(file_okay=False, path_type=Path), default=None,
                           help=f"Folder for results.json and report.md [default: results/<cpu|gpu>-{name}-<date>, "
                                "then -b, -c, ... if taken].")
        params = list(reversed(getattr(measure, "__click_params__", [])))
        return click.Command(name, callback=callback, params=[*params, out], help=measure.__doc__)

    return make


def device_option(fn):
    return click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")(fn)

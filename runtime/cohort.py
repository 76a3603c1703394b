"""Many scans: inputs (files, folders, CSV), prefetching, batching, JSON Lines / CSV output, resume."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedblipError


@dataclass
class InferOptions:
    scans: list
    bundle: Path
    backend: str = "auto"
    device: str = "cpu"
    precision: str | None = None
    patient_text: str = ""
    question: str | None = None
    out: Path | None = None
    resume: bool = False
    timeout_s: float = 300.0
    workers: int = 2
    include_paths: bool = False


def run_infer(opts: InferOptions) -> int:
    """Run every scan; returns the number that failed. (Single-threaded first version.)"""
    from .pipeline import Pipeline

    pipe = Pipeline.from_bundle(opts.bundle, backend=opts.backend, device=opts.device, precision=opts.precision)
    print(f"backend: vision={pipe.chosen['vision']} llm={pipe.chosen['llm']}", file=sys.stderr)
    failed = 0
    for scan in opts.scans:
        try:
            row = pipe(scan, patient_text=opts.patient_text, question=opts.question)
        except MedblipError as e:
            failed += 1
            row = {"scan": Path(scan).name, "error": e.as_json()}
        if opts.include_paths:
            row["path"] = str(Path(scan).resolve())
        print(json.dumps(row), flush=True)
    return failed

"""The one report writer of every suite: results.json (the figures, the machine, the command line that made them)
and report.md (a title, that command, the machine, then the suite's tables), side by side in one folder."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA_VERSION = 2  # 2: one layout for every suite (suite, command, options, machine, then the suite's figures)


def _loads(avg) -> str:
    return "/".join(f"{x:.1f}" for x in avg) if avg else "-"


def machine_lines(m: dict) -> list[str]:
    """The machine in two lines of markdown, and a warning when other processes kept its CPUs busy."""
    gpu = f"{m['gpu']['name']} (driver {m['gpu']['driver']}, CUDA {m['gpu']['cuda']})" if m.get("gpu") else "none"
    v = m["versions"]
    lines = [f"{m['date']} · {m['cpu']['model']} · {m['cores']['usable']} usable cores ({m['cores']['physical']} "
             f"physical), {m['ram_gib']} GiB RAM · torch threads {m['torch_threads']} · GPU: {gpu}",
             f"torch {v['torch']}, onnxruntime {v['onnxruntime']}, transformers {v['transformers']} · CPU flags: "
             f"{', '.join(m['cpu']['flags']) or '-'} · load average at start {_loads(m.get('load_average_start'))}, "
             f"end {_loads(m.get('load_average_end'))}", ""]
    busy = m.get("other_processes") or {}
    if busy.get("other_busy_fraction", 0) > 0.05:
        lines += [f"**Shared machine:** other processes used {busy['other_busy_fraction']:.0%} of the CPUs "
                  f"({busy['other_cpu_s']:.0f} CPU-s in {busy['wall_s']:.0f} s) while this ran; timings include "
                  "their contention (multi-threaded torch suffers most).", ""]
    return lines


def write_results(out: Path, record: dict, title: str, body: str) -> None:
    """`record` as out/results.json; out/report.md: the title, the record's command and machine, then `body`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    head = [f"# {title}", "", f"Command: `{record['command']}`", "", *machine_lines(record["machine"])]
    (out / "report.md").write_text("\n".join([*head, body.rstrip("\n")]) + "\n")

"""Quality of each LLM format against fp32, as the export measures it: one export per preset and format.

    python -m medblip_edge.benchmarks.export_quality --presets small,small-biomedlm --out DIR

Writes DIR/quality.json (each bundle's LLM parity figures from its manifest, plus the machine) and
DIR/quality.md (one row per preset and format). The figures are deterministic for a preset (seeded random
weights, fixed evaluation set); only the export times depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

from ..export.run import ExportOptions, export_bundle
from .machine import machine_info

FORMATS = ("int8", "int4", "fp16")


def _row(preset: str, fmt: str, p: dict, seconds: float, nbytes: int) -> dict:
    t = p.get("tokens", {})
    return {"preset": preset, "format": fmt, "export_s": round(seconds, 1), "bytes": nbytes,
            "checked": p.get("checked", True), "reason": p.get("reason"),
            **{k: p.get(k) for k in ("label_agreement", "min_margin_nats", "max_abs_loglik_diff",
                                     "mean_abs_loglik_diff", "max_abs_prob_diff", "greedy_tokens_identical")},
            "top1_answers": t.get("answers", {}).get("top1_agreement"),
            "top1_continuation": t.get("continuation", {}).get("top1_agreement"),
            "kl_mean": t.get("kl_mean"), "kl_max": t.get("kl_max"), "positions": t.get("positions")}


def measure(presets: list[str], formats: list[str]) -> list[dict]:
    rows = []
    for preset in presets:
        for fmt in formats:
            with tempfile.TemporaryDirectory(prefix="medblip-quality-") as tmp:
                print(f"[export_quality] {preset} {fmt}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                m = export_bundle(ExportOptions(out=Path(tmp) / "b", preset=preset, llm_quant=fmt), quiet=True)
                llm = m["artifacts"]["llm_onnx"]
                parity = llm["parity"]
                if not rows or rows[-1]["preset"] != preset:  # the fp32 graphs, checked in every export
                    rows.append(_row(preset, "fp32 (ONNX)", parity["fp32_onnx"], 0.0, 0))
                rows.append(_row(preset, fmt, parity, time.perf_counter() - t0, llm["bytes"]))
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ["preset", "LLM format", "labels agree", "smallest margin (nats)", "max Δloglik", "mean Δloglik",
            "top-1 answers", "top-1 continuation", "KL mean", "KL max", "greedy identical", "LLM bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r["checked"]:
            lines.append(f"| {r['preset']} | {r['format']} | not checked here: {r['reason']} |" + " |" * 9)
            continue
        lines.append("| " + " | ".join([
            r["preset"], r["format"], _fmt(r["label_agreement"], ".2f"), _fmt(r["min_margin_nats"], ".3g"),
            _fmt(r["max_abs_loglik_diff"], ".2g"), _fmt(r["mean_abs_loglik_diff"], ".2g"),
            _fmt(r["top1_answers"], ".3f"), _fmt(r["top1_continuation"], ".3f"), _fmt(r["kl_mean"], ".2g"),
            _fmt(r["kl_max"], ".2g"), str(r["greedy_tokens_identical"]),
            f"{r['bytes'] / 2**20:.0f} MiB" if r["bytes"] else "-"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,small-biomedlm")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.disable(logging.INFO)  # the INT4 quantizer logs every node at INFO
    rows = measure(args.presets.split(","), args.formats.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": shlex.join(["python", "-m", "medblip_edge.benchmarks.export_quality",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "date": datetime.date.today().isoformat(), "machine": machine_info(), "rows": rows}
    (args.out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "quality.md").write_text(f"`{result['command']}` ({result['machine']['cpu']['model']}, "
                                         f"{result['date']})\n\n" + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

"""`medblip-bench export-quality`: the fidelity of each LLM format and of the vision graphs to fp32, as the export
measures it (and enforces it: model/fidelity.py's VISION_TOL for vision, the fp32 LLM's strict check), one export
per preset and format.

The figures are deterministic for a preset (seeded random weights, fixed evaluation set); only the export
times and memory depend on the machine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from ..errors import MedblipError
from ..model.fidelity import VISION_TOL
from .suite import Outcome, Run, suite
from .timing import Clock

FORMATS = ("int8", "int4", "fp16")
VISION_GRAPHS = ("vision_onnx", "vision_onnx_fp16")


def _row(preset: str, fmt: str, p: dict, seconds: float, nbytes: int) -> dict:
    t = p.get("tokens", {})
    return {"preset": preset, "format": fmt, "export_s": round(seconds, 1), "bytes": nbytes,
            "checked": p.get("checked", True), "reason": p.get("reason"),
            **{k: p.get(k) for k in ("label_agreement", "min_margin_nats", "max_abs_loglik_diff",
                                     "mean_abs_loglik_diff", "max_abs_prob_diff", "greedy_tokens_identical")},
            "top1_answers": t.get("answers", {}).get("top1_agreement"),
            "top1_continuation": t.get("continuation", {}).get("top1_agreement"),
            "kl_mean": t.get("kl_mean"), "kl_max": t.get("kl_max"), "positions": t.get("positions")}


def _vision_rows(preset: str, artifacts: dict) -> list[dict]:
    """The export's vision graphs: their parity as check_vision measured and held it to VISION_TOL (an artifact
    outside the tolerance is never written), size on disk, and what the step cost."""
    rows = []
    for name in VISION_GRAPHS:
        art = artifacts.get(name)
        if art is None:
            continue
        p, res = art["parity"], art.get("resources", {})
        down = p.get("downstream", {})
        rows.append({"preset": preset, "graph": name, "precision": art["precision"], "bytes": art["bytes"],
                     "checked": p.get("checked", True), "reason": p.get("reason"),
                     "max_abs_err": p.get("max_abs_err"), "cosine": p.get("cosine"), "volumes": p.get("volumes"),
                     "tolerance": VISION_TOL[art["precision"]], "downstream_label_agreement":
                     down.get("label_agreement"), "export_s": res.get("seconds"), "peak_rss_mib": res.get("peak_rss_mib")})
    return rows


def measure(run: Run, presets: list[str], formats: list[str], vision: str) -> dict:
    from ..export.run import ExportOptions, export_bundle

    rows, vision_rows = [], []
    for preset in presets:
        for fmt in formats:
            with tempfile.TemporaryDirectory(prefix="medblip-quality-") as tmp:
                run.say(f"{preset} {fmt} (vision {vision})")
                clock = Clock()
                m = export_bundle(ExportOptions(out=Path(tmp) / "b", preset=preset, llm_quant=fmt, precision=vision),
                                  quiet=True)
                seconds = clock.elapsed_s()
            llm = m["artifacts"]["llm_onnx"]
            parity = llm["parity"]
            first = not rows or rows[-1]["preset"] != preset
            if first:
                vision_rows += _vision_rows(preset, m["artifacts"])
            if fmt == "none":  # the fp32 graphs shipped: their strict check is the format's figure
                rows.append(_row(preset, "fp32 (ONNX)", parity, seconds, llm["bytes"]))
            else:
                if first:  # the fp32 graphs, checked in every export
                    rows.append(_row(preset, "fp32 (ONNX)", parity["fp32_onnx"], 0.0, 0))
                rows.append(_row(preset, fmt, parity, seconds, llm["bytes"]))
    return {"vision_precision": vision, "rows": rows, "vision": vision_rows}


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


def vision_table(rows: list[dict]) -> str:
    head = ["preset", "graph", "precision", "max abs err", "cosine", "tolerance (max err / cosine)", "volumes",
            "labels agree downstream", "bytes", "export s", "peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tol = f"{r['tolerance']['max_abs_err']:g} / {r['tolerance']['cosine']:g}"
        measured = ([_fmt(r["max_abs_err"], ".2g"), _fmt(r["cosine"], ".6f")] if r["checked"] else
                    [f"not checked here: {r['reason']}", "-"])
        lines.append("| " + " | ".join([r["preset"], r["graph"], r["precision"], *measured, tol, str(r["volumes"] or "-"),
                                        _fmt(r["downstream_label_agreement"], ".2f"), f"{r['bytes'] / 2**20:.0f} MiB",
                                        _fmt(r["export_s"], ".1f"), f"{_fmt(r['peak_rss_mib'], '.0f')} MiB"]) + " |")
    return "\n".join(lines)


def report(res: dict) -> str:
    return "\n".join(["## LLM formats against the fp32 reference", "", table(res["rows"]), "",
                      "## Vision graphs against PyTorch fp32 (the export's check, held to its tolerance)", "",
                      vision_table(res["vision"])])


@suite("export-quality")
@click.option("--presets", default="small,small-biomedlm", show_default=True, help="Comma list of presets.")
@click.option("--formats", default=",".join(FORMATS), show_default=True,
              help="Comma list of LLM formats (medblip-export --llm-quant): int8, int4, fp16, none (fp32 graphs).")
@click.option("--vision", type=click.Choice(sorted(VISION_TOL)), default="fp32", show_default=True,
              help="Vision graph of every export (medblip-export --precision; fp16 adds the fp16 GPU graph).")
def command(run: Run, presets: str, formats: str, vision: str) -> Outcome:
    """Export each preset once per LLM format (random weights) and report the fidelity figures the export
    measured against its fp32 PyTorch reference: per LLM format, label agreement, the smallest margin,
    log-likelihood differences, per-token top-1 agreement and KL, greedy tokens; per vision graph, max abs
    error and cosine of the visual tokens against VISION_TOL (the export refuses a graph outside it),
    downstream label agreement for int8, bytes, seconds and peak RSS of the step.

    \b
    Example (paper size: the 1.1 B-parameter vision graph with external data, the fp32 LLM graphs):
      medblip-bench export-quality --presets paper-t5 --formats none [--vision fp16]
    """
    bad = [f for f in formats.split(",") if f not in (*FORMATS, "none")]
    if bad:
        raise MedblipError(f"unknown LLM format {bad[0]}; choose from {', '.join(FORMATS)}, none", code="usage")
    return Outcome("Export fidelity per format", measure(run, presets.split(","), formats.split(","), vision), report)


if __name__ == "__main__":  # the old module path
    from .moved import forward

    forward("export-quality")

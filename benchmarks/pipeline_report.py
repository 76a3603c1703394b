"""The pipeline suite's figures -> report.md's tables (readable at a glance) and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from ..export.quantize import QUANTIZERS

STAGES = ("load", "preprocess", "vision", "prefill", "score", "decode_step", "classify", "end_to_end")
EXTRA_STAGES = ("decode_step_eager",)  # shown where measured (--compare-decode)
FLOOR_STAGES = ("vision", "prefill", "decode_step", "score", "classify")


def fmt_ms(ms) -> str:
    """12.3 ms / 4.10 s / 0.123 ms; '-' when not measured."""
    if ms is None:
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.3g} ms" if ms < 10 else f"{ms:.1f} ms"


def _rate(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


def _x(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.2f}x"


def _p(row: dict, stage: str, key: str = "p50"):
    return (row["stages_ms"].get(stage) or {}).get(key)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def _label(row: dict) -> str:
    prec = row["precision"]
    extra = f" (vision {prec['vision']})" if prec["vision"] != prec["llm"] else ""
    return f"**{row['name']}**{extra}" if row["is_reference"] else f"{row['name']}{extra}"


def _mem(m: dict) -> str:
    """Peak RSS and its rise during the row (earlier rows' memory is still counted in the peak)."""
    out = f"{m['rss_peak_mib']:.0f} MiB (+{m['rss_peak_mib'] - m['rss_start_mib']:.0f})"
    return out + (f", GPU {m['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in m else "")


def _quant_bytes() -> str:
    return ", ".join(f"{name} {q.gemm.bytes_text} (decode step: {q.gemv.bytes_text})" for name, q in QUANTIZERS.items())


def _pages(rows: list[dict]) -> list[str]:
    """Which rows run on weights moved onto 2 MiB pages at load (Pipeline.from_bundle does; the reference does not)."""
    moved = [f"{_label(r)} {r['huge_pages']['huge_page_bytes'] / 2**20:.0f} MiB" for r in rows
             if r.get("huge_pages", {}).get("huge_page_bytes")]
    if not moved:
        return []
    return ["", "Weights moved onto 2 MiB pages at load (runtime/hugepages.py): " + ", ".join(moved) +
            "; the reference keeps the pages it was given, as the training code would."]


def _summary(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        a, best = r["agreement"], max(r["throughput"], key=lambda t: t["scans_per_s"]) if r["throughput"] else None
        vs = "1.00x (baseline)" if r["is_reference"] else f"{r['speedup_vs_reference']:.2f}x faster" \
            if r["speedup_vs_reference"] >= 1 else f"{r['ratio_to_reference']:.2f}x slower"
        out.append([_label(r), fmt_ms(_p(r, "end_to_end")), fmt_ms(_p(r, "end_to_end", "p90")), vs,
                    fmt_ms(_p(r, "ttft")), fmt_ms(_p(r, "decode_step")),
                    f"{best['scans_per_s']:.3g} (B={best['batch']})" if best else "-",
                    _mem(r["memory"]),
                    f"{a['label_agreement']:.2f}", f"{a['max_abs_prob_diff']:.2g}", f"{a['max_abs_loglik_diff']:.2g}"])
    return _table(["row", "end-to-end p50", "p90", "vs reference", "first token p50", "decode / token",
                   "scans/s", "peak RSS (rise)", "labels agree", "max Δprob", "max Δloglik"], out)


def _fidelity(rows: list[dict]) -> list[str]:
    """Per-token quality, teacher-forced on the baseline's tokens: these move where label agreement cannot."""
    def part(t: dict) -> str:
        if not t.get("positions"):
            return "-"
        return f"{t['top1_agreement']:.3f} / {t['kl_mean']:.2g} / {t['kl_max']:.2g} ({t['positions']})"

    body = []
    for r in rows:
        a = r["agreement"]
        t = a.get("tokens", {})
        body.append([_label(r), f"{a['label_agreement']:.2f}", f"{a['min_margin_nats']:.3g}",
                     f"{a['max_abs_loglik_diff']:.2g}", f"{a['mean_abs_loglik_diff']:.2g}",
                     part(t.get("answers", {})), part(t.get("continuation", {}))])
    return _table(["row", "labels agree", "smallest margin (nats)", "max Δloglik", "mean Δloglik",
                   "answers: top-1 / KL mean / KL max (positions)", "continuation: top-1 / KL mean / KL max"], body)


def _memory(rows: list[dict]) -> list[str]:
    body = [[_label(r), f"{r['memory']['rss_peak_mib'] / 1024:.2f} GiB", f"{r['model_load_s']:.1f} s",
             str(r.get("iters", "-"))] for r in rows]
    return _table(["row", "peak RSS", "model load", "timed iterations"], body)


def _stages(rows: list[dict]) -> list[str]:
    stages = STAGES + tuple(st for st in EXTRA_STAGES if any(st in r["stages_ms"] for r in rows))
    body = []
    for r in rows:
        cells = []
        for st in stages:
            s = r["stages_ms"].get(st)
            cells.append("-" if not s or s["p50"] is None else
                         f"{fmt_ms(s['p50'])} / {fmt_ms(s['p90'])} / {fmt_ms(s['p99'])}")
        body.append([_label(r)] + cells)
    return _table(["row (p50 / p90 / p99)"] + list(stages), body)


def _throughput(rows: list[dict]) -> list[str]:
    batches = sorted({t["batch"] for r in rows for t in r["throughput"]})
    body = []
    for r in rows:
        by = {t["batch"]: t for t in r["throughput"]}
        body.append([_label(r)] + [f"{by[b]['scans_per_s']:.3g} ({by[b]['vision_scans_per_s']:.3g})" if b in by
                                   else "-" for b in batches])
    return _table(["row: scans/s (vision alone)"] + [f"B={b}" for b in batches], body)


def _floor_cell(f: dict) -> str:
    if f.get("measured_ms") is None:
        return "-"
    if f.get("beats_floor"):
        return f"{fmt_ms(f['measured_ms'])}, floor {fmt_ms(f['floor_ms'])}: below it, not its ceiling †"
    return f"{fmt_ms(f['measured_ms'])}, floor {fmt_ms(f['floor_ms'])}, {_x(f['ratio'])}"


def _floors(rows: list[dict]) -> list[str]:
    body = [[_label(r)] + [_floor_cell(r["floors"].get(st, {})) for st in FLOOR_STAGES] for r in rows]
    out = _table(["row: measured p50, floor, measured/floor"] + list(FLOOR_STAGES), body)
    beaten = [f"{_label(r)} {st}: {r['floors'][st]['beats_floor']}" for r in rows for st in FLOOR_STAGES
              if r["floors"].get(st, {}).get("beats_floor")]
    if beaten:
        out += ["", "† A stage measured below its floor ran against another ceiling than the one measured, so no "
                "ratio is given for it:", ""] + [f"- {b}" for b in beaten]
    return out


def _work(costs: dict, rows: list[dict]) -> list[str]:
    ref = rows[0]["floors"]
    body = []
    for st in ("vision", "prefill", "decode_step", "score"):
        c, f = costs[st], ref[st]
        body.append([st, f"{c['flops'] / 1e9:.3g}", f"{c['weights'] / 1e6:.3g}", f"{c['extra_bytes'] / 2**20:.3g}",
                     fmt_ms(f["compute_floor_ms"]), fmt_ms(f["memory_floor_ms"]), f["bound"]])
    return _table(["stage", "GFLOP", "weights (M)", "inputs + KV (MiB)", "compute floor fp32",
                   "memory floor fp32", "bound (fp32)"], body)


def _limits(limits: dict) -> list[str]:
    out = []
    mm = limits["matmul"]
    for k, v in mm.items():
        if k == "fastest" or (k == "int8" and any(mm.get(o) == v for o in ("int8_ort", "int8_torch"))):
            continue
        out.append(f"- matmul {k}: " + (f"{_rate(v['flops_per_s'])}FLOP/s ({v['how']})" if "flops_per_s" in v
                                        else f"not measured ({v.get('skipped') or v.get('error', '?')})"))
    i8 = mm.get("int8", {})
    if "flops_per_s" in i8:
        out.append(f"- int8 ceiling used for the int8 rows: {i8['how']}")
    out.append(f"- fastest precision that ran: **{mm['fastest']}**")
    m = limits["memory"]
    out.append(f"- memory bandwidth: {_rate(m['bytes_per_s'])}B/s used for floors ({m['how']})")
    for pages, r in (("4 KiB pages", m), ("2 MiB pages", m.get("huge_page_rates"))):
        if r:
            out.append(f"  - on {pages}: copy {_rate(r['copy_bytes_per_s'])}B/s counting read + write, sum "
                       f"{_rate(r['read_bytes_per_s'])}B/s, matrix-vector {_rate(r['matvec_bytes_per_s'])}B/s")
    if m.get("huge_pages", {}).get("skipped"):
        out.append(f"  - not measured on 2 MiB pages: {m['huge_pages']['skipped']}")
    out.append("- each ceiling is the better of two measurements, at the start and at the end of the run")
    return out


def markdown(res: dict) -> str:
    """The report's tables (below the writer's title, command and machine lines) as one markdown string."""
    rows, plan = res["rows"], res["plan"]
    lines = [f"Device {plan['device']}. Scan: {res['scan']['name']} ({res['scan']['source']}). {plan['iters']} timed "
             f"iterations after {plan['warmup']} warm-up per row; {plan['decode_steps']} decode steps per iteration. "
             f"Export {res['export_s']:.0f} s, measuring {res['measure_s']:.0f} s, total {res['total_s']:.0f} s.", ""]
    if any(b["random_weights"] for b in res["bundles"]):
        lines += ["Weights are random (a preset): speeds are real, diagnoses are not.", ""]
    lines += ["## Speed and quality", "",
              "Quality: label agreement and largest differences of the probabilities and log-likelihoods of the "
              f"three answers against the fp32 torch backend on the {rows[0]['agreement']['cases']} evaluation cases "
              "(the export's fixed volumes + patient texts).", ""]
    lines += _summary(rows) + _pages(rows)
    lines += ["", "## Quality per token", "",
              "Teacher-forced on the baseline's tokens: the three answers as classify scores them, and a "
              "greedy continuation of the prompt (EOS not stopping it) on the first evaluation cases as ask decodes "
              "it. top-1: the share of positions where the row's most likely next token is the baseline's; KL: "
              "KL(baseline || row) in nats per position. The smallest margin is the baseline's gap between its two "
              "best answers over the cases: a label flips only when log-likelihoods move by about that much.", ""]
    lines += _fidelity(rows) + ["", "## Per stage", ""] + _stages(rows)
    lines += ["", "## Throughput vs vision batch", ""] + _throughput(rows)
    lines += ["", "## Memory", "", "Each row ran in its own process: its peak RSS counts its own weights only "
              "(model loading included).", ""] + _memory(rows)
    lines += ["", "## Floors", "", "Measured ceilings of this machine, in the same run:", ""] + _limits(res["limits"])
    lines += ["", "Floor = max(FLOPs / matmul ceiling at the stage's precision, bytes / bandwidth): weights read once "
              f"at their stored precision (fp32 4 B, bf16 2 B, {_quant_bytes()}), inputs "
              "and KV cache fp32; activations assumed cached, so a floor is a lower bound. int8 and int4 compute in "
              "int8 (dynamic INT8 GEMM, or MatMulNBits at accuracy level 4). The reference's stages are held to the "
              "same floors as the work they do.", ""]
    lines += _floors(rows) + ["", "Counted work per stage (from the manifest's model sizes):", ""]
    lines += _work(res["costs"], rows)
    lines += ["", "## What each timing includes", ""] + [f"- **{k}**: {v}" for k, v in res["timing_notes"].items()]
    if res.get("failed"):
        lines += ["", "## Failed", ""] + [f"- {f['name']}: {f['error']}" for f in res["failed"]]
    if res["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['name']}: {s['reason']}" for s in res["skipped"]]
    b = res["baseline_vs_manifest"]
    lines += ["", f"The torch fp32 baseline agrees with the labels the export recorded: {b['label_agreement']:.2f} "
              f"(max Δprob {b['max_abs_prob_diff']:.2g}).", ""]
    return "\n".join(lines)


def plots(res: dict, out: Path) -> list[str]:
    """Three PNGs: latency per stage per row, throughput vs batch, measured/floor per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, files = res["rows"], []
    width = 0.8 / max(len(rows), 1)

    def bars(ax, stages, value):
        x = np.arange(len(stages))
        for i, r in enumerate(rows):
            ax.bar(x + i * width, [value(r, s) or 0 for s in stages], width, label=r["name"])
        ax.set_xticks(x + width * (len(rows) - 1) / 2, stages, rotation=20)
        ax.set_yscale("log")
        ax.legend(fontsize=8)

    fig, ax = plt.subplots(figsize=(11, 5))
    bars(ax, STAGES, lambda r, s: _p(r, s))
    ax.set_ylabel("p50 latency (ms, log)")
    ax.set_title("Latency per stage")
    fig.tight_layout()
    fig.savefig(out / "latency_per_stage.png", dpi=110)
    files.append("latency_per_stage.png")

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        t = sorted(r["throughput"], key=lambda t: t["batch"])
        ax.plot([x["batch"] for x in t], [x["scans_per_s"] for x in t], marker="o", label=r["name"])
    ax.set_xticks(sorted({t["batch"] for r in rows for t in r["throughput"]}))
    ax.set_xlabel("vision batch")
    ax.set_ylabel("scans/s (vision + classify)")
    ax.set_yscale("log")
    ax.set_title("Throughput vs batch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_batch.png", dpi=110)
    files.append("throughput_vs_batch.png")

    fig, ax = plt.subplots(figsize=(10, 5))
    bars(ax, FLOOR_STAGES, lambda r, s: r["floors"].get(s, {}).get("ratio"))
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("measured / floor (log; 1 = at the hardware limit)")
    ax.set_title("Distance from this machine's floor")
    fig.tight_layout()
    fig.savefig(out / "ratio_to_floor.png", dpi=110)
    files.append("ratio_to_floor.png")
    plt.close("all")
    return files

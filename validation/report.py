"""What medblip-eval writes into REPORT_DIR: metrics.json, <bundle>/rows.jsonl, <bundle>/*.png and report.html
(self-contained: the images inlined as data URIs, no script, no external file: it opens offline)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from ..model.prompts import LABELS
from ..runtime.results_io import replace_file
from . import plots
from .rules import PRIMARY

RULE_ORDER = ("sum", "mean", "published", "calibrated")
MAIN_FIGURES = ("accuracy", "balanced_accuracy", "macro_auc", "kappa_quadratic", "brier", "log_loss", "ece",
                "no_decision_rate")
CLASS_FIGURES = ("sensitivity", "specificity", "ppv", "npv", "f1", "auc")


def clean(value):
    """JSON-safe: NaN/inf -> null, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_all(out: Path, doc: dict, evals, cohort) -> None:
    images: dict[str, dict[str, bytes]] = {}
    ref = evals[0]
    for k, (res, ev) in enumerate(zip(doc["bundles"], evals)):
        name = res["bundle"]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        diffs = _scan_diffs(ref, ev) if k > 0 else None
        _write_rows(folder / "rows.jsonl", ev, cohort, diffs, "calibrated" in res["rules"])
        imgs = _plots(res, ev, diffs)
        for fname, data in imgs.items():
            (folder / fname).write_bytes(data)
        images[name] = imgs
        stale = folder / "infer-rows.jsonl"  # the run's own rows (with paths): rows.jsonl holds them without
        if stale.exists():
            stale.unlink()
    replace_file(out / "metrics.json", json.dumps(clean(doc), indent=1) + "\n")
    replace_file(out / "report.html", render_html(doc, images))


def _scan_diffs(ref, ev) -> np.ndarray | None:
    """Per scan of the cohort: largest class-probability difference against the reference (NaN where either failed)."""
    if PRIMARY not in ref.decisions or PRIMARY not in ev.decisions:
        return None
    full = np.full(len(ref.y_all), np.nan)
    both = ref.ok & ev.ok
    full[both] = np.abs(ev.decisions[PRIMARY].prob[both[ev.ok]] - ref.decisions[PRIMARY].prob[both[ref.ok]]).max(1)
    return full


def _write_rows(path: Path, ev, cohort, diffs, calibrated: bool) -> None:
    lines, j = [], 0
    cal = ev.decisions.get("calibrated")
    for i, (row, entry) in enumerate(zip(ev.rows, cohort.entries)):
        row = {k: v for k, v in row.items() if k != "path"}
        row["true_label"], row["cohort_row"] = entry.label, entry.line
        if ev.ok[i]:
            if cal is not None:
                row["eval_calibrated"] = {"label": LABELS[int(cal.pred[j])],
                                          "probabilities": dict(zip(LABELS, map(float, cal.prob[j])))}
            j += 1
        if diffs is not None and np.isfinite(diffs[i]):
            row["prob_max_abs_diff_vs_reference"] = float(diffs[i])
        lines.append(json.dumps(clean(row)) + "\n")
    replace_file(path, "".join(lines))


def _plots(res: dict, ev, diffs) -> dict[str, bytes]:
    out = {}
    rule = res["rules"].get(PRIMARY, {})
    if "confusion_matrix" not in rule:
        return out
    name = res["bundle"]
    out["confusion.png"] = plots.confusion_png(rule["confusion_matrix"], f"{name}: confusion ({PRIMARY} rule)")
    dec = ev.decisions[PRIMARY]
    aucs = {lab: rule["figures"]["per_class"][lab]["auc"]["value"] for lab in LABELS}
    out["roc.png"] = plots.roc_png(ev.y, dec.prob, aucs, f"{name}: ROC one-vs-rest ({PRIMARY} rule)")
    out["reliability.png"] = plots.reliability_png(rule["reliability"], rule["figures"]["ece"]["value"],
                                                   f"{name}: reliability")
    if "calibrated" in res["rules"] and "reliability" in res["rules"]["calibrated"]:
        cal = res["rules"]["calibrated"]
        out["reliability_calibrated.png"] = plots.reliability_png(cal["reliability"], cal["figures"]["ece"]["value"],
                                                                  f"{name}: reliability, calibrated (held-out)")
    if diffs is not None and np.isfinite(diffs).any():
        out["prob_diff.png"] = plots.diff_png(diffs[np.isfinite(diffs)], f"{name} vs {res['comparison']['reference']}")
    return out


# ------------------------------------------------------------------ HTML

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #bbb;padding:.25em .55em;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}.ci{color:#666;font-size:.85em}
.random{background:#b00020;color:#fff;font-size:1.35em;font-weight:bold;padding:.8em 1em;border:4px solid #600;
margin:1em 0}.verdict{font-weight:bold;padding:.2em .5em}.ok{background:#d7f5dd}.no{background:#fde0e0}
.warn{color:#8a4b00}img{max-width:48%;margin:.3em;border:1px solid #ddd}code{background:#f3f3f3}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(fig: dict | None, pct: bool = False) -> str:
    if not fig or fig.get("value") is None:
        return "n/a"
    v, lo, hi = fig["value"], fig.get("ci_low"), fig.get("ci_high")
    ci = f' <span class="ci">[{lo:.3f}, {hi:.3f}]</span>' if lo is not None else ""
    return f"{v:.3f}{ci}"


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _confusion_table(name: str, rule: str, cm: dict) -> str:
    nd = any(cm["no_decision"])
    head = "".join(f"<th>{lab}</th>" for lab in cm["labels"]) + ("<th>no decision</th>" if nd else "")
    body = ""
    for lab, row, none in zip(cm["labels"], cm["matrix"], cm["no_decision"]):
        body += f"<tr><th>{lab}</th>" + "".join(f"<td>{v}</td>" for v in row) + (f"<td>{none}</td>" if nd else "")
        body += "</tr>"
    return (f'<table class="confusion" id="confusion-{_e(name)}-{rule}"><caption>Confusion matrix, {rule} rule '
            f'(rows: truth, columns: prediction)</caption><tr><th>truth \\ prediction</th>{head}</tr>{body}</table>')


def _rules_table(res: dict) -> str:
    rows = ""
    for rule in RULE_ORDER:
        r = res["rules"].get(rule)
        if r is None:
            continue
        if "unavailable" in r:
            rows += (f'<tr><td class="l">{_e(rule)}</td><td class="l" colspan="{len(MAIN_FIGURES) + 1}">not available: '
                     f'{_e(r["unavailable"])}</td></tr>')
            continue
        cells = "".join(f"<td>{_fmt(r['figures'].get(f))}</td>" for f in MAIN_FIGURES)
        rows += f'<tr><td class="l" title="{_e(r["title"])}">{_e(rule)}</td><td>{r["n"]}</td>{cells}</tr>'
    head = "".join(f"<th>{f.replace('_', ' ')}</th>" for f in MAIN_FIGURES)
    return f'<table class="rules"><tr><th class="l">decision rule</th><th>n</th>{head}</tr>{rows}</table>'


def _class_table(rule: dict) -> str:
    head = "".join(f"<th>{f}</th>" for f in CLASS_FIGURES)
    body = ""
    for lab in LABELS:
        figs = rule["figures"]["per_class"][lab]
        body += f"<tr><th>{lab}</th>" + "".join(f"<td>{_fmt(figs.get(f))}</td>" for f in CLASS_FIGURES) + "</tr>"
    return f'<table class="per-class"><tr><th></th>{head}</tr>{body}</table>'


def _verdict(c: dict) -> str:
    ok = c["verdict"] == "non-inferior"
    d = c["delta_balanced_accuracy"]
    return (f'<p><span class="verdict {"ok" if ok else "no"}">Verdict: {_e(c["verdict"])}</span> to '
            f'{_e(c["reference"])} at margin {c["margin"]:g} (balanced accuracy difference {_fmt(d)}; non-inferior '
            f'when the interval\'s lower end is above {-c["margin"]:g}).</p>')


def render_html(doc: dict, images: dict) -> str:
    prov = doc["provenance"]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>medblip-eval: {_e(doc['cohort']['csv'])}"
             f"</title><style>{CSS}</style></head><body>"]
    for res in doc["bundles"]:
        if res["random_weights"]:
            parts.append(f'<div class="random" role="alert">WARNING: bundle {_e(res["bundle"])} has RANDOM WEIGHTS '
                         f'(exported from a preset, trained on nothing). Its diagnoses mean nothing: every figure '
                         f'for it below measures chance, not a model. Do not use it on patients.</div>')
    c = doc["cohort"]
    parts.append(f"<h1>Validation of {len(doc['bundles'])} bundle{'s' if len(doc['bundles']) > 1 else ''} on "
                 f"{_e(c['csv'])}</h1><p>{c['scans']} scans: " + ", ".join(f"{k} {v}" for k, v in c["labels"].items())
                 + f". Intervals: 95 % stratified bootstrap, {doc['settings']['bootstrap']} resamples, seed "
                 f"{doc['settings']['seed']}. Primary decision rule: {PRIMARY} log-likelihood.</p>")
    # summary
    rows = ""
    for res in doc["bundles"]:
        r = res["rules"].get(PRIMARY, {})
        f = r.get("figures", {})
        comp = res.get("comparison")
        verdict = ("reference" if comp is None else
                   f'<span class="verdict {"ok" if comp["verdict"] == "non-inferior" else "no"}">{_e(comp["verdict"])}'
                   f'</span>')
        prec = res.get("precision") or {}
        rows += (f'<tr><td class="l">{_e(res["bundle"])}{" (random weights)" if res["random_weights"] else ""}</td>'
                 f'<td class="l">{_e(prec.get("vision"))} / {_e(prec.get("llm"))}</td><td>{res["evaluated"]}</td>'
                 f'<td>{len(res["failed"])}</td><td>{_fmt(f.get("balanced_accuracy"))}</td>'
                 f'<td>{_fmt(f.get("macro_auc"))}</td><td class="l">{verdict}</td></tr>')
    parts.append('<h2>Summary</h2><table class="summary"><tr><th class="l">bundle</th><th class="l">precision '
                 'vision / llm</th><th>evaluated</th><th>failed</th><th>balanced accuracy</th><th>macro AUC</th>'
                 f'<th class="l">non-inferiority</th></tr>{rows}</table>')
    for res in doc["bundles"]:
        name = res["bundle"]
        parts.append(f'<h2 id="bundle-{_e(name)}">Bundle {_e(name)}</h2>')
        if res.get("comparison"):
            comp = res["comparison"]
            parts.append(_verdict(comp))
            mc = comp["mcnemar"]
            pd_ = comp.get("prob_abs_diff", {})
            parts.append(f"<p>Against {_e(comp['reference'])} on {comp['n']} scans: label agreement "
                         f"{comp['label_agreement']:.3f}; macro AUC difference {_fmt(comp.get('delta_macro_auc'))}; "
                         f"McNemar (exact): {mc['ref_only_correct']} scans right only for the reference, "
                         f"{mc['candidate_only_correct']} only for this bundle, p = {mc['p_value']:.3g}; "
                         f"largest class-probability difference per scan: mean {pd_.get('mean', float('nan')):.4f}, "
                         f"95th percentile {pd_.get('p95', float('nan')):.4f}, max {pd_.get('max', float('nan')):.4f}."
                         "</p>")
        parts.append(_rules_table(res))
        prim = res["rules"].get(PRIMARY, {})
        if "confusion_matrix" in prim:
            parts.append(_confusion_table(name, PRIMARY, prim["confusion_matrix"]))
            parts.append(_class_table(prim))
        for rule in ("published", "calibrated"):
            r = res["rules"].get(rule, {})
            if "confusion_matrix" in r:
                parts.append(f"<p>{_e(r['title'])} ({_e(r['subset'])}):</p>")
                parts.append(_confusion_table(name, rule, r["confusion_matrix"]))
        cal = res["rules"].get("calibrated", {}).get("calibration")
        if cal:
            parts.append(f"<p>Calibration {_e(cal['sha256'][:12])}: temperature {cal['temperature']:.3f}, bias "
                         + ", ".join(f"{k} {v:+.3f}" for k, v in cal["bias"].items()) + "</p>")
        parts.append("".join(_img(data, f"{name} {fname}") for fname, data in images.get(name, {}).items()))
        for col, groups in res.get("subgroups", {}).items():
            body = ""
            for value, g in groups.items():
                f = g["figures"]
                warn = f'<td class="l warn">{_e(g["warning"])}</td>' if g.get("warning") else '<td class="l"></td>'
                body += (f'<tr><td class="l">{_e(value)}</td><td>{g["n"]}</td><td>{_fmt(f["accuracy"])}</td>'
                         f'<td>{_fmt(f["balanced_accuracy"])}</td><td>{_fmt(f.get("macro_auc"))}</td>{warn}</tr>')
            parts.append(f'<h3>By {_e(col)}</h3><table class="subgroups"><tr><th class="l">{_e(col)}</th><th>n</th>'
                         f'<th>accuracy</th><th>balanced accuracy</th><th>macro AUC</th><th class="l">note</th></tr>'
                         f'{body}</table>')
        if res["failed"]:
            items = "".join(f"<li>row {f['cohort_row']}: {_e(f['scan'])}: {_e(f['code'])}: {_e(f['message'])}</li>"
                            for f in res["failed"])
            parts.append(f'<h3 class="warn">{len(res["failed"])} failed scans (not in the figures)</h3><ul>{items}</ul>')
        else:
            parts.append("<p>No scan failed.</p>")
    # provenance
    rows = ""
    for res in doc["bundles"]:
        prec = res.get("precision") or {}
        back = res.get("backend") or {}
        rows += (f'<tr><td class="l">{_e(res["bundle"])}</td><td class="l"><code>{_e(res["manifest_sha256"])}</code>'
                 f'</td><td class="l">{_e(back.get("vision"))} / {_e(back.get("llm"))}</td>'
                 f'<td class="l">{_e(prec.get("vision"))} / {_e(prec.get("llm"))}</td>'
                 f'<td class="l">{"yes" if res["random_weights"] else "no"}</td></tr>')
    m = prov["machine"]
    parts.append('<h2>Provenance</h2><table class="provenance"><tr><th class="l">bundle</th><th class="l">manifest '
                 'SHA-256</th><th class="l">backend vision / llm</th><th class="l">precision vision / llm</th>'
                 f'<th class="l">random weights</th></tr>{rows}</table>'
                 f'<p>Cohort {_e(c["csv"])} SHA-256 <code>{_e(c["sha256"])}</code>. Machine: {_e(m["cpu"])}, '
                 f'{m["cores"]} cores, {m["ram_gib"]} GiB' + (f', GPU {_e(m["gpu"])}' if m.get("gpu") else "")
                 + f', {_e(m["os"])}. Date: {_e(prov["date"])}.</p><p>Command: <code>{_e(prov["command"])}</code></p>')
    parts.append("</body></html>\n")
    return "".join(parts)

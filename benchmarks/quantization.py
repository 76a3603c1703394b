"""`medblip-bench quantization`: tolerance-driven INT8/INT4 exports of trained checkpoints, and the quantizers tried
before any fallback, measured the way the export measures them.

Per checkpoint (a folder with checkpoint.pth + llm/, e.g. the published-code fixtures in tests/fixtures/official):

- the default export per format (`--llm-quant int8|int4`, the format's default tolerance, the fallback on,
  --allow-out-of-tolerance so a miss is reported instead of stopping the run): quality against fp32, how many
  matmuls were raised to 8 bits (int4) or kept fp32, their share of the weights, bytes, classify and
  decode-step times on this machine and what the raised and kept matmuls cost; int4 also without GPTQ;
- where a fallback ran, each matmul's sensitivity (quantized alone, every other one fp32), the format it
  shipped in, and the alone KLs summed against the fully quantized graph's (is the error additive?);
- the INT8 vision graph (`--precision int8`), measured downstream;
- quantizer variants without any fallback (block size, accuracy level, INT8 prefill + INT4 decode), and the
  SmoothQuant alphas the export tried, each fully quantized.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from ..errors import MedblipError
from .suite import Outcome, Run, suite

FORMATS = ("int8", "int4")


def _variants() -> dict:
    from ..export.quantize import BlockQuant, DynamicInt8, FittedBlockQuant, LlmQuant

    return {"int4 block 16 (both graphs)": LlmQuant(BlockQuant(4, 16), BlockQuant(4, 16)),
            "int4 block 32 (both graphs)": LlmQuant(BlockQuant(4, 32), BlockQuant(4, 32)),
            "int4 scales fitted to the weight error (block 32 / 128)": LlmQuant(FittedBlockQuant(4, 32),
                                                                               FittedBlockQuant(4, 128)),
            "int4 accuracy level 0 (fp32 activations)": LlmQuant(BlockQuant(4, 32, 0), BlockQuant(4, 128, 0)),
            "int8 prefill + int4 decode (block 32)": LlmQuant(DynamicInt8(), BlockQuant(4, 32)),
            "int8 prefill + 8-bit MatMulNBits decode, block 32": LlmQuant(DynamicInt8(), BlockQuant(8, 32))}


def _export(folder: Path, out: Path, **kw) -> dict:
    from ..export.run import ExportOptions, export_bundle

    return export_bundle(ExportOptions(out=out, checkpoint=folder / "checkpoint.pth", llm_dir=folder / "llm",
                                       allow_out_of_tolerance=True, **kw), quiet=True)


def _quality(p: dict) -> dict:
    t = p["tokens"]
    return {"label_agreement": p["label_agreement"], "top1": t["top1_agreement"], "kl_mean": t["kl_mean"],
            "kl_max": t["kl_max"], "max_abs_loglik_diff": p["max_abs_loglik_diff"]}


def _row(model: str, fmt: str, art: dict, seconds: float) -> dict:
    q = art["quantization"]
    p = art["parity"].get("downstream", art["parity"])
    cost = q.get("cost", {})
    return {"model": model, "format": fmt, "precision": art["precision"], **_quality(p), "met": q["met"],
            "shortfalls": q["shortfalls"],
            "tolerance": q["tolerance"], "matmuls": q["matmuls"], "kept": q["kept_matmuls"],
            "raised": q.get("raised_matmuls", []), "raised_share": q.get("raised_parameter_share", 0.0),
            "has_raised_step": "max_int8_share" in q, "sensitivity": q.get("sensitivity", []),
            "alone_kl_sum": q.get("alone_kl_sum"), "kept_share": q["kept_parameter_share"], "bytes": art["bytes"],
            "bytes_cost": cost.get("bytes", 0),
            "speed_ms": q.get("speed_ms", {}), "speed_cost_ms": {k: v for k, v in cost.items()
                                                                   if k.endswith("_ms") and k != "all_quantized_ms"},
            "all_quantized": q["all_quantized"], "quantizers_tried": q.get("quantizers_tried", []),
            "search_s": q.get("seconds"), "export_s": round(seconds, 1)}


def measure(run: Run, models: list[str], formats: list[str], variants: bool, vision: bool,
            max_fp32_share: float | None) -> dict:
    from .timing import Clock

    rows, variant_rows = [], []
    for model in models:
        folder = Path(model)
        if not (folder / "checkpoint.pth").exists() or not (folder / "llm").is_dir():
            raise MedblipError(f"{model}: no checkpoint.pth + llm/ there", code="usage")
        name = "/".join(folder.parts[-2:])
        jobs = [(fmt, {"llm_quant": fmt}) for fmt in formats]
        if "int4" in formats:  # what GPTQ changes: the same export without it
            jobs.append(("int4 --no-gptq", {"llm_quant": "int4", "gptq": False}))
        if vision:
            jobs.append(("vision int8", {"precision": "int8"}))
        for label, kw in jobs:
            run.say(f"{name} {label}")
            with tempfile.TemporaryDirectory(prefix="medblip-quant-") as tmp:
                clock = Clock()
                m = _export(folder, Path(tmp) / "b", max_fp32_share=max_fp32_share, **kw)
                art = m["artifacts"]["vision_onnx" if "precision" in kw else "llm_onnx"]
                rows.append(_row(name, label, art, clock.elapsed_s()))
        if not variants:
            continue
        for label, fmts in _variants().items():
            run.say(f"{name} variant: {label}")
            with tempfile.TemporaryDirectory(prefix="medblip-quant-") as tmp:
                m = _export(folder, Path(tmp) / "b", llm_quant="int4", llm_formats=fmts, max_fp32_share=0.0,
                            max_kl=float("inf"), min_top1=0.0)
            art = m["artifacts"]["llm_onnx"]
            variant_rows.append({"model": name, "quantizer": label, **_quality(art["parity"]),
                                 "answers": art["parity"]["tokens"]["answers"],
                                 "continuation": art["parity"]["tokens"]["continuation"],
                                 "speed_ms": art["quantization"].get("speed_ms", {}), "bytes": art["bytes"]})
    return {"rows": rows, "variants": variant_rows}


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ["checkpoint", "format", "tolerance met", "labels agree", "top-1", "KL mean", "raised to 8 bits / kept fp32 "
            "(of)", "raised / kept share", "bytes", "bytes cost", "classify ms", "decode step ms",
            "time cost (ms)", "fully quantized: top-1 / KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s, c, a = r["speed_ms"], r["speed_cost_ms"], r["all_quantized"]
        speed = [_f(s.get("classify_ms"), ".2f"), _f(s.get("decode_step_ms"), ".3f")] if "classify_ms" in s else \
            [f"vision {_f(s.get('vision_ms'), '.1f')}", "-"]
        lines.append("| " + " | ".join([
            r["model"], r["format"], "yes" if r["met"] else "NO: " + "; ".join(r["shortfalls"]),
            _f(r["label_agreement"], ".2f"), _f(r["top1"], ".3f"), _f(r["kl_mean"], ".3g"),
            (f"{len(r['raised'])} / " if r["has_raised_step"] else "- / ") + f"{len(r['kept'])} ({r['matmuls']})",
            (f"{r['raised_share']:.2f} / " if r["has_raised_step"] else "- / ") + _f(r["kept_share"], ".2f"),
            f"{r['bytes'] / 2**10:.0f} KiB",
            f"{r['bytes_cost'] / 2**10:+.0f} KiB", *speed, ", ".join(f"{k} {v:+.3f}" for k, v in c.items()) or "-",
            f"{a['top1']:.3f} / {a['kl_mean']:.3g}"]) + " |")
    return "\n".join(lines)


def variant_table(rows: list[dict], main: list[dict]) -> str:
    head = ["checkpoint", "quantizer (no fallback)", "labels agree", "top-1", "top-1 answers / continuation",
            "KL mean", "KL answers / continuation", "classify ms", "decode step ms", "bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["speed_ms"]
        lines.append("| " + " | ".join([
            r["model"], r["quantizer"], _f(r["label_agreement"], ".2f"), _f(r["top1"], ".3f"),
            f"{r['answers']['top1_agreement']:.3f} / {r['continuation']['top1_agreement']:.3f}", _f(r["kl_mean"], ".3g"),
            f"{r['answers']['kl_mean']:.3g} / {r['continuation']['kl_mean']:.3g}", _f(s.get("classify_ms"), ".2f"),
            _f(s.get("decode_step_ms"), ".3f"), f"{r['bytes'] / 2**10:.0f} KiB"]) + " |")
    for r in main:  # the smoothing alphas the default exports tried (fully quantized, before any fallback)
        for t in r["quantizers_tried"]:
            lines.append("| " + " | ".join([
                r["model"], f"{r['format']} {t['quantizer']}{' (chosen)' if t.get('chosen') else ''}",
                _f(t["label_agreement"], ".2f"), _f(t["top1"], ".3f"), "-", _f(t["kl_mean"], ".3g"), "-", "-", "-",
                "-"]) + " |")
    return "\n".join(lines)


def sensitivity_tables(rows: list[dict]) -> list[str]:
    """Per default export whose fallback ran: each matmul quantized alone, and the format it shipped in."""
    out = []
    for r in rows:
        if not r["sensitivity"]:
            continue
        level = {**{n: "int8" for n in r["raised"]}, **{n: "fp32" for n in r["kept"]}}
        out += [f"### {r['model']} {r['format']}: sensitivity, most sensitive first", "",
                f"Alone KLs summed: {r['alone_kl_sum']:.3g}; fully quantized graph: "
                f"{r['all_quantized']['kl_mean']:.3g}.",
                "", "| matmul | parameters | quantized alone: KL mean | top-1 | shipped as |", "|---|---|---|---|---|"]
        out += [f"| {s['matmul']} | {s['parameters']} | {s['kl_mean']:.3g} | {s['top1']:.3f} | "
                f"{level.get(s['matmul'], r['precision'])} |" for s in r["sensitivity"]]
        out.append("")
    return out


def report(res: dict) -> str:
    return "\n".join(["## Default exports: the tolerance, the fallback and what it cost", "", table(res["rows"]), "",
                      "## Quantizers before any fallback (fully quantized)", "",
                      variant_table(res["variants"], res["rows"]), "",
                      "## Where the error comes from: each matmul quantized alone", "",
                      *sensitivity_tables(res["rows"])])


@suite("quantization")
@click.option("--models", default="tests/fixtures/official/t5,tests/fixtures/official/biomedlm", show_default=True,
              help="Comma list of folders, each with checkpoint.pth and llm/ (the LLM's Hugging Face folder).")
@click.option("--formats", default=",".join(FORMATS), show_default=True, help="Comma list of --llm-quant formats.")
@click.option("--variants/--no-variants", default=True, show_default=True,
              help="Also measure the quantizer variants without fallback.")
@click.option("--vision/--no-vision", default=True, show_default=True, help="Also export the INT8 vision graph.")
@click.option("--max-fp32-share", type=float, default=None, help="medblip-export --max-fp32-share for the default "
              "exports [default: the export's, 0.25].")
def command(run: Run, models: str, formats: str, variants: bool, vision: bool, max_fp32_share: float | None) -> Outcome:
    """Export each checkpoint per LLM format with its default tolerance and report what the export measured:
    quality against fp32 on the evaluation set, whether the tolerance was met, which matmuls stayed fp32 and
    what they cost in bytes and time (this machine), and each quantizer variant without fallback.

    \b
    Example:
      medblip-bench quantization --models tests/fixtures/official/t5,tests/fixtures/official/biomedlm
    """
    bad = [f for f in formats.split(",") if f not in FORMATS]
    if bad:
        raise MedblipError(f"unknown format {bad[0]}; choose from {', '.join(FORMATS)}", code="usage")
    return Outcome("Quantization held to a tolerance",
                   measure(run, models.split(","), formats.split(","), variants, vision, max_fp32_share), report)

"""`medblip-bench`: every backend x precision x batch against the plain PyTorch reference and this machine's limits.

Order: machine and its measured ceilings; the reference row (fp32 eager, transformers
generate, one pass per answer); one row per backend/precision, each timed on the real MNI
scan and then run on the evaluation volumes for quality; floors per stage; results.json,
report.md and the plots into `out`. Every row runs in its own process (benchmarks/rows.py),
so one row's weights never count against another's memory.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..errors import MedblipError
from ..model.llm import family
from ..model.prompts import ANSWERS, LABELS, build_prompt
from ..bundle.format import sha256_file
from ..bundle.reader import Bundle
from .bundles import export_preset, mni_scan
from .costs import row_floors, stage_costs
from .limits import best_of, measure_limits
from .machine import OtherLoad, machine_info
from .measure import STAGE_NOTES, Plan
from .quality import agreement, manifest_agreement
from .rows import run_isolated

BACKENDS = ("torch", "ort", "trt")
QUICK = {"iters": 3, "warmup": 1, "max_batch": 2, "decode_steps": 8}
DECODE_STEPS = 16


@dataclass
class BenchOptions:
    bundles: list[Path] = field(default_factory=list)
    preset: str | None = None
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    batches: list[int] = field(default_factory=lambda: [1, 2, 4])
    iters: int = 5
    warmup: int = 1
    reference_iters: int | None = None  # None: as --iters (a paper-size reference iteration takes minutes)
    device: str = "cpu"
    quick: bool = False
    out: Path = Path("bench")


_T0 = time.perf_counter()


def _say(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


def _check(opts: BenchOptions) -> None:
    if bool(opts.bundles) == (opts.preset is not None):
        raise MedblipError("give either --bundle DIR (one or more) or --preset NAME", code="usage")
    bad = [b for b in opts.backends if b not in BACKENDS]
    if bad or not opts.backends:
        raise MedblipError(f"unknown backend {bad[0] if bad else '(none)'}; choose from {', '.join(BACKENDS)}",
                           code="usage")
    if not opts.batches or min(opts.batches) < 1 or opts.iters < 1 or opts.warmup < 0 or (opts.reference_iters or 1) < 1:
        raise MedblipError("--batch needs sizes >= 1, --iters and --reference-iters >= 1, --warmup >= 0", code="usage")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise MedblipError("--device cuda but torch sees no CUDA GPU", code="backend_unavailable")


def _plan(opts: BenchOptions) -> Plan:
    if opts.quick:
        batches = sorted({b for b in opts.batches if b <= QUICK["max_batch"]} or {1})
        return Plan(min(opts.iters, QUICK["iters"]), min(opts.warmup, QUICK["warmup"]), QUICK["decode_steps"],
                    batches, opts.device)
    return Plan(opts.iters, opts.warmup, DECODE_STEPS, sorted(set(opts.batches)), opts.device)


def _row_specs(opts: BenchOptions, bundles: list[Bundle], limits: dict) -> tuple[list[dict], list[dict]]:
    """(rows to run, rows skipped with the reason): torch per precision on the first bundle, ort/trt per bundle.

    A torch precision whose matmul this CPU runs through an emulated path (its ceiling probe was too slow to
    measure, see limits.py) is skipped with that reason: at the paper's sizes such a row would take hours."""
    rows, skipped = [], []
    cuda = opts.device.startswith("cuda")
    for backend in opts.backends:
        if backend == "torch":
            # bf16 on a CPU is a real option only with AMX/AVX512-BF16; it is still measured, not assumed
            precisions = ["fp32", "fp16", "bf16"] if cuda else (["fp32"] if opts.quick else ["fp32", "bf16"])
            for p in precisions:
                ceiling = limits["matmul"].get(p, {})
                if p != "fp32" and "skipped" in ceiling:
                    skipped.append({"name": f"torch {p}", "reason": f"{p} matmuls are emulated on this CPU "
                                                                     f"({ceiling['skipped']})"})
                else:
                    rows.append({"name": f"torch {p}", "backend": "torch", "precision": p, "bundle": bundles[0]})
        for b in bundles if backend != "torch" else []:
            llm_p = b.artifacts.get("llm_onnx", {}).get("precision", "none")
            name = f"{backend} {llm_p}"
            if not (b.has("vision_onnx") and b.has("llm_onnx")):
                skipped.append({"name": name, "reason": f"bundle {b.root.name} has no ONNX graphs"})
            elif backend == "trt" and not (cuda and b.has("vision_trt")):
                skipped.append({"name": name, "reason": "needs --device cuda and a bundle exported with --trt"})
            else:
                rows.append({"name": name, "backend": backend, "precision": None, "bundle": b})
    if "torch" not in opts.backends:  # the quality baseline is the fp32 torch backend, whatever is benchmarked
        rows.insert(0, {"name": "torch fp32", "backend": "torch", "precision": "fp32", "bundle": bundles[0],
                        "quality_only": True})
    rows.sort(key=lambda r: r["name"] != "torch fp32")  # the baseline first: its continuations are everyone's
    return rows, skipped


def _measured_p50(stages: dict) -> dict:
    return {k: v["p50"] for k, v in stages.items() if isinstance(v, dict) and "p50" in v}


def _bundle_info(b: Bundle) -> dict:
    m = b.manifest
    return {"name": b.root.name, "variant": m["model"]["variant"], "parameters": m["model"]["parameters"],
            "random_weights": b.random_weights, "max_batch": m.get("max_batch"),
            "artifacts": {k: {"precision": v.get("precision"), "bytes": v.get("bytes")}
                          for k, v in b.artifacts.items()},
            "export_parity": {k: v.get("parity") for k, v in b.artifacts.items() if v.get("parity")}}


def _collect(opts: BenchOptions, bundles: list[Bundle], scan: Path, plan: Plan) -> dict:
    """Measure everything; returns the results.json dict (without the output paths)."""
    t_start = time.perf_counter()
    machine = machine_info()
    machine["load_average_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    others = OtherLoad().start()
    _say("measuring this machine's ceilings (matmul per precision, memory bandwidth)")
    limits_start = measure_limits(opts.device, opts.quick)
    first = bundles[0]

    _say("reference: the published code's path (fp32 on CPU; its fp16/bf16 dtypes and autocast on a GPU), "
         "transformers generate, one full pass per answer (own process)")
    ref_plan = replace(plan, iters=opts.reference_iters or plan.iters)
    job = {"kind": "reference", "bundle": str(first.root), "scan": str(scan), "plan": ref_plan}
    ref = run_isolated(job)
    if "row" not in ref:
        raise MedblipError(f"the reference row did not run: {ref.get('failed') or ref.get('skipped')}",
                           code="bench_failed")
    rows = [{"name": "reference", "backend": {"vision": "torch", "llm": "torch (transformers generate)"},
             "precision": ref["row"].pop("precision"), "bundle": first.root.name, "device": opts.device,
             "is_reference": True, "iters": ref_plan.iters, **ref["row"]}]
    results = {"reference": ref["results"]}
    specs, skipped = _row_specs(opts, bundles, limits_start)
    failed: list[dict] = []
    conts = None
    for spec in specs:
        only = " - quality baseline only" if spec.get("quality_only") else ""
        _say(f"{spec['name']} ({spec['bundle'].root.name}){only} (own process)")
        job = {"kind": "pipeline", "bundle": str(spec["bundle"].root), "backend": spec["backend"],
               "precision": spec["precision"], "scan": str(scan), "plan": plan, "continuations": conts,
               "quality_only": spec.get("quality_only", False)}
        out = run_isolated(job)
        if "skipped" in out:
            skipped.append({"name": spec["name"], "reason": out["skipped"]})
            continue
        if "failed" in out:
            failed.append({"name": spec["name"], "error": out["failed"], "where": out["where"]})
            _say(f"{spec['name']} FAILED: {out['failed']}")
            continue
        if conts is None:  # the first row is the torch fp32 baseline: its continuations are everyone's
            conts = out["continuations"]
        results[spec["name"]] = out["results"]
        if spec.get("quality_only"):
            continue
        row = out["row"]
        rows.append({"name": spec["name"], "backend": row.pop("chosen"), "precision": row.pop("precision"),
                     "bundle": spec["bundle"].root.name, "device": opts.device, "is_reference": False,
                     "iters": plan.iters, **row})

    _say("measuring the ceilings again (the better of the two is the limit)")
    limits = best_of(limits_start, measure_limits(opts.device, opts.quick))
    machine["other_processes"] = others.stop()
    if "torch fp32" not in results:
        raise MedblipError(f"the quality baseline (torch fp32) did not run: {(failed + skipped)[0]}",
                           code="bench_failed")
    baseline = results["torch fp32"]
    ref_e2e = rows[0]["stages_ms"]["end_to_end"]["p50"]
    fam, tok = family(first.config.variant), first.tokenizer()
    prompt_len = len(fam.prompt_ids(tok, build_prompt("")))
    candidates = [len(fam.answer_ids(tok, ANSWERS[k])) for k in LABELS]
    costs = stage_costs(first.config, fam.hidden_size(first.config.llm), prompt_len, candidates,
                        plan.decode_steps // 2)
    for row in rows:
        key = "reference" if row["is_reference"] else row["name"]
        row["agreement"] = agreement(results[key], baseline, vs="torch fp32 on the evaluation volumes")
        e2e = row["stages_ms"]["end_to_end"]["p50"]
        row["ratio_to_reference"] = round(e2e / ref_e2e, 4)
        row["speedup_vs_reference"] = round(ref_e2e / e2e, 3)
        precision = {"vision": row["precision"]["vision"], "llm": row["precision"]["llm"]}
        row["floors"] = row_floors(costs, precision, limits, _measured_p50(row["stages_ms"]))
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "schema_version": 1,
        "command": shlex.join(["medblip-bench", *sys.argv[1:]]),
        "options": {k: ([str(p) for p in v] if k == "bundles" else str(v) if isinstance(v, Path) else v)
                    for k, v in asdict(opts).items()},
        "plan": asdict(plan),
        "machine": machine,
        "limits": limits,
        "scan": {"name": scan.name, "sha256": sha256_file(scan), "source": "nilearn wheel (MNI152 2009a T1)"},
        "bundles": [_bundle_info(b) for b in bundles],
        "costs": costs,
        "baseline_vs_manifest": manifest_agreement(baseline, first.manifest),
        "timing_notes": STAGE_NOTES,
        "rows": rows,
        "skipped": skipped,
        "failed": failed,
        "measure_s": round(time.perf_counter() - t_start, 1),
    }


def run_bench(opts: BenchOptions) -> dict:
    """Run the benchmark; writes results.json, report.md and PNG plots into `opts.out`; returns the results."""
    global _T0
    _check(opts)
    t0 = _T0 = time.perf_counter()
    scan = mni_scan()
    plan = _plan(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medblip-bench-") as tmp:
        if opts.preset:
            _say(f"exporting preset {opts.preset} (INT8 and INT4 LLM bundles) into a temporary folder")
            t_exp = time.perf_counter()
            trt = "trt" in opts.backends and opts.device.startswith("cuda")
            paths = export_preset(opts.preset, Path(tmp), opts.device, trt, max(8, max(opts.batches)))
            export_s = time.perf_counter() - t_exp
        else:
            paths, export_s = list(opts.bundles), 0.0
        bundles = [Bundle.open(p) for p in paths]
        result = _collect(opts, bundles, scan, plan)
    result["export_s"] = round(export_s, 1)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    from .report import write_outputs

    result["files"] = write_outputs(result, opts.out)
    (opts.out / "results.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    _say(f"done in {result['total_s']:.0f} s: {opts.out / 'report.md'}")
    if result["failed"]:
        raise MedblipError(f"{len(result['failed'])} row(s) failed ({result['failed'][0]['error']}); the others are "
                           f"in {opts.out / 'report.md'}", code="bench_failed")
    return result

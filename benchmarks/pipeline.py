"""`medblip-bench pipeline`: every backend x precision x batch against the published code's path and this machine's
limits.

Order: this machine's measured ceilings; the reference row (the published code's path: eager, transformers
generate, one pass per answer; fp32 on a CPU, its GPU dtypes and autocast on CUDA); one row per
backend/precision, each a Pipeline opened through the runtime factory, timed on the real MNI scan (or the
first evaluation volume) and then run on the evaluation volumes for quality; floors per stage; tables and
plots. Every row runs in its own process (rows.py), so one row's weights never count against another's memory.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click

from ..errors import MedblipError
from .measure import EVAL_INPUT_NOTE, STAGE_NOTES, Plan
from .rows import RowJob, run_isolated
from .suite import Outcome, Run, device_option, suite

BACKENDS = ("torch", "ort", "trt")
QUICK = {"iters": 3, "warmup": 1, "max_batch": 2, "decode_steps": 8}
DECODE_STEPS = 16
EVAL_SCAN = "eval"


@dataclass
class PipelineOptions:
    bundles: list[Path] = field(default_factory=list)
    preset: str | None = None
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    batches: list[int] = field(default_factory=lambda: [1, 2, 4])
    iters: int = 5
    warmup: int = 1
    reference_iters: int | None = None  # None: as --iters (a paper-size reference iteration takes minutes)
    device: str = "cpu"
    quick: bool = False
    scan: str | None = None  # a NIfTI file; "eval": the first evaluation volume; None: the MNI152 template
    compare_decode: bool = False


def _check(opts: PipelineOptions) -> None:
    import torch

    if bool(opts.bundles) == (opts.preset is not None):
        raise MedblipError("give either --bundle DIR (one or more) or --preset NAME", code="usage")
    bad = [b for b in opts.backends if b not in BACKENDS]
    if bad or not opts.backends:
        raise MedblipError(f"unknown backend {bad[0] if bad else '(none)'}; choose from {', '.join(BACKENDS)}",
                           code="usage")
    if not opts.batches or min(opts.batches) < 1 or opts.iters < 1 or opts.warmup < 0 or (opts.reference_iters or 1) < 1:
        raise MedblipError("--batch needs sizes >= 1, --iters and --reference-iters >= 1, --warmup >= 0", code="usage")
    if opts.scan not in (None, EVAL_SCAN) and not Path(opts.scan).is_file():
        raise MedblipError(f"--scan {opts.scan}: no such file (a NIfTI file, or `eval`)", code="usage")
    if opts.compare_decode and not opts.device.startswith("cuda"):
        raise MedblipError("--compare-decode compares with the CUDA-graph decoder: it needs --device cuda",
                           code="usage")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise MedblipError("--device cuda but torch sees no CUDA GPU", code="backend_unavailable")


def _scan(opts: PipelineOptions) -> Path | None:
    """The scan every row times from disk, or None (`--scan eval`: the first evaluation volume)."""
    if opts.scan == EVAL_SCAN:
        return None
    if opts.scan is not None:
        return Path(opts.scan)
    from .bundles import mni_scan

    return mni_scan()


def plan_of(opts: PipelineOptions, scan: Path | None) -> Plan:
    extra = {"device": opts.device, "scan": None if scan is None else str(scan), "compare_decode": opts.compare_decode}
    if opts.quick:
        batches = sorted({b for b in opts.batches if b <= QUICK["max_batch"]} or {1})
        return Plan(min(opts.iters, QUICK["iters"]), min(opts.warmup, QUICK["warmup"]), QUICK["decode_steps"],
                    batches, **extra)
    return Plan(opts.iters, opts.warmup, DECODE_STEPS, sorted(set(opts.batches)), **extra)


def row_jobs(opts: PipelineOptions, bundles: list, limits: dict, plan: Plan) -> tuple[list[RowJob], list[dict]]:
    """(rows to run, rows skipped with the reason): torch per precision on the first bundle, ort/trt per bundle.

    A torch precision whose matmul this CPU runs through an emulated path (its ceiling probe was too slow to
    measure, see limits.py) is skipped with that reason: at the paper's sizes such a row would take hours."""
    jobs, skipped = [], []
    cuda = opts.device.startswith("cuda")
    first = str(bundles[0].root)
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
                    jobs.append(RowJob(f"torch {p}", first, plan, "torch", p))
        for b in bundles if backend != "torch" else []:
            name = f"{backend} {b.artifacts.get('llm_onnx', {}).get('precision', 'none')}"
            if not (b.has("vision_onnx") and b.has("llm_onnx")):
                skipped.append({"name": name, "reason": f"bundle {b.root.name} has no ONNX graphs"})
            elif backend == "trt" and not (cuda and b.has("vision_trt")):
                skipped.append({"name": name, "reason": "needs --device cuda and a bundle exported with --trt"})
            else:
                jobs.append(RowJob(name, str(b.root), plan, backend))
    if "torch" not in opts.backends:  # the quality baseline is the fp32 torch backend, whatever is benchmarked
        jobs.insert(0, RowJob("torch fp32", first, plan, "torch", "fp32", quality_only=True))
    jobs.sort(key=lambda j: j.name != "torch fp32")  # the baseline first: its continuations are everyone's
    return jobs, skipped


def _row(job: RowJob, measured, device: str) -> dict:
    """A row of results.json: what ran, where, how often, and its figures."""
    return {"name": job.name, "backend": measured.backend, "precision": measured.precision,
            "bundle": Path(job.bundle).name, "device": device, "is_reference": job.backend is None,
            "iters": job.plan.iters, **measured.figures()}


def _measured_p50(stages: dict) -> dict:
    return {k: v["p50"] for k, v in stages.items() if isinstance(v, dict) and "p50" in v}


def _bundle_info(b) -> dict:
    m = b.manifest
    return {"name": b.root.name, "variant": m["model"]["variant"], "parameters": m["model"]["parameters"],
            "random_weights": b.random_weights, "max_batch": m.get("max_batch"),
            "artifacts": {k: {"precision": v.get("precision"), "bytes": v.get("bytes")}
                          for k, v in b.artifacts.items()},
            "export_parity": {k: v.get("parity") for k, v in b.artifacts.items() if v.get("parity")}}


def _scan_info(scan: Path | None) -> dict:
    from ..bundle.format import sha256_file
    from ..demo_scan import mni_t1_path

    if scan is None:
        return {"name": "evaluation volume 0", "source": EVAL_INPUT_NOTE}
    mni = mni_t1_path()
    source = "nilearn wheel (MNI152 2009a T1)" if mni is not None and scan.samefile(mni) else "given with --scan"
    return {"name": scan.name, "sha256": sha256_file(scan), "source": source}


def _run_rows(run: Run, opts: PipelineOptions, bundles: list, plan: Plan, limits: dict):
    """The reference, then every row in its own process -> (rows, quality results by row, skipped, failed)."""
    first = bundles[0]
    run.say("reference: the published code's path (fp32 on CPU; its fp16/bf16 dtypes and autocast on a GPU), "
            "transformers generate, one full pass per answer (own process)")
    ref_job = RowJob("reference", str(first.root), replace(plan, iters=opts.reference_iters or plan.iters))
    ref = run_isolated(ref_job)
    if ref.measured is None:
        raise MedblipError(f"the reference row did not run: {ref.failed or ref.skipped}", code="bench_failed")
    rows, results = [_row(ref_job, ref.measured, opts.device)], {"reference": ref.results}
    jobs, skipped = row_jobs(opts, bundles, limits, plan)
    failed, conts = [], None
    for job in jobs:
        only = " - quality baseline only" if job.quality_only else ""
        run.say(f"{job.name} ({Path(job.bundle).name}){only} (own process)")
        out = run_isolated(replace(job, continuations=conts))
        if out.skipped:
            skipped.append({"name": job.name, "reason": out.skipped})
            continue
        if out.failed:
            failed.append({"name": job.name, "error": out.failed, "where": out.where})
            run.say(f"{job.name} FAILED: {out.failed}")
            continue
        if conts is None:  # the first row is the torch fp32 baseline: its continuations are everyone's
            conts = out.continuations
        results[job.name] = out.results
        if not job.quality_only:
            rows.append(_row(job, out.measured, opts.device))
    return rows, results, skipped, failed


def _collect(run: Run, opts: PipelineOptions, bundles: list, scan: Path | None, plan: Plan) -> dict:
    """Measure everything -> the suite's figures for results.json."""
    from ..model.llm import family
    from ..model.prompts import ANSWERS, LABELS, build_prompt
    from .costs import row_floors, stage_costs
    from .limits import best_of, measure_limits
    from .quality import agreement, manifest_agreement

    t_start = run.clock.now()
    run.say("measuring this machine's ceilings (matmul per precision, memory bandwidth)")
    limits_start = measure_limits(opts.device, opts.quick)
    rows, results, skipped, failed = _run_rows(run, opts, bundles, plan, limits_start)
    run.say("measuring the ceilings again (the better of the two is the limit)")
    limits = best_of(limits_start, measure_limits(opts.device, opts.quick))
    if "torch fp32" not in results:
        raise MedblipError(f"the quality baseline (torch fp32) did not run: {(failed + skipped)[0]}",
                           code="bench_failed")
    first, baseline = bundles[0], results["torch fp32"]
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
    notes = dict(STAGE_NOTES, **({"input": EVAL_INPUT_NOTE} if scan is None else {}))
    return {"plan": asdict(plan), "limits": limits, "scan": _scan_info(scan),
            "bundles": [_bundle_info(b) for b in bundles], "costs": costs,
            "baseline_vs_manifest": manifest_agreement(baseline, first.manifest), "timing_notes": notes,
            "rows": rows, "skipped": skipped, "failed": failed, "measure_s": round(run.clock.now() - t_start, 1)}


def _bundles(run: Run, opts: PipelineOptions, tmp: Path) -> tuple[list[Path], float]:
    """The bundles to measure (given, or exported from the preset into `tmp`) and the export's seconds."""
    if not opts.preset:
        return list(opts.bundles), 0.0
    from .bundles import export_preset

    onnx = any(b != "torch" for b in opts.backends)
    what = "INT8 and INT4 LLM bundles" if onnx else "one bundle of PyTorch weights: no row needs graphs"
    run.say(f"exporting preset {opts.preset} ({what}) into a temporary folder")
    t0 = run.clock.now()
    trt = "trt" in opts.backends and opts.device.startswith("cuda")
    paths = export_preset(opts.preset, tmp, opts.device, trt, max(8, max(opts.batches)), onnx)
    return paths, run.clock.now() - t0


def run_pipeline(run: Run, opts: PipelineOptions) -> Outcome:
    """The pipeline suite's measurement: figures, plots in run.out, the report."""
    from ..bundle.reader import Bundle
    from .pipeline_report import markdown, plots

    _check(opts)
    scan = _scan(opts)
    plan = plan_of(opts, scan)
    with tempfile.TemporaryDirectory(prefix="medblip-bench-") as tmp:
        paths, export_s = _bundles(run, opts, Path(tmp))
        data = _collect(run, opts, [Bundle.open(p) for p in paths], scan, plan)
    data["export_s"] = round(export_s, 1)
    try:
        files = plots(data, run.folder())
    except ImportError:  # matplotlib is optional (medblip-edge[bench]); the tables still say everything
        files, data["notes"] = [], ["matplotlib not installed: no plots"]
    failed = data["failed"]
    src = opts.preset or ", ".join(Path(b).name for b in opts.bundles)
    return Outcome(f"medblip-bench pipeline: {src} on {opts.device}", data, markdown, files,
                   failed=f"{len(failed)} row(s) failed ({failed[0]['error']}); the others are in "
                          f"{run.out / 'report.md'}" if failed else None)


@suite("pipeline")
@click.option("--bundle", type=click.Path(path_type=Path), multiple=True,
              help="Bundle to benchmark (repeat for several: one ORT row each; the first gives the torch rows).")
@click.option("--preset", help="Or: export this preset first and benchmark it (INT8 and INT4 LLM bundles; with "
              "--backends torch alone, one bundle of PyTorch weights, no ONNX).")
@click.option("--backends", default="torch,ort", show_default=True, help="Comma list of torch, ort, trt.")
@click.option("--batch", default="1,2,4", show_default=True, help="Vision batch sizes (comma list).")
@click.option("--iters", type=int, default=5, show_default=True, help="Timed iterations per row.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed iterations first.")
@click.option("--reference-iters", type=int, default=None,
              help="Timed iterations of the reference row (default: --iters; at the paper's sizes one takes minutes).")
@device_option
@click.option("--scan", default=None, help="NIfTI file every row reads, timed from disk [default: the MNI152 T1 in "
              "nilearn's wheel], or `eval`: the export's first evaluation volume, already preprocessed (load and "
              "preprocess not timed; for machines without nilearn, such as a GPU image).")
@click.option("--compare-decode", is_flag=True, help="With --device cuda: also time decode per token with the eager "
              "dynamic-cache LLM beside the CUDA-graph decoder the runtime factory picks for T5 (decode_step_eager).")
@click.option("--quick", is_flag=True, help="Few iterations, small batches: finishes in under 2 minutes for tiny.")
def command(run: Run, bundle, preset, backends, batch, iters, warmup, reference_iters, device, scan,
            compare_decode, quick) -> Outcome:
    """Benchmark per stage (load, preprocess, vision, LLM prefill, score, decode step, end to end) against the
    published code's path and against this machine's measured limits; quality of every row on the bundle's
    evaluation cases against the fp32 torch backend.

    Rows: the reference (eager, transformers generate, one pass per answer; on a GPU in the published code's
    fp16/bf16 dtypes and autocast), torch per precision (fp32 and bf16 on a CPU; fp32, fp16 and bf16 on a GPU,
    T5 decoding with the CUDA-graph decoder), one ONNX Runtime row per bundle, TensorRT where the bundle has an
    engine. Every row is a Pipeline opened through the runtime factory, in its own process. Also writes three
    PNG plots when matplotlib is installed.

    \b
    Examples:
      medblip-bench pipeline --preset small
      medblip-bench pipeline --bundle B1 --bundle B2 --batch 1 --iters 2 --reference-iters 1
      medblip-bench pipeline --device cuda --preset paper-t5 --backends torch --scan eval --batch 1,8,32 \\
          --iters 3 --reference-iters 1 --compare-decode
    """
    return run_pipeline(run, PipelineOptions(
        bundles=list(bundle), preset=preset, backends=[b for b in backends.split(",") if b],
        batches=[int(b) for b in batch.split(",") if b], iters=iters, warmup=warmup,
        reference_iters=reference_iters, device=device, quick=quick, scan=scan, compare_decode=compare_decode))

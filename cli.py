"""Command-line entry points: medblip-export, medblip-infer, medblip-serve, medblip-bench, medblip-eval (thin shells
over the Python API)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import MedblipError, disk_full


def one_line_errors(fn):
    """User errors print one line on stderr and exit 2; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MedblipError, OSError) as e:
            error = e if isinstance(e, MedblipError) else disk_full(e)
            if error is None:
                raise  # any other OSError is a bug: its traceback is wanted
            click.echo(f"error [{error.code}]: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


# -- medblip-export -------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Training checkpoint: torch.save(model.state_dict()) "
              "file ({'model': ...} wrapping accepted) or .safetensors. Loaded with weights_only=True.")
@click.option("--llm", "llm_dir", type=click.Path(path_type=Path), help="Local Hugging Face folder of the LLM "
              "(config.json + tokenizer; weights too if the checkpoint lacks them).")
@click.option("--preset", help="Instead of a checkpoint: random weights of a named size "
              "(tiny, tiny-biomedlm, small, small-biomedlm, paper-t5, paper-biomedlm). Marked random_weights.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write "
              "(replaced atomically: a failed export leaves the old one in place).")
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), default="fp32", show_default=True,
              help="Vision graph: fp32; int8 (CPU: the ViT's matmuls as dynamic INT8, its fidelity measured against "
              "fp32: visual-token error, and labels, next tokens and KL downstream); fp16 (adds an fp16 graph "
              "for GPUs and TensorRT).")
@click.option("--llm-quant", type=click.Choice(["none", "int8", "int4", "fp16"]), default="none", show_default=True,
              help="LLM graphs: none (fp32), int8 (CPU: dynamic INT8 GEMMs, 8-bit MatMulNBits decode step), "
              "int4 (weight-only blockwise), fp16 (GPU).")
@click.option("--max-kl", type=float, default=None, help="Tolerance of --llm-quant int8/int4 and --precision int8: "
              "largest mean per-token KL(fp32 || quantized) on the evaluation set [default: 0.01 int8, 0.05 int4]. "
              "The most sensitive matmuls stay fp32 until it is met (docs: Quantization).")
@click.option("--min-top1", type=float, default=None, help="Tolerance: smallest per-token top-1 agreement with fp32 "
              "[default: 0.95 int8, 0.85 int4].")
@click.option("--min-labels", type=float, default=None, help="Tolerance: smallest diagnosis label agreement with "
              "fp32 [default: 1.0 int8, not required for int4].")
@click.option("--max-fp32-share", type=float, default=None, help="At most this share of the quantizable matmul "
              "weights may be kept fp32 to meet the tolerance [default: 0.25]; 0: no fallback.")
@click.option("--max-int8-share", type=float, default=None, help="--llm-quant int4: at most this share of the "
              "matmul weights may be raised to 8 bits (before any is kept fp32) to meet the tolerance "
              "[default: 1.0]; 0: straight to fp32.")
@click.option("--allow-out-of-tolerance", is_flag=True, help="Where no mix meets the tolerance, ship the closest one "
              "(marked quantization.met=false in the manifest, with a note) instead of failing with "
              "out_of_tolerance.")
@click.option("--no-smooth", is_flag=True, help="Where the fully quantized LLM misses the tolerance, go straight to "
              "the fallback instead of first trying activation smoothing (SmoothQuant alphas 0.25, 0.5, 0.75).")
@click.option("--no-gptq", is_flag=True, help="--llm-quant int4: where the fully quantized LLM misses the tolerance, "
              "do not try GPTQ weights (fitted to calibration activations) before the fallback.")
@click.option("--trt", is_flag=True, help="Also build a TensorRT FP16 engine of the vision graph (needs TensorRT + GPU).")
@click.option("--no-onnx", is_flag=True, help="Write only the PyTorch weights (no ONNX graphs).")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Largest vision batch (TensorRT profile max).")
@click.option("--opt-batch", type=int, default=1, show_default=True, help="TensorRT profile: batch to tune for.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--conform", default=None, metavar="SPEC", help="Record the conform step the model was trained with "
              "(iso1mm or iso1mm,ORIENT, e.g. iso1mm,LIA): medblip-infer then applies it by default with this "
              "bundle. Default: none (the published loader alone).")
@one_line_errors
def export_main(checkpoint, llm_dir, preset, out, precision, llm_quant, max_kl, min_top1, min_labels, max_fp32_share,
                max_int8_share, allow_out_of_tolerance, no_smooth, no_gptq, trt, no_onnx, max_batch, opt_batch, quiet,
                conform):
    """Turn a MedBLIP checkpoint (or a preset with random weights) into a verified bundle folder.

    Every artifact is compared with the fp32 PyTorch model on a fixed evaluation set
    before it is written into manifest.json, together with its SHA-256.

    \b
    Examples:
      medblip-export --preset tiny --out bundles/tiny --llm-quant int8
      medblip-export --checkpoint medblip_t5.pth --llm ./flan-t5-xl --out bundles/t5 --llm-quant int4

    A quantized graph (--llm-quant int8/int4, --precision int8) must meet a tolerance
    against fp32 on the evaluation set (--max-kl, --min-top1, --min-labels); where the
    fully quantized graph misses it, the most sensitive matmuls are raised to 8 bits
    (int4 only), then kept fp32 (listed in the manifest with why and what they cost),
    and where no mix within --max-int8-share / --max-fp32-share meets it the export fails with code out_of_tolerance (exit 2).
    """
    from .export.run import ExportOptions, export_bundle

    manifest = export_bundle(ExportOptions(out=out, preset=preset, checkpoint=checkpoint, llm_dir=llm_dir,
                                           precision=precision, llm_quant=llm_quant, trt=trt, onnx=not no_onnx,
                                           max_batch=max_batch, opt_batch=opt_batch, max_kl=max_kl,
                                           min_top1=min_top1, min_labels=min_labels, max_fp32_share=max_fp32_share,
                                           max_int8_share=max_int8_share, allow_out_of_tolerance=allow_out_of_tolerance,
                                           smooth=not no_smooth, gptq=not no_gptq,
                                           conform=conform), quiet=quiet)
    click.echo(json.dumps({"bundle": str(out), "random_weights": manifest["random_weights"],
                           "artifacts": sorted(manifest["artifacts"]), "notes": manifest["notes"],
                           **_quantization_summary(manifest)}))


def _quantization_summary(manifest: dict) -> dict:
    """{"quantization": {artifact: {met, kept_fp32[, raised_int8]}}} for the artifacts held to a tolerance (none:
    {}); raised_int8 where the format has an 8-bit step (int4)."""
    held = {name: {"met": a["quantization"]["met"], "kept_fp32": a["quantization"]["kept_matmuls"],
                   **({"raised_int8": a["quantization"]["raised_matmuls"]} if "max_int8_share" in a["quantization"]
                      else {})}
            for name, a in manifest["artifacts"].items() if "quantization" in a}
    return {"quantization": held} if held else {}


# -- medblip-infer --------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("scans", nargs=-1, required=True)
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder "
              "written by medblip-export.")
@click.option("--backend", default="auto", show_default=True,
              help="auto, torch, ort or trt (auto: the fastest this bundle and machine have; it says which).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="torch backend only: compute precision (default fp32).")
@click.option("--patient-text", default="", help="Patient text put before the question (age, sex, scores...); "
              "for a CSV input, its patient_text column wins.")
@click.option("--question", default=None, help="Ask a free-form question; the answer is generated greedily "
              "(at most 60 new tokens). Without it: diagnosis by scoring the three answers.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="Write rows to results.jsonl or results.csv instead of stdout.")
@click.option("--decision-detail", is_flag=True, help="Rows also carry what medblip-eval's other decision rules need: "
              "answer_tokens (each answer's token count) and greedy_answer (the generated answer to the diagnosis "
              "question; one greedy decode more per scan).")
@click.option("--resume", is_flag=True, help="With --out: skip scans that already have a complete row there.")
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True,
              help="Per-scan limit in seconds for reading + preprocessing; a scan over it gets an error row.")
@click.option("--workers", type=int, default=2, show_default=True, help="Scans read and preprocessed ahead, in parallel.")
@click.option("--include-paths", is_flag=True, help="Report full scan paths (default: file or series folder name and "
              "SHA-256 only).")
@click.option("--rebuild-trt", is_flag=True, help="If the bundle's TensorRT engine was built for another GPU or "
              "TensorRT version (or it has none), build one here from its fp16 vision graph, cached in "
              "$MEDBLIP_TRT_CACHE or ~/.cache/medblip-edge/trt (minutes, once). Without it: fall back to ONNX Runtime.")
@click.option("--huge-pages/--no-huge-pages", default=True, show_default=True,
              help="On CPU, move the loaded weights onto 2 MiB pages (Linux 6.1+ MADV_COLLAPSE; left alone where "
              "THP is set to never). Token decoding streams them faster.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process. ray: a Ray cluster (Ray Data): reading as tasks on any node, the model as "
              "an actor pool; needs the serve extra (pip install -e '.[serve]').")
@click.option("--address", default=None, help="--engine ray: join this Ray cluster (e.g. 10.0.0.5:6379; scan paths "
              "must be readable on every node) instead of starting a local one on 127.0.0.1.")
@click.option("--ray-actors", type=int, default=None, help="--engine ray: model actors [default: one per GPU with "
              "--device cuda, else 1].")
@click.option("--threads", type=int, default=None, help="--engine ray: compute threads per model actor [default: "
              "half the cluster's CPUs, the other half read].")
@click.option("--conform", default=None, metavar="SPEC", help="Resample before the published loader: iso1mm (1 mm "
              "isotropic in the scan's own axes) or iso1mm,ORIENT (also reorient, e.g. iso1mm,LIA); none for the "
              "published loader alone. Default: the spec the bundle was exported with (medblip-export --conform), "
              "else none. Every row says which was applied.")
@click.option("--strict-qc", is_flag=True, help="A scan failing an input check (a warning code in its row's "
              "warnings, out_of_distribution included) gets an error row with code qc_failed instead.")
@click.option("--explain", is_flag=True, help="Also write where in the scan the diagnosis comes from: "
              "NAME.relevance.nii.gz (the scan's own grid and affine) and NAME.relevance.png per scan, and an "
              "`explanation` block in its row (JSON Lines only). See docs: guides/explain.")
@click.option("--explain-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="--explain: folder for the maps [default: explanations/ beside --out, else ./explanations].")
@click.option("--explain-class", type=click.Choice(["AD", "MCI", "NC"]), default=None,
              help="--explain: the class whose margin is explained [default: the predicted class].")
@click.option("--explain-method", type=click.Choice(["relevance", "occlusion"]), default="relevance",
              show_default=True, help="--explain: relevance (gradient-weighted attention, needs the bundle's "
              "PyTorch weights, one backward pass) or occlusion (343 forward passes on any backend; also reports "
              "its rank correlation with relevance).")
@click.option("--explain-refine/--explain-no-refine", default=True, show_default=True,
              help="--explain relevance: spread each 32-voxel token's relevance inside it by gradient x (input - "
                   "its patch-wide mean), averaged over a quarter patch.")
@one_line_errors
def infer_main(scans, bundle_dir, backend, device, precision, patient_text, question, out_path, decision_detail,
               resume, timeout_s, workers, include_paths, rebuild_trt, huge_pages, engine, address, ray_actors, threads,
               conform, strict_qc, explain, explain_out, explain_class, explain_method, explain_refine):
    """Diagnose MRI scans with a bundle: one JSON object per scan (JSON Lines).

    SCANS are NIfTI files (.nii, .nii.gz), DICOM multi-frame files, folders, or a
    CSV with columns scan,patient_text. A folder gives one scan per NIfTI file in it
    and one per DICOM image series in it or below it (non-image DICOM objects are
    skipped and counted); a folder named in a CSV must hold one series. Each row has
    label (AD, MCI or NC), probabilities, answer, orientation (e.g. LPS), timings_ms
    per stage, warnings and random_weights; a DICOM series' row is named by its
    folder and a hash of its series UID, never a tag value. A scan that fails gives
    {"scan", "error"} and the others still run; the exit code is 1 if any failed.
    Compressed DICOM (JPEG, JPEG-LS, JPEG 2000) needs: pip install 'medblip-edge[dicom-codecs]'.
    """
    from .runtime.cohort import InferOptions, run_infer

    opts = InferOptions(
        scans=list(scans), bundle=bundle_dir, backend=backend, device=device, precision=precision,
        patient_text=patient_text, question=question, out=out_path, resume=resume, timeout_s=timeout_s,
        workers=workers, include_paths=include_paths, rebuild_trt=rebuild_trt,
        huge_pages=huge_pages, decision_detail=decision_detail, conform=conform, strict_qc=strict_qc)
    if explain or explain_out or explain_class:
        from .explain.run import ExplainOptions

        if not explain:
            raise MedblipError("--explain-out and --explain-class go with --explain", code="usage")
        if engine == "ray":
            raise MedblipError("--explain runs with --engine local", code="usage")
        folder = explain_out or ((out_path.parent if out_path else Path(".")) / "explanations")
        opts.explain = ExplainOptions(out=folder, method=explain_method, target=explain_class, refine=explain_refine)
    if engine == "ray":
        if decision_detail:
            raise MedblipError("--decision-detail runs with --engine local only", code="usage")
        from .serve.cohort_ray import RayOptions, run_infer_ray

        failed = run_infer_ray(opts, RayOptions(address=address, actors=ray_actors, threads=threads))
    else:
        if address or ray_actors or threads:
            raise MedblipError("--address, --ray-actors and --threads go with --engine ray", code="usage")
        failed = run_infer(opts)
    sys.exit(1 if failed else 0)


# -- medblip-bench --------------------------------------------------------------

from .benchmarks.cli import BenchGroup  # noqa: E402  (click only: each suite is imported when it is named)

bench_main = BenchGroup(
    "medblip-bench", errors=one_line_errors, help="""Benchmarks, one suite at a time, on the machine at hand.

    Every suite records this machine (CPU and its flags, cores, RAM, GPU, library versions, load
    averages and what other processes took) and the command line that ran it, and writes
    results.json and report.md (its tables) into --out, by default results/<cpu|gpu>-<suite>-<date>;
    the tables are printed too. `python -m medblip_edge.cli_bench SUITE ...` is the same command
    where the console scripts are not installed.

    \b
    Examples:
      medblip-bench pipeline --preset tiny --quick --out /tmp/bench
      medblip-bench pipeline --device cuda --preset paper-t5 --backends torch --scan eval
      medblip-bench gunzip --iters 10
    """,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})


# -- medblip-serve --------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder "
              "written by medblip-export (verified before serving).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP API listens on.")
@click.option("--port", type=int, default=8000, show_default=True, help="HTTP port.")
@click.option("--replicas", type=int, default=None, help="Model replicas [default: 1 on CPU, one per GPU with "
              "--device cuda].")
@click.option("--threads", type=int, default=None, help="Compute threads per replica [default: the cluster's "
              "CPUs / replicas].")
@click.option("--preprocess-workers", type=int, default=2, show_default=True,
              help="Threads per replica that read and preprocess uploads, off the model's thread.")
@click.option("--max-batch", type=int, default=None,
              help="Most scans in one vision batch, capped by the bundle's vision graph [default: 1 on CPU, "
              "where a batch costs the same per scan and only adds its wait; the graph's largest on cuda].")
@click.option("--batch-wait-ms", type=float, default=10.0, show_default=True,
              help="How long a vision batch waits for more scans after the first arrives.")
@click.option("--max-body-mb", type=float, default=1024.0, show_default=True,
              help="Largest request body accepted (413 body_too_large above it).")
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True,
              help="Per-request limit in seconds (504 timeout past it).")
@click.option("--backend", default="auto", show_default=True, help="auto, torch, ort or trt.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (one replica per GPU).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="torch backend only: compute precision (default fp32).")
@click.option("--address", default=None, help="Join this Ray cluster (e.g. 10.0.0.5:6379) instead of starting a "
              "local one on 127.0.0.1.")
@click.option("--metrics-port", type=int, default=8080, show_default=True,
              help="Prometheus port of the local cluster's metrics agent (127.0.0.1; Ray's series and medblip_*).")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="Ray Serve's access log (method, route, status, latency; never file names or text).")
@click.option("--huge-pages/--no-huge-pages", default=True, show_default=True,
              help="On CPU, move the loaded weights onto 2 MiB pages (see medblip-infer --help).")
@one_line_errors
def serve_main(bundle_dir, host, port, replicas, threads, preprocess_workers, max_batch, batch_wait_ms, max_body_mb,
               timeout_s, backend, device, precision, address, metrics_port, access_log, huge_pages):
    """Serve a bundle over HTTP on Ray Serve: POST a scan, get medblip-infer's JSON row back.

    \b
    POST /v1/infer   multipart form: scan=@file.nii.gz [patient_text=...] [question=...]
    GET  /v1/ready   200 once a replica has loaded and verified the bundle
    GET  /-/healthz  200 while the HTTP proxy is up (liveness)
    On a GPU, scans that arrive together share one vision batch. Bad input gets a 4xx with the
    error code medblip-infer would give, and the server goes on. Prints one JSON line
    when ready; SIGTERM or Ctrl-C finishes requests in flight, then stops everything.

    \b
    Example:
      medblip-serve --bundle demo-bundle --port 8000
      curl -F scan=@scan.nii.gz -F patient_text="74 year old female. " localhost:8000/v1/infer
    """
    from .serve.config import ReplicaConfig
    from .serve.server import ServeOptions, run_from_command_line

    run_from_command_line(ServeOptions(
        replica=ReplicaConfig(bundle=str(bundle_dir), backend=backend, device=device, precision=precision,
                              threads=threads, huge_pages=huge_pages, preprocess_workers=preprocess_workers,
                              max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_body_mb=max_body_mb,
                              timeout_s=timeout_s),
        replicas=replicas, host=host, port=port, metrics_port=metrics_port, address=address, access_log=access_log))


# -- medblip-eval ---------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("cohort", type=click.Path(path_type=Path))
@click.option("--bundle", "bundles", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Bundle folder to evaluate; repeat it for several formats of one checkpoint: each later bundle is "
              "compared with the first (paired) and gets a non-inferiority verdict.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Report folder: metrics.json, report.html, and per bundle rows.jsonl and PNG plots.")
@click.option("--rows", "rows", multiple=True, type=click.Path(path_type=Path),
              help="Evaluate rows medblip-infer already wrote (results.jsonl) instead of running the bundle; one per "
              "--bundle, same order. The published rule needs rows written with --decision-detail.")
@click.option("--group-by", default="", help="Comma-separated cohort columns to report subgroups by, e.g. "
              "sex,site,scanner,age_band (a warning below 30 scans).")
@click.option("--calibrate", type=float, default=None, help="Fit the calibrated rule (per-class bias + temperature) "
              "on this stratified fraction of the cohort, e.g. 0.3; its figures are on the held-out rest.")
@click.option("--write-calibrated", type=click.Path(path_type=Path), default=None,
              help="With --calibrate: write the first bundle again, with its calibration in the manifest, as this new "
              "verified bundle; medblip-infer on it reports calibrated probabilities beside the raw ones.")
@click.option("--margin", type=float, default=0.02, show_default=True,
              help="Non-inferiority margin in balanced accuracy: a later bundle is non-inferior when the lower end "
              "of the 95 % interval of its difference to the first is above -MARGIN.")
@click.option("--bootstrap", "n_bootstrap", type=int, default=2000, show_default=True,
              help="Stratified bootstrap resamples per 95 % interval.")
@click.option("--seed", type=int, default=20261205, show_default=True, help="Seed of the bootstrap and the split.")
@click.option("--backend", default="auto", show_default=True, help="auto, torch, ort or trt (as medblip-infer).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--workers", type=int, default=2, show_default=True, help="Scans read and preprocessed ahead.")
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True,
              help="Per-scan limit in seconds for reading + preprocessing (a scan over it fails, counted).")
@one_line_errors
def eval_main(cohort, bundles, out_dir, rows, group_by, calibrate, write_calibrated, margin, n_bootstrap, seed,
              backend, device, workers, timeout_s):
    """Validate bundles on a labelled cohort: accuracy, balanced accuracy, per-class sensitivity,
    specificity, PPV, NPV, F1, ROC AUC, weighted kappa, Brier, log-loss, calibration error, each
    with a 95 % stratified bootstrap interval, under four decision rules side by side.

    COHORT is a CSV with columns scan,label and optionally patient_text and subgroup columns;
    labels AD, MCI, NC or a synonym (CN, control, dementia, ...); scan paths relative to the CSV.
    Failed scans are counted and listed, never dropped silently; the exit code is 1 if any failed.
    Progress goes to stderr, one JSON summary line to stdout.

    \b
    Examples:
      medblip-eval cohort.csv --bundle bundles/fp32 --out report
      medblip-eval cohort.csv --bundle b/fp32 --bundle b/int8 --bundle b/int4 --out report --group-by sex,site
      medblip-eval cohort.csv --bundle b/fp32 --out report --calibrate 0.3 --write-calibrated b/fp32-cal
    """
    import shlex

    from .validation.runner import EvalOptions, run_eval

    opts = EvalOptions(cohort=cohort, bundles=list(bundles), out=out_dir, rows=list(rows),
                       group_by=[g.strip() for g in group_by.split(",") if g.strip()], calibrate=calibrate,
                       write_calibrated=write_calibrated, margin=margin, n_bootstrap=n_bootstrap, seed=seed,
                       backend=backend, device=device, workers=workers, timeout_s=timeout_s,
                       command=shlex.join(["medblip-eval", *sys.argv[1:]]))
    doc, failed = run_eval(opts)
    summary = []
    for res in doc["bundles"]:
        figs = res["rules"].get("sum", {}).get("figures", {})
        summary.append({"bundle": res["bundle"], "precision": res["precision"], "random_weights": res["random_weights"],
                        "evaluated": res["evaluated"], "failed": len(res["failed"]),
                        "balanced_accuracy": figs.get("balanced_accuracy"), "macro_auc": figs.get("macro_auc"),
                        "verdict": res.get("comparison", {}).get("verdict")})
    click.echo(json.dumps({"report": str(Path(out_dir) / "report.html"), "metrics": str(Path(out_dir) / "metrics.json"),
                           "bundles": summary, "calibrated_bundle": doc.get("calibrated_bundle")}))
    sys.exit(1 if failed else 0)

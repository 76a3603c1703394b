"""`medblip-bench explain`: what `--explain` costs per model size: time and peak memory of the relevance map
(one forward and one backward pass, fp32) and of occlusion (343 forward passes), beside one plain diagnosis.

Each preset is exported once (PyTorch weights only) and run on the MNI152 T1 template. Memory is the
process's peak RSS while the step runs (sampled every 2 ms) above its RSS before it, and on CUDA torch's peak.
Occlusion on a size where 343 passes take long is timed on --occlusion-patches patches and scaled to 343, and
the row says so.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from .suite import Outcome, Run, device_option, suite
from .timing import PeakMemory


def _timed(fn, device: str) -> tuple[float, dict, object]:
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        out = fn()
        ms = (time.perf_counter() - t0) * 1000
    added = round(mem.result["rss_peak_mib"] - mem.result["rss_start_mib"], 1)
    return round(ms, 1), {**mem.result, "rss_added_mib": added}, out


def measure_preset(run: Run, preset: str, root: Path, device: str, occlusion_patches: int) -> dict:
    from ..explain.occlusion import occlusion_map
    from ..explain.run import Explainer, ExplainOptions
    from ..explain.target import class_index
    from ..preprocess import open_scan
    from ..runtime.pipeline import Pipeline
    from .bundles import export_preset, mni_scan

    run.say(f"{preset}: exporting")
    bundle = export_preset(preset, root, device, trt=False, max_batch=4, onnx=False)[0]
    pipe = Pipeline.from_bundle(bundle, backend="torch", device=device, huge_pages=False)
    scan = mni_scan()
    pipe(scan)  # warm-up
    infer_ms, infer_mem, row = _timed(lambda: pipe(scan), device)
    prepared = pipe.prepare(scan)
    target = class_index(row["label"])
    ex = Explainer(pipe, ExplainOptions(out=root / f"maps-{preset}", montage=True), device)
    run.say(f"{preset}: relevance")
    ex.relevance(prepared.volume, "", target, True)  # warm-up
    rel_ms, rel_mem, _ = _timed(lambda: ex.relevance(prepared.volume, "", target, True), device)
    whole_ms, whole_mem, block = _timed(lambda: ex(open_scan(scan), prepared.volume, row, ""), device)
    g = int(pipe.bundle.config.vision.image_size) // ex.patch
    n = min(occlusion_patches, g ** 3)
    run.say(f"{preset}: occlusion of {n} patches")
    only = list(range(0, g ** 3, max(1, g ** 3 // n)))[:n]
    occ_ms, occ_mem, _ = _timed(lambda: occlusion_map(pipe, prepared.volume, "", target, ex.patch, only=only), device)
    per_patch = occ_ms / len(only)
    return {"preset": preset, "device": device, "diagnosis_ms": infer_ms, "diagnosis_memory": infer_mem,
            "relevance_ms": rel_ms, "relevance_memory": rel_mem,
            "explain_whole_ms": whole_ms, "explain_whole_memory": whole_mem,
            "explain_whole_timings_ms": block["timings_ms"],
            "occlusion_patches_timed": len(only), "occlusion_ms_per_patch": round(per_patch, 1),
            "occlusion_ms_all_patches": round(per_patch * g ** 3, 0), "occlusion_scaled": len(only) < g ** 3,
            "occlusion_memory": occ_mem}


def _peak(row: dict) -> float:
    """The process's largest sampled RSS over the steps (the model's weights included)."""
    return max(row[k]["rss_peak_mib"] for k in ("diagnosis_memory", "relevance_memory", "explain_whole_memory",
                                                 "occlusion_memory"))


def report(res: dict) -> str:
    lines = ["| preset | device | diagnosis ms | relevance ms | relevance RSS added MiB | process peak RSS MiB | "
             "--explain whole ms (map, NIfTI, PNG) | occlusion ms per patch | occlusion ms, 343 patches | "
             "occlusion RSS added MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        scaled = f" (scaled from {r['occlusion_patches_timed']})" if r["occlusion_scaled"] else ""
        lines.append(f"| {r['preset']} | {r['device']} | {r['diagnosis_ms']} | {r['relevance_ms']} | "
                     f"{r['relevance_memory']['rss_added_mib']} | {_peak(r)} | {r['explain_whole_ms']} | "
                     f"{r['occlusion_ms_per_patch']} | {r['occlusion_ms_all_patches']:.0f}{scaled} | "
                     f"{r['occlusion_memory']['rss_added_mib']} |")
    if res.get("skipped"):
        lines += ["", "Not measured here: " + "; ".join(res["skipped"])]
    return "\n".join(lines)


@suite("explain")
@click.option("--preset", "presets", multiple=True, default=("tiny", "small"), show_default=True,
              help="Model sizes to measure (repeat the option).")
@device_option
@click.option("--occlusion-patches", type=int, default=343, show_default=True,
              help="Patches occluded for the occlusion timing (fewer: scaled to 343, and the row says so).")
@click.option("--skip-note", "skip_notes", multiple=True, help="A size left out and why (written into the report).")
def command(run: Run, presets: tuple[str, ...], device: str, occlusion_patches: int,
            skip_notes: tuple[str, ...]) -> Outcome:
    """Time and peak memory of medblip-infer --explain per model size: the relevance map alone, the whole
    explanation (map, NIfTI, PNG), and occlusion, beside one plain diagnosis of the same scan.
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="medblip-explain-bench-") as tmp:
        for preset in presets:
            rows.append(measure_preset(run, preset, Path(tmp), device, occlusion_patches))
    return Outcome("Cost of --explain", {"rows": rows, "skipped": list(skip_notes)}, report)

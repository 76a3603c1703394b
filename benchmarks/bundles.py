"""The pipeline suite's inputs: the bundles (given, or exported from a preset) and the real scan."""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from ..errors import MedblipError

# one bundle per LLM quantization, each an ORT row; on a CPU the INT4 bundle carries the INT8 vision graph,
# so the run also times (and measures the fidelity of) the reduced-precision vision graph
PRESET_BUNDLES = {"cpu": (("int8", "fp32"), ("int4", "int8")), "cuda": (("int8", "fp16"), ("int4", "fp16"))}
PARALLEL_EXPORT_PARAMETERS = 1e9  # larger models export one at a time (each export holds GBs)


def mni_scan() -> Path:
    """The MNI152 T1 template shipped in nilearn's wheel (197x233x189 uint8, gzipped): a real brain MRI."""
    from ..demo_scan import mni_t1_path

    path = mni_t1_path()
    if path is None:
        raise MedblipError("the benchmark scan is the MNI152 T1 template in nilearn's wheel: pip install nilearn "
                           "(or medblip-edge[demo])", code="missing_dependency")
    return path


def _export_one(kwargs: dict, threads: int) -> str:
    """Child process: one quiet export (its own torch thread count, so two exports share the cores)."""
    import torch

    from ..export.run import ExportOptions, export_bundle

    torch.set_num_threads(threads)
    logging.disable(logging.INFO)  # the INT4 quantizer logs every node at INFO
    export_bundle(ExportOptions(**kwargs), quiet=True)
    return str(kwargs["out"])


def _large(preset: str) -> bool:
    from ..model.config import preset as get_preset
    from .costs import LLM_COSTS

    cfg = get_preset(preset)
    return LLM_COSTS[cfg.variant]({**cfg.llm, "vocab_size": cfg.llm["vocab_size"] or 0}).params() \
        >= PARALLEL_EXPORT_PARAMETERS


def export_preset(preset: str, root: Path, device: str, trt: bool, max_batch: int, onnx: bool = True) -> list[Path]:
    """Export `preset` once per LLM quantization into `root`, in parallel processes when memory allows; files
    the bundles have in common (same path, same SHA-256: the PyTorch weights) are stored once (hard links).
    Without `onnx` (only torch rows asked for): one bundle of PyTorch weights, no graphs."""
    kinds = PRESET_BUNDLES["cuda" if device.startswith("cuda") else "cpu"]
    jobs = [{"out": root / f"{preset}-{q}", "preset": preset, "llm_quant": q, "max_batch": max_batch,
             "precision": vision, "trt": trt} for q, vision in kinds]
    if not onnx:
        jobs = [{"out": root / f"{preset}-torch", "preset": preset, "max_batch": max_batch, "onnx": False}]
    # a small-preset export peaks near 2 GiB, a paper-size one near 7 (INT8/INT4 LLM): those run one by one
    return export_all(jobs, parallel=not _large(preset))


def export_checkpoint(checkpoint: Path, llm_dir: Path, root: Path, quants: list[str]) -> list[Path]:
    """Export a trained checkpoint once per LLM quantization (medblip-export --llm-quant; "none" is fp32) into
    root/<fp32|int8|int4|fp16>, in parallel processes when memory allows, shared files stored once."""
    jobs = [{"out": root / ("fp32" if q == "none" else q), "checkpoint": Path(checkpoint), "llm_dir": Path(llm_dir),
             "llm_quant": q} for q in quants]
    return export_all(jobs, parallel=True)


def export_all(jobs: list[dict], parallel: bool) -> list[Path]:
    """Run ExportOptions(**job) for each job in spawned processes; the bundle folders, in the jobs' order."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # an export is mostly single-threaded graph writing, so two at once roughly halve the wait
    parallel = parallel and psutil.virtual_memory().available > 8 * 2**30 and cores > 1
    workers = len(jobs) if parallel else 1
    threads = max(1, cores // workers)
    paths = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for job in [pool.submit(_export_one, job, threads) for job in jobs]:
            paths.append(Path(job.result()))
            if len(paths) > 1:
                share_identical_files(paths[0], paths[-1])
    return paths


def share_identical_files(first: Path, other: Path) -> int:
    """Replace each file of bundle `other` that bundle `first` has at the same path with the same SHA-256 by a
    hard link to it (both manifests already hold the digests); returns bytes saved. Read-only bundles."""
    digests = [{rel: h for art in json.loads((b / "manifest.json").read_text())["artifacts"].values()
                for rel, h in art["sha256"].items()} for b in (first, other)]
    saved = 0
    for rel, digest in digests[1].items():
        src, dst = first / rel, other / rel
        if digests[0].get(rel) == digest and not os.path.samefile(src, dst):
            tmp = dst.with_name(dst.name + ".link")
            os.link(src, tmp)
            os.replace(tmp, dst)
            saved += src.stat().st_size
    return saved

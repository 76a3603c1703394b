"""The inputs of a run: the bundles (given, or exported from a preset) and the real scan."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from ..errors import MedblipError

PRESET_QUANTS = ("int8", "int4")  # one bundle per LLM quantization; each gives an ORT row


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


def export_preset(preset: str, root: Path, device: str, trt: bool, max_batch: int) -> list[Path]:
    """Export `preset` once per LLM quantization into `root`, in parallel processes when memory allows."""
    import psutil

    jobs = [{"out": root / f"{preset}-{q}", "preset": preset, "llm_quant": q, "max_batch": max_batch,
             "precision": "fp16" if device.startswith("cuda") else "fp32", "trt": trt} for q in PRESET_QUANTS]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # an export is mostly single-threaded graph tracing, so two at once roughly halve the wait;
    # a small-preset export peaks near 5 GiB, so run them one by one on a small machine
    small = preset.startswith("tiny") or psutil.virtual_memory().available > 12 * 2**30
    workers = len(jobs) if small and cores > 1 else 1
    threads = max(1, cores // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        done = [pool.submit(_export_one, job, threads) for job in jobs]
        return [Path(f.result()) for f in done]

"""One benchmark row per process: timings, memory and quality of one backend, measured where no other row's
weights are resident (a paper-size fp32 row holds ~16 GB; two in one process would not fit a 24 GB machine).

A job is a plain dict (picklable across `spawn`); `measure_row(job)` runs in the child and returns the row
and its quality results (arrays included). `run_isolated(jobs)` runs each in a fresh process, in order, so
the baseline's continuations can be handed to the rows after it.
"""

from __future__ import annotations

import gc
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from ..errors import MedblipError


def _reference(job: dict) -> dict:
    import torch

    from ..model.weights import load_weights
    from ..bundle.reader import Bundle
    from ..model.reference import ReferencePipeline
    from .measure import measure_reference
    from .quality import eval_set, reference_results

    bundle, plan = Bundle.open(job["bundle"], verify=False), job["plan"]
    # on a GPU, the published code's own dtypes and autocast (model/reference.py); on a CPU, fp32 as it runs there
    opener = lambda: ReferencePipeline(load_weights(bundle.config, bundle.path("torch"), torch.float32, plan.device),
                                       bundle.tokenizer(), gpu_precisions=plan.device.startswith("cuda"))
    row, ref = measure_reference(opener, Path(job["scan"]), bundle.manifest["preprocess"]["size"], plan)
    row["precision"] = ref.precision
    return {"row": row, "results": reference_results(ref, eval_set(bundle), plan.device)}


def _pipeline(job: dict) -> dict:
    from ..bundle.reader import Bundle
    from ..runtime.pipeline import Pipeline
    from .measure import measure_pipeline
    from .quality import continuations, eval_set, pipeline_results

    bundle, plan = Bundle.open(job["bundle"], verify=False), job["plan"]
    evalset = eval_set(bundle)
    opener = lambda: Pipeline.from_bundle(job["bundle"], job["backend"], plan.device, job["precision"])
    if job.get("quality_only"):
        pipe, row = opener(), None
    else:
        row, pipe = measure_pipeline(opener, Path(job["scan"]), plan)
    conts = job.get("continuations")
    if conts is None:  # the baseline: its own greedy continuations are every row's teacher-forced tokens
        conts = continuations(pipe, evalset)
    out = {"row": row, "results": pipeline_results(pipe, evalset, conts), "continuations": conts}
    if row is None:
        out["chosen"], out["precision"] = pipe.chosen, pipe.precision
    return out


def measure_row(job: dict) -> dict:
    """In the child: {"row", "results", ...}, or {"skipped": reason} / {"failed": error, "where": trace}."""
    try:
        return _reference(job) if job["kind"] == "reference" else _pipeline(job)
    except MedblipError as e:  # a backend this machine lacks: the report says so, the run goes on
        return {"skipped": str(e)}
    except Exception as e:  # a broken row must not hide the others; run_bench still fails at the end
        return {"failed": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=-3)}
    finally:
        gc.collect()


def run_isolated(job: dict) -> dict:
    """`measure_row(job)` in a fresh process (spawned: nothing inherited), which exits afterwards."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        try:
            return pool.submit(measure_row, job).result()
        except Exception as e:  # the child died (killed for memory, say): a failed row, with the cause
            return {"failed": f"the row's process ended: {type(e).__name__}: {e}", "where": ""}

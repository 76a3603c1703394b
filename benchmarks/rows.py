"""One pipeline-suite row per process: timings, memory and quality of one backend, measured where no other row's
weights are resident (a paper-size fp32 row holds ~16 GB; two in one process would not fit a 24 GB machine).

The parent hands a `RowJob` to a fresh process (`run_isolated`, spawned: nothing inherited) and gets a
`RowResult` back: the row's figures and its quality results (arrays included), or why it was skipped or
failed. Rows run one after another, so the baseline's continuations can be handed to the rows after it.
"""

from __future__ import annotations

import gc
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

from ..errors import MedblipError
from ..model.fidelity import Answers
from .measure import Measured, Plan


@dataclass(frozen=True)
class RowJob:
    """One row to measure: the reference (`backend` None: the published code's path) or a Pipeline opened
    through the runtime factory with `backend` and `precision`; `quality_only`: the fp32 baseline's quality
    results without timing it; `continuations`: the baseline's tokens every other row is teacher-forced on."""

    name: str
    bundle: str
    plan: Plan
    backend: str | None = None
    precision: str | None = None
    quality_only: bool = False
    continuations: list[list[int]] | None = None


@dataclass
class RowResult:
    """What a row's process hands back: its figures (None for a quality-only row), its answers on the evaluation
    cases and the continuations it was scored on; or `skipped` (a backend this machine lacks) or `failed`."""

    measured: Measured | None = None
    results: Answers | None = None
    continuations: list[list[int]] | None = None
    skipped: str | None = None
    failed: str | None = None
    where: str = ""


def _reference(job: RowJob) -> RowResult:
    import torch

    from ..bundle.reader import Bundle
    from ..model.reference import ReferencePipeline
    from ..model.weights import load_weights
    from .measure import measure_reference
    from .quality import eval_set, reference_results

    bundle, plan = Bundle.open(job.bundle, verify=False), job.plan
    evalset = eval_set(bundle)
    # on a GPU, the published code's own dtypes and autocast (model/reference.py); on a CPU, fp32 as it runs there
    opener = lambda: ReferencePipeline(load_weights(bundle.config, bundle.path("torch"), torch.float32, plan.device),
                                       bundle.tokenizer(), gpu_precisions=plan.device.startswith("cuda"))
    measured, ref = measure_reference(opener, bundle.manifest["preprocess"]["size"], plan, evalset.volumes[:1])
    return RowResult(measured, reference_results(ref, evalset, plan.device))


def _pipeline(job: RowJob) -> RowResult:
    from ..bundle.reader import Bundle
    from ..runtime.pipeline import Pipeline
    from .measure import measure_pipeline
    from .quality import continuations, eval_set, pipeline_results

    plan = job.plan
    evalset = eval_set(Bundle.open(job.bundle, verify=False))
    opener = lambda: Pipeline.from_bundle(job.bundle, job.backend, plan.device, job.precision)
    if job.quality_only:
        pipe, measured = opener(), None
    else:
        measured, pipe = measure_pipeline(opener, plan, evalset.volumes[:1])
    conts = job.continuations
    if conts is None:  # the baseline: its own greedy continuations are every row's teacher-forced tokens
        conts = continuations(pipe, evalset)
    return RowResult(measured, pipeline_results(pipe, evalset, conts), conts)


def measure_row(job: RowJob) -> RowResult:
    """In the child: the row measured, or why not."""
    try:
        if job.plan.device.startswith("cuda"):
            import torch

            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows stay fp32
            torch.backends.cudnn.allow_tf32 = False
        return _reference(job) if job.backend is None else _pipeline(job)
    except MedblipError as e:  # a backend this machine lacks: the report says so, the run goes on
        return RowResult(skipped=str(e))
    except Exception as e:  # a broken row must not hide the others; the suite still fails at the end
        return RowResult(failed=f"{type(e).__name__}: {e}", where=traceback.format_exc(limit=-3))
    finally:
        gc.collect()


def run_isolated(job: RowJob) -> RowResult:
    """`measure_row(job)` in a fresh process (spawned: nothing inherited), which exits afterwards."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        try:
            return pool.submit(measure_row, job).result()
        except Exception as e:  # the child died (killed for memory, say): a failed row, with the cause
            return RowResult(failed=f"the row's process ended: {type(e).__name__}: {e}")

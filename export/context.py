"""What an export is asked to do (ExportOptions) and what every step is handed (ExportContext)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ExportOptions:
    out: Path
    preset: str | None = None
    checkpoint: Path | None = None
    llm_dir: Path | None = None
    precision: str = "fp32"  # vision graph: fp32 | int8 (CPU) | fp16 (adds a GPU graph)
    llm_quant: str = "none"
    trt: bool = False
    onnx: bool = True
    max_batch: int = 8
    min_batch: int = 1
    opt_batch: int = 1
    eval_cases: int | None = None  # None: the budget for the model's size (reference_eval.EvalBudget)
    near_ties: int = 2  # evaluation cases made to sit at a decision's edge (export/near_ties.py); none at paper size
    seed: int = 0
    # the tolerance quantized graphs must meet (export/tolerance.py; None: the format's default)
    max_kl: float | None = None
    min_top1: float | None = None
    min_labels: float | None = None
    max_fp32_share: float | None = None  # cap on the matmul weights kept at fp32 (None: tolerance.MAX_FP32_SHARE)
    max_int8_share: float | None = None  # cap on the weights a 4-bit graph raises to 8 bits (tolerance.MAX_INT8_SHARE)
    allow_out_of_tolerance: bool = False  # ship the closest mix (marked) instead of failing
    smooth: bool = True  # try SmoothQuant alphas before falling back (export/smooth.py)
    gptq: bool = True  # 4-bit: try GPTQ before falling back (export/gptq.py)
    llm_formats: Any = None  # programmatic only: a quantize.LlmQuant replacing --llm-quant's formats (benchmarks)
    conform: str | None = None  # the conform spec the model was trained with (qc/conform.py), into the manifest


@dataclass
class ExportContext:
    """Handed to every step (steps.py): the model in its stored dtypes, the fp32 reference to compare with, and the
    bundle being written."""

    model: Any  # model.medblip.MedBlip, weights as stored
    ref: Any  # export.reference_eval.ReferenceEval
    writer: Any  # bundle.writer.BundleWriter
    opts: ExportOptions
    work: Path  # scratch folder, removed after the export


@dataclass
class Artifact:
    """One artifact a step made and checked, its files already in the bundle's temporary folder: what the export
    registers in the manifest (BundleWriter.add), its parity figures and resources among the fields in `meta`."""

    name: str  # manifest key, a name from bundle/format.py
    main: str  # bundle-relative path of its main file (or folder)
    extra: dict | None = None  # role -> bundle-relative path of its other files
    meta: dict = field(default_factory=dict)


@dataclass
class StepResult:
    """What a step returns: the artifacts it made (possibly none) and a note for the user."""

    artifacts: list[Artifact] = field(default_factory=list)
    note: str | None = None

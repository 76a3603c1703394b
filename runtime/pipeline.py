"""Pipeline: a scan (NIfTI file or DICOM series) in, diagnosis (class probabilities) and/or a free-form answer out.

Stages: load + preprocess (nibabel / pydicom, bit-exact with the training loader), vision
(volume -> visual tokens), LLM (score the three answers in one batch; greedy
answer for free-form questions). Backends are picked in `factory.py` only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..bundle.reader import Bundle
from ..errors import ScanError
from ..model import calibration
from ..model.llm import family
from ..model.prompts import DIAGNOSIS_QUESTION
from ..model.tasks import Tasks
from ..preprocess import PreprocessSpec, load_scan, to_model_input
from ..preprocess.volume import as_scan
from ..qc.checks import assess
from ..qc.conform import conform
from ..qc.ood import ARTIFACT as OOD_ARTIFACT
from ..qc.ood import OodProfile
from ..qc.options import QcOptions
from .factory import make_backends
from .hugepages import HugePages, new_memory_on_huge_pages


@dataclass
class PreparedScan:
    """A scan ready for the model: volume [1,1,S,S,S] float32 plus what the output row reports about it."""

    name: str
    sha256: str
    volume: torch.Tensor
    warnings: list[str] = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)
    orientation: str = ""  # e.g. "LPS" (preprocess/loaded.py)
    series: str | None = None  # DICOM: short hash of the series UID
    qc: dict | None = None  # the input checks' block (qc/checks.py)
    conform: dict | None = None  # the conform step applied: QcOptions.row()


def elapsed_ms(t0: float, share: int = 1) -> float:
    """Wall time since `t0` (time.perf_counter) in ms, rounded to 1 us; divided among `share` scans of a batch."""
    return round((time.perf_counter() - t0) * 1000.0 / share, 3)


def read_scan(scan, spec: PreprocessSpec, sha256: str | None = None, may_preprocess=None,
              qc: QcOptions | None = None) -> PreparedScan | None:
    """Read + preprocess one scan for a bundle's preprocessing spec; raises ScanError on bad input.

    `scan`: a NIfTI path, a DICOM series folder or multi-frame file, or a scan object from
    preprocess.scans. Needs no model: cluster readers call it on nodes that hold none. `sha256`: the
    scan's digest if already known. `may_preprocess()`: asked after reading, before the torch
    preprocessing starts; False gives None (a cohort run's scan abandoned for its time limit).
    `qc`: the conform step to run before the published loader, and whether a failed input check is an error
    (ScanError qc_failed); default: no conform step, checks reported as warning codes.
    """
    qc = qc or QcOptions()
    source = as_scan(scan)
    t0 = time.perf_counter()
    loaded = load_scan(source)
    load_ms = elapsed_ms(t0)
    digest = sha256 or source.sha256()
    if may_preprocess is not None and not may_preprocess():
        return None
    t1 = time.perf_counter()
    array, geometry = conform(loaded.array, loaded.geometry, qc.conform)
    block, codes = assess(loaded, array, geometry, spec.size, qc.conform.active)
    if qc.strict and codes:
        raise ScanError(f"input checks failed (--strict-qc): {', '.join(codes)}", code="qc_failed")
    volume = to_model_input(array, spec.size)  # [1,1,S,S,S]
    del array
    return PreparedScan(source.name, digest, volume, list(loaded.warnings) + codes,
                        {"load": load_ms, "preprocess": elapsed_ms(t1)}, loaded.orientation, loaded.series,
                        block, qc.row())


class Pipeline:
    """`Pipeline.from_bundle(dir)(scan)` -> one result dict (the JSON row of `medblip-infer`)."""

    def __init__(self, bundle: Bundle, vision, llm, chosen: dict, huge_pages: HugePages | None = None,
                 qc: QcOptions | None = None):
        self.bundle, self.vision, self.llm, self.chosen = bundle, vision, llm, chosen
        self.huge_pages = huge_pages or HugePages(skipped="not requested")
        self.tokenizer = bundle.tokenizer()
        self.tasks = Tasks(family(bundle.config.variant), self.tokenizer, bundle.manifest["generation"]["max_new_tokens"])
        self.spec = PreprocessSpec(**bundle.manifest["preprocess"])
        self.qc = qc or QcOptions.for_bundle(bundle.manifest)
        self.ood = OodProfile.load(bundle.path(OOD_ARTIFACT)) if bundle.has(OOD_ARTIFACT) else None
        self.calibration = bundle.manifest.get("calibration")  # medblip-eval --write-calibrated; applied per row
        self.decision_detail = False  # rows also carry answer_tokens + greedy_answer (medblip-infer --decision-detail)

    @classmethod
    def from_bundle(cls, path, backend: str = "auto", device: str = "cpu", precision: str | None = None,
                    verify: bool = True, threads: int | None = None, rebuild_trt: bool = False,
                    huge_pages: bool = True, conform: str | None = None, strict_qc: bool = False) -> "Pipeline":
        """Open + verify a bundle and pick backends (`auto`: TensorRT > ONNX Runtime > PyTorch, as available).

        rebuild_trt: if the bundle's TensorRT engine cannot run here (another GPU or TensorRT version, or
        none shipped), build one for this machine into a cache folder instead of falling back.
        huge_pages: on CPU, move the weights just loaded onto 2 MiB pages (see hugepages.py; decode steps
        stream them faster). `pipe.huge_pages` says what was moved, or why nothing was.
        conform: a conform spec (`iso1mm`, `iso1mm,LIA`, `none`) instead of the one the bundle records (qc/).
        strict_qc: a scan failing an input check (or out of distribution) gets an error row, code qc_failed.
        """
        bundle = Bundle.open(path, verify=verify)
        qc = QcOptions.for_bundle(bundle.manifest, conform, strict_qc)
        skip = None if huge_pages else "turned off"
        if device != "cpu":
            skip = f"weights on {device}, not in host memory"
        with new_memory_on_huge_pages(skip) as moved:
            vision, llm, chosen = make_backends(bundle, backend, device, precision, threads, rebuild_trt)
        return cls(bundle, vision, llm, chosen, moved, qc)

    # -- stages ---------------------------------------------------------------

    def prepare(self, scan, sha256: str | None = None, may_preprocess=None) -> PreparedScan | None:
        """Read + preprocess one scan; raises ScanError on bad input (see `read_scan`)."""
        return read_scan(scan, self.spec, sha256, may_preprocess, self.qc)

    def visual_tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """volumes [B,1,S,S,S] -> visual tokens [B, Q, d_llm]."""
        return self.vision.run(volumes)

    def classify(self, visual: torch.Tensor, patient_text: str = "") -> dict:
        """visual [1,Q,d] -> {label, probabilities, answer, log_likelihoods}, and `calibrated` {calibration, label,
        probabilities} when the bundle carries a calibration."""
        row = self.tasks.diagnose(self.llm, visual, patient_text)
        if self.calibration is not None:
            row["calibrated"] = calibration.apply(self.calibration, row["log_likelihoods"], self.tasks.answer_tokens)
        return row

    def ask(self, visual: torch.Tensor, patient_text: str = "", question: str = DIAGNOSIS_QUESTION,
            max_new_tokens: int | None = None) -> str:
        """visual [1,Q,d] -> greedy free-form answer text."""
        return self.tasks.ask(self.llm, visual, patient_text, question, max_new_tokens)

    # -- one scan end to end ----------------------------------------------------

    def answer(self, prepared: PreparedScan, visual: torch.Tensor, patient_text: str = "",
               question: str | None = None) -> dict:
        """The result row for a prepared scan whose visual tokens [1,Q,d] are computed. With --strict-qc, a scan out
        of distribution raises ScanError (qc_failed)."""
        t0 = time.perf_counter()
        row = self.classify(visual, patient_text)
        if self.decision_detail:
            row.update(self.tasks.decision_detail(self.llm, visual, patient_text))
        if question is not None:
            row["answer"] = self.ask(visual, patient_text, question)
        timings = dict(prepared.timings_ms, llm=elapsed_ms(t0))
        series = {"series": prepared.series} if prepared.series else {}
        warnings, ood = list(prepared.warnings), {}
        if self.ood is not None:
            ood["ood"], far = self.ood.score(visual)
            if far:
                warnings.append("out_of_distribution")
                if self.qc.strict:
                    raise ScanError("input checks failed (--strict-qc): out_of_distribution", code="qc_failed")
        return {"scan": prepared.name, "scan_sha256": prepared.sha256, **series, "orientation": prepared.orientation,
                **row,
                "question": question or DIAGNOSIS_QUESTION, "task": "ask" if question is not None else "classify",
                "backend": self.chosen, "precision": self.precision,
                "random_weights": self.bundle.random_weights, "timings_ms": timings,
                "warnings": warnings, "conform": prepared.conform or self.qc.row(), "qc": prepared.qc, **ood}

    @property
    def precision(self) -> dict:
        return {"vision": self.vision.precision, "llm": self.llm.precision}

    def __call__(self, scan, patient_text: str = "", question: str | None = None) -> dict:
        t0 = time.perf_counter()
        prepared = self.prepare(scan)
        t1 = time.perf_counter()
        visual = self.visual_tokens(prepared.volume)
        prepared.timings_ms["vision"] = elapsed_ms(t1)
        row = self.answer(prepared, visual, patient_text, question)
        row["timings_ms"]["total"] = elapsed_ms(t0)
        return row

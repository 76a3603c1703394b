"""Quality next to speed: each row's diagnoses on the evaluation volumes, compared with the fp32 torch backend."""

from __future__ import annotations

import numpy as np
import torch

from ..export.evalset import eval_volumes
from ..model.prompts import ANSWERS, LABELS
from ..runtime.tasks import diagnosis


def eval_cases(manifest: dict) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """The bundle's evaluation set: volumes [n,1,S,S,S] (regenerated, seed 1234) and (volume index, patient text)."""
    cases = [(int(c["volume"]), c["patient_text"]) for c in manifest["evaluation"]["cases"]]
    n = max(i for i, _ in cases) + 1
    return eval_volumes(n, manifest["preprocess"]["size"]), cases


def _as_arrays(rows: list[dict]) -> dict:
    return {"labels": [r["label"] for r in rows],
            "probabilities": np.array([[r["probabilities"][k] for k in LABELS] for r in rows]),
            "log_likelihoods": np.array([[r["log_likelihoods"][k] for k in LABELS] for r in rows])}


@torch.inference_mode()
def pipeline_results(pipe, volumes: torch.Tensor, cases) -> dict:
    """Pipeline verbs (vision at batch 1, classify) over every case -> labels, probabilities [n,3], log-liks [n,3]."""
    visual = {i: pipe.visual_tokens(volumes[i:i + 1]) for i in sorted({i for i, _ in cases})}
    return _as_arrays([pipe.classify(visual[i], text) for i, text in cases])


@torch.no_grad()
def reference_results(ref, volumes: torch.Tensor, cases) -> dict:
    """The reference's diagnoses over every case: its one-pass-per-answer log-likelihoods, which decide
    diagnose()'s label and probabilities (its generated text does not, so generate is not rerun here)."""
    rows = []
    visual = {i: ref.model.visual_tokens(volumes[i:i + 1]) for i in sorted({i for i, _ in cases})}
    for i, text in cases:
        rows.append(diagnosis([ref.answer_loglik(visual[i], text, ANSWERS[k]) for k in LABELS]))
    return _as_arrays(rows)


def agreement(results: dict, baseline: dict, vs: str) -> dict:
    """Label agreement and max |prob| / |log-likelihood| differences of `results` against `baseline`."""
    labels = [a == b for a, b in zip(results["labels"], baseline["labels"])]
    return {"vs": vs, "cases": len(labels), "label_agreement": float(np.mean(labels)),
            "max_abs_prob_diff": float(np.abs(results["probabilities"] - baseline["probabilities"]).max()),
            "max_abs_loglik_diff": float(np.abs(results["log_likelihoods"] - baseline["log_likelihoods"]).max())}


def manifest_agreement(results: dict, manifest: dict) -> dict:
    """The torch fp32 results against the figures the export recorded (a check that the baseline is the bundle's)."""
    cases = manifest["evaluation"]["cases"]
    probs = np.array([[c["probabilities"][k] for k in LABELS] for c in cases])
    same = [a == c["label"] for a, c in zip(results["labels"], cases)]
    return {"label_agreement": float(np.mean(same)),
            "max_abs_prob_diff": float(np.abs(results["probabilities"] - probs).max())}

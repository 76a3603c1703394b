"""A bundle's calibration of the diagnosis: a per-class bias and one temperature over the three answers' scores.

    p = softmax((score + bias) / temperature)

`score` is the answers' summed log-likelihoods (rule `sum`, the default decision) or their per-token mean
(rule `mean`), see model/scoring.py. The calibration is fitted by `medblip-eval --calibrate` (validation/
calibrate.py) and stored in a bundle's manifest under `calibration`; the runtime applies it to every diagnosis
and names it in the row. This module only applies it: it imports nothing beyond numpy and the scoring core.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from .prompts import LABELS
from .scoring import answer_scores, softmax

METHOD = "per-class bias + temperature"


def params_digest(params: dict) -> str:
    """SHA-256 of the calibration's canonical JSON, its `sha256` key left out: what names it in rows."""
    body = {k: v for k, v in params.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def calibration_name(params: dict) -> str:
    """The short name every row carries, e.g. `bias+temperature:sum:3f2a91c07b1d`."""
    return f"bias+temperature:{params['rule']}:{params['sha256'][:12]}"


def calibrated_probabilities(scores, temperature: float, bias) -> np.ndarray:
    """[..., 3] scores -> [..., 3] calibrated probabilities (bias in LABELS order)."""
    return softmax((np.asarray(scores, np.float64) + np.asarray(bias, np.float64)) / float(temperature))


def apply(params: dict, loglik: dict, n_tokens: dict) -> dict:
    """One diagnosis' per-answer log-likelihoods and token counts (keyed AD, MCI, NC) -> the calibrated
    {calibration, label, probabilities}."""
    ll = [loglik[k] for k in LABELS]
    n = [n_tokens[k] for k in LABELS]
    p = calibrated_probabilities(answer_scores(ll, n, params["rule"]), params["temperature"],
                                 [params["bias"][k] for k in LABELS])
    return {"calibration": calibration_name(params), "label": LABELS[int(np.argmax(p))],
            "probabilities": {k: float(v) for k, v in zip(LABELS, p)}}

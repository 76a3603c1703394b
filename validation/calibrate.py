"""The calibrated rule: p = softmax((score + bias) / temperature), fitted by maximum likelihood on a stratified
calibration split of the cohort; its figures are reported on the held-out rest only.

Fitted as logits = a * score + c (a = 1/temperature > 0, c = bias/temperature, c_NC = 0 since a softmax ignores a
shared shift): a convex negative log-likelihood, minimised with L-BFGS-B and its exact gradient.
"""

from __future__ import annotations

import numpy as np

from ..errors import MedblipError
from ..model.calibration import METHOD, params_digest
from ..model.prompts import LABELS
from ..model.scoring import log_softmax

MAX_INVERSE_TEMPERATURE = 1e3  # a perfectly separated split would push 1/T to infinity


def split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split -> (calibration indices, held-out indices), both sorted; each class split by `fraction`."""
    if not 0 < fraction < 1:
        raise MedblipError(f"--calibrate {fraction:g}: give a fraction between 0 and 1, e.g. 0.3", code="usage")
    rng = np.random.default_rng(seed)
    cal, held = [], []
    for k in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == k))
        m = int(round(fraction * len(members)))
        if len(members) >= 2:
            m = min(max(m, 1), len(members) - 1)
        cal.extend(members[:m])
        held.extend(members[m:])
    if not cal or not held:
        raise MedblipError(f"--calibrate {fraction:g} leaves an empty calibration or held-out part of "
                           f"{len(y)} scans", code="usage")
    return np.sort(np.array(cal, np.int64)), np.sort(np.array(held, np.int64))


def fit(scores: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, float]:
    """scores [n, 3], y [n] -> (temperature, bias [3] with bias_NC = 0, mean negative log-likelihood)."""
    from scipy.optimize import minimize

    s = np.asarray(scores, np.float64)
    s = s - s.mean(1, keepdims=True)  # a shared shift per scan changes no softmax; centring keeps the sums small
    onehot = np.eye(3)[y]

    def nll(theta):
        a, c = theta[0], np.array([theta[1], theta[2], 0.0])
        lp = log_softmax(a * s + c)
        g = np.exp(lp) - onehot  # d nll / d logits, per scan
        return -(lp * onehot).sum(1).mean(), np.array([(g * s).sum(1).mean(), g[:, 0].mean(), g[:, 1].mean()])

    res = minimize(nll, np.array([1.0, 0.0, 0.0]), jac=True, method="L-BFGS-B",
                   bounds=[(1e-6, MAX_INVERSE_TEMPERATURE), (None, None), (None, None)])
    a = float(res.x[0])
    bias = np.array([res.x[1], res.x[2], 0.0]) / a
    return 1.0 / a, bias, float(res.fun)


def calibration_params(scores: np.ndarray, y: np.ndarray, rule: str, fitted_on: dict) -> dict:
    """Fit and describe a calibration as a bundle manifest stores it (its `sha256` names it in rows)."""
    temperature, bias, nll = fit(scores, y)
    params = {"method": METHOD, "rule": rule, "temperature": temperature,
              "bias": {k: float(b) for k, b in zip(LABELS, bias)}, "fit_nll": nll, "fitted_on": fitted_on}
    params["sha256"] = params_digest(params)
    return params

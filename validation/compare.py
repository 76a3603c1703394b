"""Paired comparison of a candidate bundle with the reference (the first --bundle) on the same scans.

Label agreement; the differences candidate - reference in balanced accuracy and macro AUC with paired stratified
bootstrap intervals (one set of replicate indices for both); McNemar's exact test on correctness (the two-sided
binomial test on the discordant pairs); per-scan probability differences; and the verdict: non-inferior when the
lower end of the 95 % interval of the balanced-accuracy difference lies above -margin.
"""

from __future__ import annotations

import numpy as np

from . import bootstrap, metrics

DEFAULT_MARGIN = 0.02
NON_INFERIOR, NOT_SHOWN = "non-inferior", "not shown non-inferior"


def mcnemar(correct_ref: np.ndarray, correct_cand: np.ndarray) -> dict:
    """Exact McNemar test: discordant pairs b (only the reference right) and c (only the candidate right)."""
    from scipy.stats import binomtest

    b = int((correct_ref & ~correct_cand).sum())
    c = int((~correct_ref & correct_cand).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"ref_only_correct": b, "candidate_only_correct": c, "p_value": p, "test": "exact binomial (two-sided)"}


def _delta(y, pred_r, prob_r, pred_c, prob_c) -> dict[str, np.ndarray]:
    ref = metrics.decision_figures(y, pred_r)
    cand = metrics.decision_figures(y, pred_c)
    out = {"delta_balanced_accuracy": cand["balanced_accuracy"] - ref["balanced_accuracy"]}
    if prob_r is not None and prob_c is not None:
        out["delta_macro_auc"] = metrics.auc_per_class(y, prob_c).mean(1) - metrics.auc_per_class(y, prob_r).mean(1)
    return out


def paired(y, pred_ref, prob_ref, pred_cand, prob_cand, replicates: int = bootstrap.DEFAULT_REPLICATES,
           seed: int = bootstrap.DEFAULT_SEED, margin: float = DEFAULT_MARGIN) -> dict:
    """Everything the report says about a candidate against the reference (same scans, same order)."""
    y = np.asarray(y)
    point = {k: float(v[0]) for k, v in _delta(y[None], pred_ref[None], None if prob_ref is None else prob_ref[None],
                                               pred_cand[None], None if prob_cand is None else prob_cand[None]).items()}
    idx = bootstrap.stratified_indices(y, replicates, np.random.default_rng(seed))
    reps = bootstrap.replicate_figures(_delta, idx, y, pred_ref, prob_ref, pred_cand, prob_cand)
    out = {"n": int(len(y)), "label_agreement": float((pred_ref == pred_cand).mean()),
           **bootstrap.with_intervals(point, reps),
           "mcnemar": mcnemar(pred_ref == y, pred_cand == y)}
    if prob_ref is not None and prob_cand is not None:
        diff = np.abs(np.asarray(prob_cand) - np.asarray(prob_ref)).max(1)
        out["prob_abs_diff"] = {"mean": float(diff.mean()), "p95": float(np.percentile(diff, 95)),
                                "max": float(diff.max())}
    lo = out["delta_balanced_accuracy"]["ci_low"]
    out["margin"] = margin
    out["verdict"] = NON_INFERIOR if lo is not None and lo > -margin else NOT_SHOWN
    return out


def per_scan_prob_diff(prob_ref, prob_cand) -> np.ndarray:
    """[n] largest absolute class-probability difference per scan."""
    return np.abs(np.asarray(prob_cand) - np.asarray(prob_ref)).max(1)

"""Figures of one bundle's rows: every decision rule with bootstrap intervals, subgroups, and the calibration."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..model.prompts import LABELS
from ..model.scoring import answer_scores
from . import bootstrap, calibrate, metrics
from .rules import PRIMARY, CalibratedRule, Decisions, RowData, Unavailable, standard_rules


def nest(figures: dict[str, dict]) -> dict:
    """Flat `name/AD` figures -> {name: ..., "per_class": {"AD": {name: ...}}}."""
    out, per_class = {}, {label: {} for label in LABELS}
    for name, fig in figures.items():
        base, _, label = name.partition("/")
        if label:
            per_class[label][base] = fig
        else:
            out[name] = fig
    out["per_class"] = per_class
    return out


def rule_figures(y: np.ndarray, dec: Decisions, replicates: int, seed: int) -> dict:
    """One rule on one set of scans: figures with intervals, confusion matrix, reliability bins."""
    point = metrics.sklearn_figures(y, dec.pred, dec.prob)
    idx = bootstrap.stratified_indices(y, replicates, np.random.default_rng(seed))
    reps = bootstrap.replicate_figures(metrics.all_figures, idx, y, dec.pred, dec.prob)
    out = {"n": int(len(y)), "figures": nest(bootstrap.with_intervals(point, reps)),
           "confusion_matrix": metrics.confusion_matrix(y, dec.pred)}
    if dec.prob is not None:
        out["reliability"] = metrics.reliability(y, dec.prob)
    return out


def split_digest(scans: list[dict], labels: list[str]) -> str:
    """SHA-256 naming the calibration split: its scans' SHA-256 digests and labels, in cohort order."""
    body = [[r.get("scan_sha256"), lab] for r, lab in zip(scans, labels)]
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


class BundleEvaluation:
    """One bundle's rows against the cohort's labels: `ok` scans evaluated, failed ones listed."""

    def __init__(self, rows: list[dict], y: np.ndarray, answer_tokens: dict):
        self.rows, self.y_all = rows, y
        self.ok = np.array(["error" not in r for r in rows], bool)
        self.data = RowData.from_rows([r for r, ok in zip(rows, self.ok) if ok], answer_tokens)
        self.y = y[self.ok]
        self.decisions: dict[str, Decisions] = {}

    def rules(self, replicates: int, seed: int) -> dict:
        out = {}
        for rule in standard_rules():
            try:
                dec = rule.decide(self.data)
            except Unavailable as e:
                out[rule.name] = {"title": rule.title, "unavailable": str(e)}
                continue
            self.decisions[rule.name] = dec
            out[rule.name] = {"title": rule.title, "subset": "all evaluated scans",
                              **rule_figures(self.y, dec, replicates, seed)}
        return out

    def calibrated(self, cal_mask_all: np.ndarray, fitted_on: dict, replicates: int, seed: int) -> tuple[dict, dict]:
        """Fit on this bundle's evaluated scans in the calibration split, report on the held-out rest ->
        (rule result, calibration params)."""
        cal = cal_mask_all[self.ok]
        scores = answer_scores(self.data.loglik, self.data.n_tokens, PRIMARY)
        ok_rows = [r for r, ok in zip(self.rows, self.ok) if ok]
        fitted_on = {**fitted_on, "scans": int(cal.sum()),
                     "split_sha256": split_digest([r for r, c in zip(ok_rows, cal) if c],
                                                  [LABELS[k] for k in self.y[cal]])}
        params = calibrate.calibration_params(scores[cal], self.y[cal], PRIMARY, fitted_on)
        dec = CalibratedRule(params).decide(self.data)
        held = ~cal
        held_dec = Decisions(dec.pred[held], dec.prob[held])
        result = {"title": CalibratedRule.title, "subset": f"held-out scans ({int(held.sum())}; fitted on the other "
                  f"{int(cal.sum())})", **rule_figures(self.y[held], held_dec, replicates, seed)}
        raw = self.decisions.get(PRIMARY)
        if raw is not None:  # the uncalibrated rule on the same held-out scans, for a like-for-like view
            same = metrics.sklearn_figures(self.y[held], raw.pred[held], raw.prob[held])
            result["sum_rule_on_same_scans"] = {k: same[k] for k in ("balanced_accuracy", "macro_auc", "log_loss",
                                                                     "brier", "ece")}
        result["calibration"] = {k: params[k] for k in ("method", "rule", "temperature", "bias", "sha256")}
        self.decisions["calibrated"] = dec
        return result, params

    def subgroups(self, groups: list[dict], columns: list[str], replicates: int, seed: int, min_size: int) -> dict:
        """The primary rule's figures per value of each --group-by column (evaluated scans only)."""
        dec = self.decisions.get(PRIMARY)
        if dec is None or not columns:
            return {}
        values = [g for g, ok in zip(groups, self.ok) if ok]
        out = {}
        for col in columns:
            out[col] = {}
            for value in sorted({v[col] for v in values}):
                sel = np.array([v[col] == value for v in values])
                entry = rule_figures(self.y[sel], Decisions(dec.pred[sel], dec.prob[sel]), replicates, seed)
                del entry["reliability"]
                if sel.sum() < min_size:
                    entry["warning"] = f"only {int(sel.sum())} scans (< {min_size}): wide intervals, read with care"
                present = {LABELS[k] for k in np.unique(self.y[sel])}
                if len(present) < 3:
                    entry.setdefault("warning", "")
                    entry["warning"] = (entry["warning"] + "; " if entry["warning"] else "") + \
                        f"classes absent: {', '.join(sorted(set(LABELS) - present))} (some figures undefined)"
                out[col][value or "(empty)"] = entry
        return out

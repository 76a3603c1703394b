"""Diagnostic figures of one decision rule on one cohort: the point estimates with scikit-learn, the same figures
vectorised over bootstrap replicates with numpy (tests/test_eval_metrics.py holds the two equal).

Conventions (AD, MCI, NC are classes 0, 1, 2; a prediction of -1 is "no decision", the published rule's
answer that matched none of the three strings):
- accuracy, sensitivity and balanced accuracy count "no decision" as wrong; it is never a positive call, so it
  adds to a class's false negatives and to the other classes' true negatives;
- quadratic-weighted Cohen's kappa uses the ordinal order NC < MCI < AD over the scans with a decision;
- the confusion matrix has rows = truth, columns = prediction in AD, MCI, NC order, plus a no-decision count
  per true class;
- probability figures (AUC, Brier, log-loss, ECE) need a rule with probabilities: macro one-vs-rest ROC AUC,
  the multi-class Brier score (sum over the classes, not halved), log-loss, and the top-label expected
  calibration error over 15 equal-width confidence bins (bin b holds confidences in (b/15, (b+1)/15], the
  first bin includes 0).
A figure that is undefined (a class never predicted has no PPV; a class absent has no AUC) is NaN, written null.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata

from ..model.prompts import LABELS

K = len(LABELS)
ECE_BINS = 15
CLASS_FIGURES = ("sensitivity", "specificity", "ppv", "npv", "f1")
DECISION_FIGURES = ("accuracy", "balanced_accuracy", "kappa_quadratic", "no_decision_rate")
PROB_FIGURES = ("macro_auc", "brier", "log_loss", "ece")


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


# ------------------------------------------------------------------ vectorised over replicates [B, n]


def confusion(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """y, pred [B, n] (pred -1 = no decision) -> [B, K, K+1] counts: rows truth, columns prediction, last no decision."""
    y, pred = np.atleast_2d(y), np.atleast_2d(pred)
    b = y.shape[0]
    col = np.where(pred < 0, K, pred)
    flat = (np.arange(b)[:, None] * K + y) * (K + 1) + col
    return np.bincount(flat.ravel(), minlength=b * K * (K + 1)).reshape(b, K, K + 1)


def decision_figures(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Figures of the decisions: name -> [B] (per-class figures as `name/AD` etc.)."""
    cm = confusion(y, pred).astype(np.float64)
    n = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm[:, :, :K], axis1=1, axis2=2)  # [B, K]
    support = cm.sum(axis=2)  # true per class
    called = cm[:, :, :K].sum(axis=1)  # predicted per class
    fn, fp = support - tp, called - tp
    tn = n[:, None] - tp - fn - fp
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    ppv, npv = _div(tp, tp + fp), _div(tn, tn + fn)
    f1 = _div(2 * tp, 2 * tp + fp + fn)
    out = {"accuracy": tp.sum(1) / n, "balanced_accuracy": np.nanmean(np.where(support > 0, sens, np.nan), axis=1),
           "no_decision_rate": cm[:, :, K].sum(1) / n, "kappa_quadratic": _qwk(cm[:, :, :K])}
    for name, arr in zip(CLASS_FIGURES, (sens, spec, ppv, npv, f1)):
        for k, label in enumerate(LABELS):
            out[f"{name}/{label}"] = arr[:, k]
    return out


def _qwk(cm: np.ndarray) -> np.ndarray:
    """[B, K, K] confusion counts (decided scans) -> quadratic-weighted kappa [B]; the weights (i-j)^2 are the same
    in AD, MCI, NC order as in NC < MCI < AD order."""
    n = cm.sum(axis=(1, 2))
    i = np.arange(K)
    w = (i[:, None] - i[None, :]) ** 2 / (K - 1) ** 2
    expected = cm.sum(2)[:, :, None] * cm.sum(1)[:, None, :] / np.where(n > 0, n, 1)[:, None, None]
    return 1.0 - _div((w * cm).sum(axis=(1, 2)), (w * expected).sum(axis=(1, 2)))


def auc_per_class(y: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """y [B, n], prob [B, n, K] -> one-vs-rest ROC AUC per class [B, K] (Mann-Whitney with mid-ranks for ties)."""
    y, prob = np.atleast_2d(y), prob.reshape((-1,) + prob.shape[-2:])
    out = np.empty(y.shape[:1] + (K,))
    for k in range(K):
        pos = y == k
        n_pos = pos.sum(1)
        n_neg = y.shape[1] - n_pos
        ranks = rankdata(prob[:, :, k], axis=1)
        u = (ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2
        out[:, k] = _div(u, n_pos * n_neg)
    return out


def probability_figures(y: np.ndarray, prob: np.ndarray) -> dict[str, np.ndarray]:
    """Figures of the probabilities: name -> [B]."""
    y, prob = np.atleast_2d(y), prob.reshape((-1,) + prob.shape[-2:])
    onehot = np.eye(K)[y]
    auc = auc_per_class(y, prob)
    eps = np.finfo(prob.dtype).eps
    p_true = np.clip(np.take_along_axis(prob / prob.sum(-1, keepdims=True), y[..., None], -1)[..., 0], eps, 1 - eps)
    out = {"macro_auc": auc.mean(1), "brier": ((prob - onehot) ** 2).sum(-1).mean(1),
           "log_loss": -np.log(p_true).mean(1), "ece": ece(y, prob)}
    for k, label in enumerate(LABELS):
        out[f"auc/{label}"] = auc[:, k]
    return out


def ece_bins(conf: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Top-label confidences -> bin index 0..bins-1 (bin b: (b/bins, (b+1)/bins], 0 in the first)."""
    return np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)


def ece(y: np.ndarray, prob: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Top-label expected calibration error [B]: sum over bins of |accuracy - mean confidence| x share of scans."""
    y, prob = np.atleast_2d(y), prob.reshape((-1,) + prob.shape[-2:])
    conf = prob.max(-1)
    correct = (prob.argmax(-1) == y).astype(np.float64)
    b_idx = ece_bins(conf, bins) + bins * np.arange(y.shape[0])[:, None]
    size = np.bincount(b_idx.ravel(), minlength=bins * y.shape[0]).reshape(-1, bins)
    acc = np.bincount(b_idx.ravel(), correct.ravel(), minlength=size.size).reshape(-1, bins)
    cf = np.bincount(b_idx.ravel(), conf.ravel(), minlength=size.size).reshape(-1, bins)
    return np.abs(acc - cf).sum(1) / y.shape[1]


def all_figures(y, pred, prob=None) -> dict[str, np.ndarray]:
    """Every figure, vectorised: [B, n] inputs -> name -> [B]."""
    out = decision_figures(y, pred)
    if prob is not None:
        out.update(probability_figures(y, prob))
    return out


# ------------------------------------------------------------------ point estimates (scikit-learn)


def sklearn_figures(y: np.ndarray, pred: np.ndarray, prob: np.ndarray | None = None) -> dict[str, float]:
    """The same figures for one cohort, each computed by scikit-learn where it has it (ECE: numpy, above)."""
    from sklearn import metrics as skm

    y, pred = np.asarray(y), np.asarray(pred)
    labels = list(range(K))
    decided = pred >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined figures come back as NaN, said in the report
        out = {"accuracy": skm.accuracy_score(y, pred),
               "balanced_accuracy": skm.recall_score(y, pred, labels=[k for k in labels if (y == k).any()],
                                                     average="macro", zero_division=np.nan),
               "no_decision_rate": float((~decided).mean()),
               "kappa_quadratic": (skm.cohen_kappa_score(2 - y[decided], 2 - pred[decided], weights="quadratic",
                                                         labels=[0, 1, 2]) if decided.sum() > 1 else np.nan)}
        sens = skm.recall_score(y, pred, labels=labels, average=None, zero_division=np.nan)
        ppv = skm.precision_score(y, pred, labels=labels, average=None, zero_division=np.nan)
        f1 = skm.f1_score(y, pred, labels=labels, average=None, zero_division=np.nan)
        mcm = skm.multilabel_confusion_matrix(y, pred, labels=labels)  # [K, 2, 2]: [[tn, fp], [fn, tp]]
        spec = _div(mcm[:, 0, 0], mcm[:, 0, 0] + mcm[:, 0, 1])
        npv = _div(mcm[:, 0, 0], mcm[:, 0, 0] + mcm[:, 1, 0])
        for name, arr in zip(CLASS_FIGURES, (sens, spec, ppv, npv, f1)):
            for k, label in enumerate(LABELS):
                out[f"{name}/{label}"] = float(arr[k])
        if prob is not None:
            prob = np.asarray(prob, np.float64)
            present = [k for k in labels if (y == k).any()]
            for k, label in enumerate(LABELS):
                out[f"auc/{label}"] = (skm.roc_auc_score(y == k, prob[:, k]) if 0 < (y == k).sum() < len(y)
                                       else np.nan)
            out["macro_auc"] = (skm.roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=labels)
                                if len(present) == K else np.nan)
            out["brier"] = skm.brier_score_loss(y, prob, labels=labels, scale_by_half=False)
            out["log_loss"] = skm.log_loss(y, prob, labels=labels)
            out["ece"] = float(ece(y[None], prob[None])[0])
    return {k: float(v) for k, v in out.items()}


def confusion_matrix(y, pred) -> dict:
    """{"labels", "matrix" (rows truth, columns prediction, AD, MCI, NC order), "no_decision" per true class}
    with scikit-learn's confusion_matrix."""
    from sklearn.metrics import confusion_matrix as skcm

    y, pred = np.asarray(y), np.asarray(pred)
    m = skcm(y, pred, labels=list(range(K)))
    nd = [int(((y == k) & (pred < 0)).sum()) for k in range(K)]
    return {"labels": list(LABELS), "matrix": m.tolist(), "no_decision": nd}


def roc_curves(y, prob) -> dict:
    """One-vs-rest ROC curve per class (scikit-learn): label -> {"fpr", "tpr"} (absent class: skipped)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y)
    out = {}
    for k, label in enumerate(LABELS):
        if 0 < (y == k).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == k, np.asarray(prob)[:, k])
            out[label] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def reliability(y, prob, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin with scans: {lo, hi, n, confidence (mean), accuracy} (the reliability diagram)."""
    y, prob = np.asarray(y), np.asarray(prob)
    conf, correct = prob.max(1), prob.argmax(1) == y
    idx = ece_bins(conf, bins)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(sel.sum()),
                        "confidence": float(conf[sel].mean()), "accuracy": float(correct[sel].mean())})
    return out

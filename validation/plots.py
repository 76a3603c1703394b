"""The report's PNG plots, drawn with matplotlib's Agg canvas (no display, no pyplot state): PNG bytes out."""

from __future__ import annotations

import io

import numpy as np

from ..model.prompts import LABELS


def _figure(w: float = 4.2, h: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def confusion_png(cm: dict, title: str) -> bytes:
    m = np.asarray(cm["matrix"])
    nd = np.asarray(cm["no_decision"])
    cols = list(LABELS) + (["none"] if nd.any() else [])
    full = np.concatenate([m, nd[:, None]], 1) if nd.any() else m
    fig = _figure()
    ax = fig.add_subplot()
    ax.imshow(full, cmap="Blues")
    for i in range(full.shape[0]):
        for j in range(full.shape[1]):
            ax.text(j, i, str(full[i, j]), ha="center", va="center",
                    color="white" if full[i, j] > full.max() / 2 else "black")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def roc_png(y: np.ndarray, prob: np.ndarray, aucs: dict, title: str) -> bytes:
    from sklearn.metrics import roc_curve

    fig = _figure()
    ax = fig.add_subplot()
    for k, label in enumerate(LABELS):
        if 0 < (y == k).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == k, prob[:, k])
            auc = aucs.get(label)
            ax.plot(fpr, tpr, label=f"{label} vs rest" + (f" (AUC {auc:.3f})" if auc is not None else ""))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def reliability_png(bins: list[dict], ece: float | None, title: str) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="perfect calibration")
    if bins:
        mids = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.bar(mids, [b["accuracy"] for b in bins], width=1 / 15 * 0.9, alpha=0.6, label="accuracy per bin")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", ms=3, color="black",
                label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-label confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title + (f"  (ECE {ece:.3f})" if ece is not None else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def diff_png(diffs: np.ndarray, title: str) -> bytes:
    fig = _figure(4.2, 3.0)
    ax = fig.add_subplot()
    ax.hist(diffs, bins=30, color="tab:orange")
    ax.set_xlabel("largest class-probability difference per scan")
    ax.set_ylabel("scans")
    ax.set_title(title, fontsize=9)
    return _png(fig)

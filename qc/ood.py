"""The out-of-distribution profile: how far a scan's visual tokens lie from those of a trusted reference cohort.

Features: the mean of a scan's visual tokens (the Q-Former's 32 outputs after the projection, [d_llm]), in
float64. The profile holds their mean and a shrinkage estimate of their covariance (scikit-learn's
Ledoit-Wolf), and the distribution of the reference scans' own Mahalanobis distances, each computed by a
profile fitted without that scan's fold (k-fold cross-fitting: in-sample distances would be too small).
A scan's `ood` is its distance and the percentile of that distance among the reference ones; above the
reference's 99th percentile it is flagged `out_of_distribution`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedblipError

ARTIFACT = "ood_profile"  # manifest artifact name
FILE = "ood/profile.npz"  # bundle-relative
FEATURES = "mean of the visual tokens"
THRESHOLD_PERCENTILE = 99.0
MIN_SCANS = 10
FOLDS = 5


def pooled(visual) -> np.ndarray:
    """Visual tokens [B, Q, d] (torch or numpy) -> features [B, d] float64."""
    arr = visual.detach().float().cpu().numpy() if hasattr(visual, "detach") else np.asarray(visual)
    return arr.astype(np.float64).mean(axis=1)


def _fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(store_precision=True, assume_centered=False).fit(x)
    return lw.location_, lw.precision_, float(lw.shrinkage_)


def _distances(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = x - mean
    return np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", d, precision, d), 0.0))


@dataclass
class OodProfile:
    mean: np.ndarray  # [d]
    precision: np.ndarray  # [d, d]
    reference: np.ndarray  # the reference scans' cross-fitted distances, sorted
    shrinkage: float

    @property
    def threshold(self) -> float:
        return float(np.percentile(self.reference, THRESHOLD_PERCENTILE))

    @classmethod
    def fit(cls, features: np.ndarray, folds: int = FOLDS, seed: int = 0) -> "OodProfile":
        """features [n, d] of a trusted cohort -> the profile (n >= MIN_SCANS)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < MIN_SCANS:
            raise MedblipError(f"an OOD profile needs at least {MIN_SCANS} scans that read without error, got "
                               f"{len(x) if x.ndim == 2 else 0}", code="too_few_scans")
        order = np.random.default_rng(seed).permutation(len(x))
        reference = np.empty(len(x))
        for part in np.array_split(order, min(folds, len(x))):
            rest = np.setdiff1d(order, part)
            mean, precision, _ = _fit(x[rest])
            reference[part] = _distances(x[part], mean, precision)
        mean, precision, shrinkage = _fit(x)
        return cls(mean, precision, np.sort(reference), shrinkage)

    def distance(self, features: np.ndarray) -> np.ndarray:
        return _distances(np.atleast_2d(np.asarray(features, dtype=np.float64)), self.mean, self.precision)

    def score(self, visual) -> tuple[dict, bool]:
        """One scan's visual tokens [1, Q, d] -> ({distance, percentile}, above the 99th percentile)."""
        feats = pooled(visual)
        if feats.shape[-1] != self.mean.shape[0]:
            raise MedblipError(f"OOD profile has {self.mean.shape[0]} features, the model gives {feats.shape[-1]}",
                               code="bad_profile")
        dist = float(self.distance(feats)[0])
        pct = 100.0 * float(np.searchsorted(self.reference, dist, side="right")) / len(self.reference)
        return {"distance": round(dist, 4), "percentile": round(pct, 2)}, dist > self.threshold

    # -- storage ------------------------------------------------------------------

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, precision=self.precision, reference=self.reference,
                 shrinkage=np.float64(self.shrinkage))
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "OodProfile":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mean"], z["precision"], z["reference"], float(z["shrinkage"]))

    def meta(self) -> dict:
        """What the manifest says about it."""
        return {"kind": "ood-profile", "features": FEATURES, "dims": int(self.mean.shape[0]),
                "scans": int(len(self.reference)), "covariance": "Ledoit-Wolf (scikit-learn)",
                "shrinkage": round(self.shrinkage, 6), "reference_distances": f"{FOLDS}-fold cross-fitted",
                "threshold_percentile": THRESHOLD_PERCENTILE, "threshold": round(self.threshold, 6)}

"""The out-of-distribution profile: how far a scan's visual tokens lie from those of a trusted reference cohort.

Features (`POOLINGS`): per dimension of the visual tokens (the Q-Former's outputs after the projection, [Q, d_llm]),
their mean over the Q tokens and their range (max - min) over them, [2 d_llm] in float64. The mean alone misses much
of what a trained model does with inputs it never saw: on the known-answer models its noise volumes and
inverted-contrast scans land among the reference classes' means, while the spread between the query tokens
changes (docs/inputs/qc.md). The profile holds their mean and a shrinkage estimate of their covariance
(scikit-learn's Ledoit-Wolf), and the distribution of the reference scans' own Mahalanobis distances, each computed
by a profile fitted without that scan's fold (k-fold cross-fitting: in-sample distances would be too small).
A scan's `ood` is its distance and the percentile of that distance among the reference ones; above the
reference's 99th percentile it is flagged `out_of_distribution`. A profile records its pooling; one written
before the range was added (no pooling recorded) keeps pooling by the mean.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedblipError

ARTIFACT = "ood_profile"  # manifest artifact name
FILE = "ood/profile.npz"  # bundle-relative


def _mean(tokens: np.ndarray) -> np.ndarray:
    return tokens.mean(axis=1)


def _mean_range(tokens: np.ndarray) -> np.ndarray:
    return np.concatenate([tokens.mean(axis=1), tokens.max(axis=1) - tokens.min(axis=1)], axis=1)


# pooling name -> (what the manifest says, [B, Q, d] float64 -> [B, features])
POOLINGS = {"mean": ("mean of the visual tokens", _mean),
            "mean+range": ("mean and range (max - min) of the visual tokens, per dimension", _mean_range)}
POOLING = "mean+range"  # what new profiles use
LEGACY_POOLING = "mean"  # a stored profile without a recorded pooling
THRESHOLD_PERCENTILE = 99.0
MIN_SCANS = 10
FOLDS = 5


def pooled(visual, pooling: str = POOLING) -> np.ndarray:
    """Visual tokens [B, Q, d] (torch or numpy) -> features [B, F] float64 (F = 2 d for mean+range)."""
    arr = visual.detach().float().cpu().numpy() if hasattr(visual, "detach") else np.asarray(visual)
    return POOLINGS[pooling][1](arr.astype(np.float64))


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
    pooling: str = POOLING  # how the features were pooled from the visual tokens (POOLINGS)

    @property
    def threshold(self) -> float:
        return float(np.percentile(self.reference, THRESHOLD_PERCENTILE))

    @classmethod
    def fit(cls, features: np.ndarray, folds: int = FOLDS, seed: int = 0, pooling: str = POOLING) -> "OodProfile":
        """features [n, F] of a trusted cohort, pooled by `pooling` -> the profile (n >= MIN_SCANS)."""
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
        return cls(mean, precision, np.sort(reference), shrinkage, pooling)

    def distance(self, features: np.ndarray) -> np.ndarray:
        return _distances(np.atleast_2d(np.asarray(features, dtype=np.float64)), self.mean, self.precision)

    def score(self, visual) -> tuple[dict, bool]:
        """One scan's visual tokens [1, Q, d] -> ({distance, percentile}, above the 99th percentile)."""
        feats = pooled(visual, self.pooling)
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
                 shrinkage=np.float64(self.shrinkage), pooling=np.array(self.pooling))
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "OodProfile":
        with np.load(path, allow_pickle=False) as z:
            pooling = str(z["pooling"]) if "pooling" in z.files else LEGACY_POOLING
            if pooling not in POOLINGS:
                raise MedblipError(f"OOD profile pools its features by {pooling!r}, which this version does not know "
                                   f"({', '.join(POOLINGS)})", code="bad_profile")
            return cls(z["mean"], z["precision"], z["reference"], float(z["shrinkage"]), pooling)

    def meta(self) -> dict:
        """What the manifest says about it."""
        return {"kind": "ood-profile", "features": POOLINGS[self.pooling][0], "pooling": self.pooling,
                "dims": int(self.mean.shape[0]),
                "scans": int(len(self.reference)), "covariance": "Ledoit-Wolf (scikit-learn)",
                "shrinkage": round(self.shrinkage, 6), "reference_distances": f"{FOLDS}-fold cross-fitted",
                "threshold_percentile": THRESHOLD_PERCENTILE, "threshold": round(self.threshold, 6)}

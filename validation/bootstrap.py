"""Stratified bootstrap: resample scans with replacement within each true class (the class sizes stay those of the
cohort), recompute every figure per replicate (vectorised, metrics.all_figures), and take the 2.5th and 97.5th
percentiles as the 95 % interval. The same replicate indices serve two bundles for paired differences."""

from __future__ import annotations

import numpy as np

DEFAULT_REPLICATES = 2000
DEFAULT_SEED = 20261205
CHUNK = 250  # replicates computed at once (bounds memory at about CHUNK x n x 3 floats per array)


def stratified_indices(y: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """[replicates, n] indices into the cohort, each replicate keeping every class's count."""
    y = np.asarray(y)
    blocks = []
    for k in np.unique(y):
        members = np.flatnonzero(y == k)
        blocks.append(members[rng.integers(0, len(members), size=(replicates, len(members)))])
    return np.concatenate(blocks, axis=1) if blocks else np.empty((replicates, 0), np.int64)


def replicate_figures(fn, idx: np.ndarray, *arrays) -> dict[str, np.ndarray]:
    """fn(*[a[idx_chunk] for a in arrays]) -> name -> [B] per chunk of replicates, joined -> name -> [replicates]."""
    parts: dict[str, list] = {}
    for start in range(0, len(idx), CHUNK):
        chunk = idx[start:start + CHUNK]
        for name, values in fn(*[None if a is None else a[chunk] for a in arrays]).items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(v) for name, v in parts.items()}


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of replicate values (NaN replicates ignored); (None, None) if none is defined."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def with_intervals(point: dict[str, float], reps: dict[str, np.ndarray], level: float = 0.95) -> dict[str, dict]:
    """name -> {"value", "ci_low", "ci_high"} (JSON null for an undefined value or interval)."""
    out = {}
    for name, value in point.items():
        lo, hi = interval(reps[name], level) if name in reps else (None, None)
        out[name] = {"value": None if not np.isfinite(value) else float(value), "ci_low": lo, "ci_high": hi}
    return out

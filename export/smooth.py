"""SmoothQuant-style activation smoothing: per input channel j a scale s_j moves the range of the activations
into the weights, x @ W = (x / s) @ (diag(s) W), with s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), so that
outlier channels of x no longer set the INT8 grid of every other channel when the activations are quantized
per call. The 1/s sits in a Mul before the quantized matmul (one elementwise op; its cost is measured).

The activation maxima come from the fp32 reference run over the evaluation set (forward pre-hooks on the
LLM's linear layers), and alpha is chosen on the same set: each candidate's fully quantized graph is measured
and the best kept (tolerant.py); "none" (no smoothing) is always a candidate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

ALPHAS = (0.25, 0.5, 0.75)


def fingerprint(column: np.ndarray) -> bytes:
    """A layer's identity as the graph writers see it: the float32 bytes of its first output column [K]."""
    return hashlib.blake2b(np.ascontiguousarray(column, np.float32).tobytes(), digest_size=16).digest()


def _column_and_width(module: nn.Module):
    """(first output column [K] float32, K) of a linear layer, or None for other modules."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return w[0, :].detach().float().numpy(), w.shape[1]  # [out, in]
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: [in, out]
        return w[:, 0].detach().float().numpy(), w.shape[0]
    return None


def fold_layer_inputs(model, run, fold) -> dict:
    """Run `run()` with a hook on every linear layer of model.llm; per layer (keyed by its fingerprint),
    acc = fold(previous acc or None, its input as [tokens, in_features]) at each call. Returns the accs."""
    acc, handles = {}, []

    def hook_for(key):
        def hook(module, args):
            acc[key] = fold(acc.get(key), args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    for module in model.llm.modules():
        col = _column_and_width(module)
        if col is not None:
            handles.append(module.register_forward_pre_hook(hook_for(fingerprint(col[0]))))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return acc


def activation_maxima(model, run) -> dict[bytes, np.ndarray]:
    """Per input channel max |x| of each linear layer of model.llm while `run()` runs it (the fp32 reference
    over the evaluation set), keyed by the layer's fingerprint."""
    def fold(prev, x):
        m = x.float().abs().amax(0).numpy()
        return m if prev is None else np.maximum(prev, m)
    return fold_layer_inputs(model, run, fold)


@dataclass(frozen=True, eq=False)
class Smoothed:
    """`base` on smoothed activations and weights (the matmuls whose activation maxima are known)."""

    base: object
    alpha: float
    maxima: dict = field(repr=False, default_factory=dict)

    def __getattr__(self, item):  # bits, bytes_per_weight, bytes_text: the base format's
        if item in ("base", "alpha", "maxima"):
            raise AttributeError(item)
        return getattr(self.base, item)

    def describe(self) -> str:
        return f"{self.base.describe()}, activations smoothed (alpha {self.alpha:g})"

    def scales(self, weight: np.ndarray) -> np.ndarray | None:
        """s [K] for weight [K, N], or None when the layer's activations were not seen."""
        amax = self.maxima.get(fingerprint(weight[:, 0]))
        if amax is None or amax.shape[0] != weight.shape[0]:
            return None
        wmax = np.abs(weight).max(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = amax.astype(np.float64) ** self.alpha / wmax.astype(np.float64) ** (1 - self.alpha)
        return np.where(np.isfinite(s) & (s > 0), np.clip(s, 1e-4, 1e4), 1.0).astype(np.float32)

    def emit(self, w, x: str, name: str, weight: np.ndarray, bias=None, out: str | None = None) -> str:
        s = self.scales(weight)
        if s is None:
            return self.base.emit(w, x, name, weight, bias, out)
        xs = w.op("Mul", [x, w.weight(f"{name}.smooth", (1.0 / s).astype(np.float32))])
        return self.base.emit(w, xs, name, np.ascontiguousarray(weight * s[:, None]), bias, out)

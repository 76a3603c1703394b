"""The explained quantity: the margin of one class, log p(c) - logsumexp over the other classes' log p.

p is the softmax over the three answers' summed log-likelihoods (model/scoring.py), so the margin equals
ll(c) - logsumexp(ll(others)): the normaliser cancels. Positive when c is the predicted class."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MedblipError
from ..model.prompts import LABELS
from ..model.scoring import sequence_logprob


def class_index(label: str) -> int:
    if label not in LABELS:
        raise MedblipError(f"unknown class {label!r}; choose one of {', '.join(LABELS)}", code="usage")
    return LABELS.index(label)


def margin_torch(loglik: torch.Tensor, target: int) -> torch.Tensor:
    """loglik [3] (LABELS order), differentiable -> the margin of class `target` (a scalar)."""
    others = torch.cat([loglik[:target], loglik[target + 1:]])
    return loglik[target] - torch.logsumexp(others, dim=0)


def margin_numpy(loglik, target: int) -> np.ndarray:
    """loglik [..., 3] -> margins [...] (float64)."""
    ll = np.asarray(loglik, np.float64)
    others = np.delete(ll, target, axis=-1)
    top = others.max(axis=-1, keepdims=True)
    return ll[..., target] - (top[..., 0] + np.log(np.exp(others - top).sum(axis=-1)))


def answers_loglik(logits: torch.Tensor, candidates: list[list[int]]) -> torch.Tensor:
    """logits [3, L, V] predicting each candidate's tokens (right-padded) -> sum log p per candidate [3]."""
    return torch.stack([sequence_logprob(logits[i, : len(c)], c) for i, c in enumerate(candidates)])

"""Relevance propagation through attention (Chefer, Gur, Wolf: "Generic Attention-model Explainability for
Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021), one function per rule.

Matrices are indexed [attending token, attended token]; `attn` and `grad` are one attention layer's
probabilities and the target's gradient with respect to them, [heads, n, m].
"""

from __future__ import annotations

import torch


def weighted(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient-weighted attention: the head mean of the positive part of grad * attn -> [n, m]."""
    return (grad * attn).clamp(min=0).mean(dim=0)


def self_step(rel: torch.Tensor, a_bar: torch.Tensor) -> torch.Tensor:
    """Self-attention rule: R <- R + A_bar R (rows: the attending tokens)."""
    return rel + a_bar @ rel


def without_residual(rel: torch.Tensor) -> torch.Tensor:
    """A self-relevance matrix with its identity taken out, rows scaled to sum to 1, identity put back (keeps the
    residual connection from dominating a cross-attention step)."""
    eye = torch.eye(rel.shape[0], dtype=rel.dtype, device=rel.device)
    off = rel - eye
    sums = off.sum(dim=-1, keepdim=True)
    return torch.where(sums > 0, off / sums.clamp(min=1e-12), off) + eye


def cross_step(rel_cross: torch.Tensor, rel_self: torch.Tensor, a_bar: torch.Tensor,
               rel_source: torch.Tensor) -> torch.Tensor:
    """Cross-attention rule: R^{qs} <- R^{qs} + R_bar^{qq} A_bar R_bar^{ss} (queries q attend to sources s)."""
    return rel_cross + without_residual(rel_self) @ a_bar @ without_residual(rel_source)

"""Attention probabilities kept while a model runs, each with `retain_grad()` so the backward pass fills its
gradient. Hugging Face eager attention modules return their probabilities in their outputs; the ViT's
attention (model/vit3d.py) is run in its eager form with the probabilities kept."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


class Recorded(list):
    """Probabilities [B, heads, n, m] in the order the layers ran; after backward each has `.grad`."""

    def pairs(self, batch: int = 0):
        """(attn [heads, n, m], grad [heads, n, m]) of one batch element per layer (grad zeros if none flowed)."""
        for a in self:
            g = a.grad if a.grad is not None else torch.zeros_like(a)
            yield a[batch].detach(), g[batch]


@contextmanager
def outputs_of(modules, index: int):
    """Keep output[index] of each module's forward (Hugging Face eager attention probabilities)."""
    store = Recorded()

    def hook(_module, _inputs, output):
        probs = output[index]
        if probs is None:
            raise RuntimeError("attention probabilities not returned: eager attention is needed")
        if probs.requires_grad:
            probs.retain_grad()
        store.append(probs)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def eager_attention(config):
    """Run Hugging Face modules built from `config` with eager attention (so they return probabilities)."""
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def _vit_attention(attn, store: Recorded):
    """The EVA attention of model/vit3d.Attention in its eager form, its probabilities kept."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
        q, k, v = F.linear(x, attn.qkv.weight, bias).reshape(b, n, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        probs = F.softmax(torch.matmul(q * attn.head_dim**-0.5, k.transpose(-1, -2)).float(), dim=-1)
        if probs.requires_grad:
            probs.retain_grad()
        store.append(probs)
        return attn.proj(torch.matmul(probs.to(v.dtype), v).transpose(1, 2).reshape(b, n, c))

    return forward


@contextmanager
def vit_attention(vit):
    """Run the ViT's blocks with eager attention whose probabilities are kept -> Recorded."""
    store = Recorded()
    for blk in vit.blocks:
        blk.attn.forward = _vit_attention(blk.attn, store)
    try:
        yield store
    finally:
        for blk in vit.blocks:
            del blk.attn.forward

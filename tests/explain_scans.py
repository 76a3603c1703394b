"""A model for the explanation tests: a tiny random model made to depend on its input (the scans it reads are
written by medblip_edge.explain.storage)."""

from __future__ import annotations

import torch


def sensitise(model) -> None:
    """Make a random model's margin follow its input: a random tiny model averages its 344 image tokens almost
    uniformly in the Q-Former, so no patch moves its answer. Sharper cross-attention (query and key x6), a
    stronger cross-attention path (value and output x10) and a patch embedding that outweighs the position
    embedding (x30) give patch-level effects of a few hundredths of a nat, the same weights every run."""
    with torch.no_grad():
        for layer in model.qformer.qformer.encoder.layer:
            if layer.has_cross_attention:
                cross = layer.crossattention
                cross.attention.query.weight.mul_(6)
                cross.attention.key.weight.mul_(6)
                cross.attention.value.weight.mul_(10)
                cross.output.dense.weight.mul_(10)
        model.visual_encoder.patch_embed_3d.proj.weight.mul_(30)

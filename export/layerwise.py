"""Export adapter for graphs whose KV caches are stacked tensors: the shipped graphs take one tensor per layer."""

from __future__ import annotations

import torch
from torch import nn


def layer_names(names: tuple[str, ...] | list[str], layers: int) -> list[str]:
    """("past_k", "past_v"), 2 -> past_k_0, past_k_1, past_v_0, past_v_1: the per-layer cache names, in order."""
    return [f"{n}_{i}" for n in names for i in range(layers)]


class Layerwise(nn.Module):
    """Export adapter: `graph` with its stacked [L,B,H,*,dk] caches taken and returned as one tensor per layer.

    forward(*plain, *cache_lists): `plain` tensors pass through; each following list of L tensors is
    stacked; every 5-D output is split back into L tensors (the other outputs are returned as they are).
    """

    def __init__(self, graph: nn.Module, plain: int):
        super().__init__()
        self.inner, self.plain = graph, plain  # not `graph`: the name clashes with fx.GraphModule.graph

    def forward(self, *args):
        stacked = [torch.stack(list(layers)) for layers in args[self.plain:]]
        out = []
        for t in self.inner(*args[:self.plain], *stacked):
            out.extend(t.unbind(0) if t.dim() == 5 else [t])
        return tuple(out)

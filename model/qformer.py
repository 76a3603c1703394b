"""The Q-Former: transformers' BLIP-2 Q-Former, fed from the training checkpoint's LAVIS key names."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from .config import QFormerConfig

LAVIS_PREFIX = "Qformer.bert."

# LAVIS BERT names -> transformers Blip2QFormerModel names (same computation).
_RENAMES = (
    (re.compile(r"^embeddings\.LayerNorm\."), "layernorm."),
    (re.compile(r"\.attention\.self\."), ".attention.attention."),
    (re.compile(r"\.crossattention\.self\."), ".crossattention.attention."),
)

# Present in every checkpoint, never used by the queries-only inference path.
_UNUSED = (
    re.compile(r"^embeddings\.position_ids$"),
    re.compile(r"^encoder\.layer\.\d+\.(intermediate|output)\."),  # text-path FFN
)


def build_qformer(cfg: QFormerConfig, encoder_width: int) -> Blip2QFormerModel:
    """Q-Former over image tokens of width `encoder_width`; text-path FFN not built."""
    hf = Blip2QFormerConfig(
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        hidden_act="gelu",  # exact GELU, as BERT
        layer_norm_eps=1e-12,
        cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=encoder_width,
        use_qformer_text_input=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf._attn_implementation = "sdpa"
    return Blip2QFormerModel(hf).eval()


def lavis_to_hf(key: str) -> str | None:
    """Map one `Qformer.bert.*` suffix to a Blip2QFormerModel key; None for keys unused at inference."""
    if any(p.search(key) for p in _UNUSED):
        return None
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def hf_to_lavis(key: str) -> str:
    """Inverse of `lavis_to_hf` for the keys it keeps."""
    key = key.replace(".crossattention.attention.", ".crossattention.self.")
    key = key.replace(".attention.attention.", ".attention.self.")
    if key.startswith("layernorm."):
        key = "embeddings.LayerNorm." + key[len("layernorm."):]
    return key


class QueryTransformer(nn.Module):
    """image_embeds [B, N, Cv] -> query_output [B, num_query, hidden]."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query, cfg.hidden))
        self.qformer = build_qformer(cfg, encoder_width)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state

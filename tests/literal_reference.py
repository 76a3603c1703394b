"""A literal fp32 re-implementation of MedBLIP's image half, written from REFERENCE.md sections 2-3.

It reads the raw training-layout state dict (LAVIS key names) and uses plain
torch ops only: explicit matmuls, an explicit softmax, F.layer_norm, an erf
GELU and F.conv3d. Nothing here imports our package's modules or transformers,
so it is an independent check of `MedBlip.visual_tokens`.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

VIT_HEAD_DIM = 88  # EVA ViT-g: 1408 = 16 x 88
QFORMER_HEAD_DIM = 64  # BERT-base: 768 = 12 x 64
VIT_LN_EPS = 1e-6
LN_VISION_EPS = 1e-5
QFORMER_LN_EPS = 1e-12


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ w.t()
    return y if b is None else y + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softmax(s: torch.Tensor) -> torch.Tensor:
    s = s - s.amax(dim=-1, keepdim=True)
    e = torch.exp(s)
    return e / e.sum(dim=-1, keepdim=True)


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """q [B,Nq,C], k/v [B,Nk,C] (already projected) -> context [B,Nq,C]; no mask."""
    b, nq, c = q.shape
    nk = k.shape[1]
    q = q.reshape(b, nq, heads, head_dim).transpose(1, 2)  # [B,h,Nq,d]
    k = k.reshape(b, nk, heads, head_dim).transpose(1, 2)
    v = v.reshape(b, nk, heads, head_dim).transpose(1, 2)
    p = _softmax((q @ k.transpose(-1, -2)) * head_dim**-0.5)
    return (p @ v).transpose(1, 2).reshape(b, nq, heads * head_dim)


def _layer_indices(sd: dict, prefix: str) -> list[int]:
    rx = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for m in map(rx.match, sd) if m})


def _vit(sd: dict, volume: torch.Tensor, head_dim: int) -> torch.Tensor:
    """EVA ViT with the 3D stem: [B,1,S,S,S] -> [B, 1+P, C] (no final norm)."""
    pre = "visual_encoder."
    w = sd[pre + "patch_embed_3d.proj.weight"]  # [C,1,p,p,p]
    patch = w.shape[2]
    x = F.conv3d(volume, w, sd[pre + "patch_embed_3d.proj.bias"], stride=patch)  # [B,C,D',H',W']
    b, c = x.shape[:2]
    x = x.reshape(b, c, -1).transpose(1, 2)  # tokens in (D,H,W) row-major order
    x = torch.cat([sd[pre + "cls_token"].expand(b, 1, c), x], dim=1) + sd[pre + "pos_embed_3d"]
    heads = c // head_dim
    assert heads * head_dim == c, (c, head_dim)
    for i in _layer_indices(sd, pre + "blocks."):
        p = f"{pre}blocks.{i}."
        h = _ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], VIT_LN_EPS)
        qkv_bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.v_bias"]), sd[p + "attn.v_bias"]])
        qkv = _linear(h, sd[p + "attn.qkv.weight"], qkv_bias)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        x = x + _linear(_mha(q, k, v, heads, head_dim), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = _ln(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], VIT_LN_EPS)
        h = _linear(_gelu(_linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                    sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + h
    return x


def _bert_attention(sd: dict, p: str, h: torch.Tensor, kv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """BERT attention block under prefix p ('...attention.' or '...crossattention.'), post-norm."""
    hidden = h.shape[-1]
    q = _linear(h, sd[p + "self.query.weight"], sd[p + "self.query.bias"])
    k = _linear(kv, sd[p + "self.key.weight"], sd[p + "self.key.bias"])
    v = _linear(kv, sd[p + "self.value.weight"], sd[p + "self.value.bias"])
    ctx = _mha(q, k, v, hidden // head_dim, head_dim)
    out = _linear(ctx, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
    return _ln(out + h, sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], QFORMER_LN_EPS)


def _qformer(sd: dict, image_embeds: torch.Tensor, head_dim: int) -> torch.Tensor:
    """BLIP-2 Q-Former, queries only: image_embeds [B,N,Cv] -> [B,Q,H]."""
    pre = "Qformer.bert."
    b = image_embeds.shape[0]
    q = sd["query_tokens"]
    h = _ln(q.expand(b, *q.shape[1:]), sd[pre + "embeddings.LayerNorm.weight"],
            sd[pre + "embeddings.LayerNorm.bias"], QFORMER_LN_EPS)
    assert h.shape[-1] % head_dim == 0
    for i in _layer_indices(sd, pre + "encoder.layer."):
        p = f"{pre}encoder.layer.{i}."
        h = _bert_attention(sd, p + "attention.", h, h, head_dim)
        if p + "crossattention.self.query.weight" in sd:
            h = _bert_attention(sd, p + "crossattention.", h, image_embeds, head_dim)
        inter = _gelu(_linear(h, sd[p + "intermediate_query.dense.weight"], sd[p + "intermediate_query.dense.bias"]))
        out = _linear(inter, sd[p + "output_query.dense.weight"], sd[p + "output_query.dense.bias"])
        h = _ln(out + h, sd[p + "output_query.LayerNorm.weight"], sd[p + "output_query.LayerNorm.bias"],
                QFORMER_LN_EPS)
    return h


def _proj_prefix(sd: dict) -> str:
    found = [p for p in ("t5_proj.", "proj.") if p + "weight" in sd]
    assert len(found) == 1, found
    return found[0]


@torch.no_grad()
def literal_visual_tokens(sd: dict, volume: torch.Tensor, vit_head_dim: int = VIT_HEAD_DIM,
                          qformer_head_dim: int = QFORMER_HEAD_DIM) -> torch.Tensor:
    """Training-layout state dict + volume [B,1,S,S,S] -> visual tokens [B, Q, d_llm], all in fp32.

    The head widths are parameters only so that a test can show a wrong head count changes the answer.
    """
    needed = ("visual_encoder.", "ln_vision.", "query_tokens", "Qformer.bert.", "t5_proj.", "proj.")
    sd = {k: v.float() for k, v in sd.items() if k.startswith(needed) and v.is_floating_point()}
    x = _vit(sd, volume.float(), vit_head_dim)
    image_embeds = _ln(x, sd["ln_vision.weight"], sd["ln_vision.bias"], LN_VISION_EPS)
    query_output = _qformer(sd, image_embeds, qformer_head_dim)
    pp = _proj_prefix(sd)
    return _linear(query_output, sd[pp + "weight"], sd[pp + "bias"])

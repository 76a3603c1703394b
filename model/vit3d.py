"""The 3D-stem EVA ViT of MedBLIP; parameter names match the training checkpoint's `visual_encoder.*` keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class PatchEmbed3d(nn.Module):
    """Conv3d patchify: [B,1,D,H,W] -> [B, (D/p)(H/p)(W/p), C] in the conv output's (D,H,W) order."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv3d(1, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """EVA attention: one qkv matmul whose bias is cat(q_bias, 0, v_bias) (keys carry no bias)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        scores = torch.matmul(q * self.head_dim**-0.5, k.transpose(-1, -2))  # [B, heads, N, N]
        attn = F.softmax(scores.float(), dim=-1).to(v.dtype)  # softmax in fp32 even in an fp16 graph
        return self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as EVA


class Block(nn.Module):
    """Pre-norm transformer block, LayerNorm eps 1e-6, no layer scale."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer3d(nn.Module):
    """volume [B,1,S,S,S] -> tokens [B, 1 + (S/p)^3, width] (cls first)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed_3d = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.patch_embed_3d = PatchEmbed3d(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed_3d(volume)  # [B, P, C]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed_3d  # [B, P+1, C]
        for blk in self.blocks:
            x = blk(x)
        return x

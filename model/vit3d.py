"""The 3D-stem EVA ViT of MedBLIP; parameter names match the training checkpoint's `visual_encoder.*` keys."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class PatchEmbed3d(nn.Module):
    """Conv3d patchify: [B,1,D,H,W] -> [B, (D/p)(H/p)(W/p), C] in the conv output's (D,H,W) order.

    The weights are the training code's Conv3d (kernel = stride = p); the forward pass is the same sum as
    one GEMM over the volume cut into p^3 patches, as the exported ONNX graph computes it. A convolution
    with a 32^3 kernel and one input channel is a poor fit for cuDNN and oneDNN alike
    (benchmarks/vision_forms.py measures both forms). Voxels past the last whole patch are dropped, as the
    strided convolution drops them.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv3d(1, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(patches(x, self.proj.kernel_size[0]), self.proj.weight.flatten(1), self.proj.bias)

    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The training code's form (the oracle of the GEMM form)."""
        return self.proj(x).flatten(2).transpose(1, 2)


def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B,1,D,H,W] -> [B, (D/p)(H/p)(W/p), p^3]: whole p^3 patches in (D,H,W) order, voxels in (d,h,w) order."""
    b, _, d, h, w = x.shape
    nd, nh, nw = d // p, h // p, w // p
    x = x[:, 0, : nd * p, : nh * p, : nw * p].reshape(b, nd, p, nh, p, nw, p)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, nd * nh * nw, p * p * p)


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
        # fused attention (flash / memory-efficient kernels; their softmax accumulates in fp32 at any dtype)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The training code's form: scores, fp32 softmax, weighted sum (the oracle of the fused form)."""
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q * self.head_dim**-0.5, k.transpose(-1, -2))  # [B, heads, N, N]
        attn = F.softmax(scores.float(), dim=-1).to(v.dtype)
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


@contextmanager
def training_forms(vit: VisionTransformer3d):
    """Run `vit` as the training code computes it: the Conv3d patch embedding and eager attention (the
    reference pipeline's path, and the other side of benchmarks/vision_forms.py)."""
    swapped = [vit.patch_embed_3d] + [blk.attn for blk in vit.blocks]
    vit.patch_embed_3d.forward = vit.patch_embed_3d.forward_conv
    for blk in vit.blocks:
        blk.attn.forward = blk.attn.forward_eager
    try:
        yield vit
    finally:
        for m in swapped:
            del m.forward  # back to the class's fused forward

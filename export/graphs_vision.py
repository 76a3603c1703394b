"""The vision graph written op by op: volume [B,1,S,S,S] float32 -> visual tokens [B,Q,d_llm] float32.

3D ViT (patchify as one matmul, pre-norm blocks with fused LayerNorm/attention kernels) -> ln_vision ->
Q-Former (BERT post-norm layers over the queries, cross-attention to the image tokens) -> projection.
The ViT's matmuls (patch stem, qkv, proj, fc1, fc2: ~97% of the FLOPs) are written in the weight format
`--precision` asks for (fp32, or dynamic INT8 for CPUs with integer dot products); the Q-Former and the
projection stay fp32. Weights are read from the module in their stored dtypes and written and released one
block at a time (onnx_builder.WeightFile), so the 1.1 B-parameter paper-size ViT never sits in memory whole.

  patchify   Reshape/Transpose the volume into [B, (S/p)^3, p^3] patches in the Conv3d output's (D,H,W)
             order, then patches @ W_conv^T + b: the Conv3d with kernel = stride = p, as a matmul
  block      LayerNormalization / SkipLayerNormalization (residual add + LayerNorm, eps 1e-6), qkv matmul
             with bias cat(q_bias, 0, v_bias), MultiHeadAttention (scale head_dim^-0.5), proj, the MLP
             with exact GELU
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model.stored import release_module
from .onnx_builder import MS_DOMAIN, GraphWriter, WeightFile
from .quantize import FP32


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _lin(w: GraphWriter, x: str, name: str, layer, fmt=FP32, weight: np.ndarray | None = None,
         bias: np.ndarray | None = None, out: str | None = None) -> str:
    """nn.Linear `layer` (weight [out, in]) applied to x in format `fmt`."""
    weight = _np(layer.weight).T if weight is None else weight
    bias = (_np(layer.bias) if layer.bias is not None else None) if bias is None else bias
    return w.linear(x, name, weight, bias, fmt, out=out)


def _norm(w: GraphWriter, x: str, delta: str | None, ln, name: str, out: str | None = None) -> tuple[str, str]:
    """-> (LayerNorm(x + delta), x + delta); delta None: the norm of x alone."""
    gamma, beta = w.weight(f"{name}.weight", _np(ln.weight)), w.weight(f"{name}.bias", _np(ln.bias))
    names = [out] if out else None
    if delta is None:
        return w.op("LayerNormalization", [x, gamma, beta], epsilon=float(ln.eps), axis=-1, stash_type=1,
                    names=names), x
    normed, _, _, total = w.op("SkipLayerNormalization", [x, delta, gamma, beta], n_out=4, unused=(1, 2),
                               domain=MS_DOMAIN, epsilon=float(ln.eps), names=names and names + ["", "", ""])
    return normed, total


class VisionWriter:
    def __init__(self, encoder, fmt=FP32):
        """encoder: an ImageEncoder (MedBlip is one); fmt: the ViT matmuls' weight format."""
        self.enc, self.fmt = encoder, fmt
        self.cfg = encoder.cfg

    def _patches(self, w: GraphWriter, volume: str) -> str:
        """[B,1,S,S,S] -> [B, P, p^3]: non-overlapping p^3 cubes in (D,H,W) order, each flattened (kd,kh,kw)."""
        v = self.cfg.vision
        g, p = v.image_size // v.patch, v.patch
        cubes = w.op("Reshape", [volume, w.const([-1, g, p, g, p, g, p])])
        cubes = w.op("Transpose", [cubes], perm=[0, 1, 3, 5, 2, 4, 6])
        return w.op("Reshape", [cubes, w.const([-1, g ** 3, p ** 3])])

    def _vit(self, w: GraphWriter, volume: str, batch: str) -> str:
        """-> image_embeds [B, 1+P, C]: the ViT and ln_vision."""
        vit, fmt = self.enc.visual_encoder, self.fmt
        conv = vit.patch_embed_3d.proj
        x = _lin(w, self._patches(w, volume), "patch_embed", conv, fmt, weight=_np(conv.weight).reshape(
            conv.weight.shape[0], -1).T)
        cls = w.op("Expand", [w.weight("cls_token", _np(vit.cls_token)), w.op("Concat", [batch, w.const([1, 1])],
                                                                                axis=0)])
        x = w.op("Add", [w.op("Concat", [cls, x], axis=1), w.weight("pos_embed", _np(vit.pos_embed_3d))])
        heads, scale = self.cfg.vision.heads, self.cfg.vision.head_dim ** -0.5
        delta = None
        for i, blk in enumerate(vit.blocks):
            h, x = _norm(w, x, delta, blk.norm1, f"b{i}.norm1")
            att = blk.attn
            bias = np.concatenate([_np(att.q_bias), np.zeros_like(_np(att.v_bias)), _np(att.v_bias)])
            q, k, v = w.op("Split", [_lin(w, h, f"b{i}.qkv", att.qkv, fmt, bias=bias)], n_out=3, axis=-1,
                           num_outputs=3)
            y = w.op("MultiHeadAttention", [q, k, v], domain=MS_DOMAIN, num_heads=heads, scale=scale)
            h, x = _norm(w, x, _lin(w, y, f"b{i}.proj", att.proj, fmt), blk.norm2, f"b{i}.norm2")
            h = w.op("Gelu", [_lin(w, h, f"b{i}.fc1", blk.mlp.fc1, fmt)])
            delta = _lin(w, h, f"b{i}.fc2", blk.mlp.fc2, fmt)
            release_module(blk)
        return _norm(w, x, delta, self.enc.ln_vision, "ln_vision")[0]

    def _attention(self, w: GraphWriter, h: str, kv: str, att, name: str) -> str:
        """BLIP-2 Q-Former attention block: q from h, k/v from kv; post-norm LayerNorm(dense(out) + h)."""
        a = att.attention
        heads = self.cfg.qformer.heads
        y = w.op("MultiHeadAttention", [_lin(w, h, f"{name}.q", a.query), _lin(w, kv, f"{name}.k", a.key),
                                        _lin(w, kv, f"{name}.v", a.value)], domain=MS_DOMAIN, num_heads=heads,
                 scale=self.cfg.qformer.head_dim ** -0.5)
        return _norm(w, _lin(w, y, f"{name}.dense", att.output.dense), h, att.output.LayerNorm, f"{name}.ln")[0]

    def _qformer(self, w: GraphWriter, image: str, batch: str) -> str:
        qf = self.enc.qformer
        queries = w.op("Expand", [w.weight("query_tokens", _np(qf.query_tokens)),
                                  w.op("Concat", [batch, w.const([1, 1])], axis=0)])
        h = _norm(w, queries, None, qf.qformer.layernorm, "qformer.ln")[0]
        for i, layer in enumerate(qf.qformer.encoder.layer):
            h = self._attention(w, h, h, layer.attention, f"q{i}.self")
            if layer.has_cross_attention:
                h = self._attention(w, h, image, layer.crossattention, f"q{i}.cross")
            inter = w.op("Gelu", [_lin(w, h, f"q{i}.ffn_in", layer.intermediate_query.dense)])
            out = layer.output_query
            h = _norm(w, _lin(w, inter, f"q{i}.ffn_out", out.dense), h, out.LayerNorm, f"q{i}.ffn_ln")[0]
        return h

    def write(self, path: Path, weights: WeightFile | None = None) -> list[Path]:
        v = self.cfg.vision
        w = GraphWriter("vision", weights)
        volume = w.input("volume", "float32", ["batch", 1, v.image_size, v.image_size, v.image_size])
        batch = w.op("Slice", [w.op("Shape", [volume]), w.const([0]), w.const([1])])
        image = self._vit(w, volume, batch)
        _lin(w, self._qformer(w, image, batch), "proj", self.enc.proj, out="visual_tokens")
        w.output("visual_tokens", "float32", ["batch", self.cfg.qformer.num_query, self.enc.d_llm])
        return w.save(path)

"""T5 graphs written op by op with ONNX Runtime's fused kernels, in any weight format (export/quantize.py).

Each weight is read from the module (in its stored dtype), converted, written and released one layer
at a time (export/onnx_builder.WeightFile), so no fp32 graph of the whole LLM is ever held or built:
an INT8 or INT4 graph is written in its format directly.

The encoder graph: prompt ids + visual tokens concatenated inside the graph, the bidirectional
relative-position bias gathered from a [2 * max_distance + 1, H] table, per layer the same fused
kernels as below (MultiHeadAttention for self-attention), and every decoder layer's cross-attention
K/V from one packed MatMul.

The decoder graphs: same outputs as the traced graphs of model/t5_static.py (one cache tensor per layer, so no
slicing or stacking of the whole cache per token), under a quarter of the nodes. Per decoder layer:

  SkipSimplifiedLayerNormalization   residual add + T5 RMSNorm in one kernel
  MatMul [d, 3*inner]                 q, k, v in one weight read
  self-attention                      step: GroupQueryAttention on the packed q|k|v, the cache updated in
                                      place; prefill: Split -> MultiHeadAttention (no cache yet)
  MatMul o
  SkipSimplifiedLayerNormalization
  MatMul q -> MultiHeadAttention     cross-attention over the cached encoder K/V (BNSH)
  MatMul o
  SkipSimplifiedLayerNormalization
  MatMul [d, 2*ff] -> Split -> act(gate) * up -> MatMul wo      (gated FFN; plain FFN: one MatMul)

The step graph takes `past_len` (tokens already cached) and per-layer caches `past_k_i`/`past_v_i`
[batch, heads, capacity, head_dim] with capacity >= past_len + 1. Bound as both input and output
(`present_k_i`), GroupQueryAttention writes the new token's K/V at position past_len in place and
attends over the first past_len + 1; run without that binding it returns caches of past_len + 1.

The relative-position bias is a [distance, head] table computed from the module's own bucketing
(decoder buckets are unidirectional and saturate at max_distance), gathered once per call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model.stored import release_module
from .layerwise import layer_names
from .onnx_builder import MS_DOMAIN, GraphWriter, WeightFile
from .quantize import FP32

_ACT = {"gelu": ("Gelu", {}), "gelu_new": ("Gelu", {"approximate": "tanh"}),
        "gelu_pytorch_tanh": ("Gelu", {"approximate": "tanh"}), "relu": ("Relu", {})}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _linear(w: GraphWriter, x: str, name: str, fmt, *layers) -> str:
    """x @ [W_1; W_2; ...]^T: nn.Linear weights [out, in] packed along `out`, one matmul in format `fmt`."""
    return w.linear(x, name, np.concatenate([_np(m.weight) for m in layers], 0).T, None, fmt)


def _table(att, rel: torch.Tensor, bidirectional: bool) -> np.ndarray:
    """[len(rel), H]: the bias of each relative position (key - query) in `rel`; the outermost must saturate."""
    kw = {"bidirectional": bidirectional, "num_buckets": att.relative_attention_num_buckets,
          "max_distance": att.relative_attention_max_distance}
    buckets = att._relative_position_bucket(rel, **kw)
    for edge, bucket in ((rel[0], buckets[0]), (rel[-1], buckets[-1])):
        if edge != 0 and not bool((att._relative_position_bucket(edge * torch.tensor([2, 64]), **kw) == bucket).all()):
            raise ValueError("T5 relative-position buckets do not saturate at max_distance; no fused graph for this")
    return _np(att.relative_attention_bias.weight[buckets])


def position_table(t5) -> np.ndarray:
    """[max_distance + 1, H]: bias of a key `d` positions before the query (d >= max_distance saturates)."""
    att = t5.decoder.block[0].layer[0].SelfAttention
    return _table(att, -torch.arange(att.relative_attention_max_distance + 1), bidirectional=False)


def encoder_position_table(t5) -> np.ndarray:
    """[2 * max_distance + 1, H]: bias of a key at offset r - max_distance from the query (|r| saturates)."""
    att = t5.encoder.block[0].layer[0].SelfAttention
    m = att.relative_attention_max_distance
    return _table(att, torch.arange(-m, m + 1), bidirectional=True)


def gqa_lengths(w: GraphWriter, ids: str, past_len: str) -> tuple[str, str]:
    """GroupQueryAttention's (seqlens_k [B] int32: index of the new token, total_sequence_length int32) for one
    new token after `past_len` cached ones."""
    batch = w.op("Slice", [w.op("Shape", [ids]), w.const([0]), w.const([1])])
    seqlens = w.op("Cast", [w.op("Expand", [w.op("Unsqueeze", [past_len, w.const([0])]), batch])], to=6)
    return seqlens, w.op("Cast", [w.op("Add", [past_len, w.const(1)])], to=6)


class _T5Writer:
    """What the encoder and decoder writers share: config, activation, norms, the FFN."""

    def __init__(self, t5):
        self.t5, self.cfg = t5, t5.config
        self.layers = len(t5.decoder.block)
        self.heads, self.dk = self.cfg.num_heads, self.cfg.d_kv
        act = self.cfg.dense_act_fn
        if act not in _ACT:
            raise ValueError(f"T5 activation {act!r} has no fused graph; known: {', '.join(_ACT)}")
        self.act = _ACT[act]

    def _norm(self, w: GraphWriter, x: str, delta: str | None, ln, scale: float = 1.0, name: str = "",
              out: str | None = None) -> tuple:
        """-> (RMSNorm(x + delta) * weight, x + delta); delta None: the norm of x alone. out: name the norm
        (a graph output; the sum is then not kept)."""
        gamma = w.weight(f"{name}.weight", _np(ln.weight) * scale)
        eps = float(ln.variance_epsilon)
        if delta is None:
            return w.op("SimplifiedLayerNormalization", [x, gamma], epsilon=eps, axis=-1, stash_type=1,
                        names=[out] if out else None), x
        normed, _, _, total = w.op("SkipSimplifiedLayerNormalization", [x, delta, gamma], n_out=4, unused=(1, 2),
                                   domain=MS_DOMAIN, epsilon=eps, names=[out, "", "", ""] if out else None)
        return normed, total

    def _ffn(self, w: GraphWriter, h: str, ff, name: str, fmt) -> str:
        op, attrs = self.act
        if hasattr(ff, "wi_0"):  # gated: act(h W0) * (h W1)
            gate, up = w.op("Split", [_linear(w, h, f"{name}.wi", fmt, ff.wi_0, ff.wi_1)], n_out=2, axis=-1,
                            num_outputs=2)
            h = w.op("Mul", [w.op(op, [gate], **attrs), up])
        else:
            h = w.op(op, [_linear(w, h, f"{name}.wi", fmt, ff.wi)], **attrs)
        # FLAN-T5's FFN output overflows fp16: `wo` stays fp32 when the other matmuls run in fp16
        return _linear(w, h, f"{name}.wo", FP32 if getattr(fmt, "fp16_activations", False) else fmt, ff.wo)


class T5EncoderWriter(_T5Writer):
    """prompt_ids [1,T] int64, visual [B,Q,d] -> encoder_out [B,S,d], cross_k_i, cross_v_i [B,H,S,dk] (S = T+Q)."""

    def _bias(self, w: GraphWriter, x: str) -> str:
        """[1,H,S,S] bidirectional relative-position bias over the S encoder positions."""
        rows = encoder_position_table(self.t5)
        m = (len(rows) - 1) // 2
        s = w.op("Gather", [w.op("Shape", [x]), w.const(1)], axis=0)
        pos = w.op("Range", [w.const(0), s, w.const(1)])
        rel = w.op("Sub", [w.op("Unsqueeze", [pos, w.const([0])]), w.op("Unsqueeze", [pos, w.const([1])])])
        idx = w.op("Add", [w.op("Clip", [rel, w.const(-m), w.const(m)]), w.const(m)])
        bias = w.op("Gather", [w.weight("encoder_position_table", rows), idx], axis=0)  # [S,S,H]
        return w.op("Unsqueeze", [w.op("Transpose", [bias], perm=[2, 0, 1]), w.const([0])])

    def write(self, path: Path, fmt=FP32, weights: WeightFile | None = None) -> list[Path]:
        L, H, dk, d = self.layers, self.heads, self.dk, self.cfg.d_model
        w = GraphWriter("t5_encoder", weights)
        ids = w.input("prompt_ids", "int64", [1, "prompt"])
        visual = w.input("visual", "float32", ["batch", "query", d])
        emb = w.op("Gather", [w.weight("embed_tokens", _np(self.t5.shared.weight)), ids], axis=0)  # [1,T,d]
        batch = w.op("Slice", [w.op("Shape", [visual]), w.const([0]), w.const([1])])
        emb = w.op("Expand", [emb, w.op("Concat", [batch, w.const([1, 1])], axis=0)])
        x = w.op("Concat", [emb, visual], axis=1)  # [B,S,d]: prompt first, then the visual tokens
        bias = self._bias(w, x)
        delta = None
        for i, blk in enumerate(self.t5.encoder.block):
            sa, ff = blk.layer[0], blk.layer[1]
            h, x = self._norm(w, x, delta, sa.layer_norm, name=f"e{i}.sa_norm")
            att = sa.SelfAttention
            q, k, v = w.op("Split", [_linear(w, h, f"e{i}.qkv", fmt, att.q, att.k, att.v)], n_out=3, axis=-1,
                           num_outputs=3)
            y = w.op("MultiHeadAttention", [q, k, v, "", "", bias], domain=MS_DOMAIN, num_heads=H, scale=1.0)
            h, x = self._norm(w, x, _linear(w, y, f"e{i}.o", fmt, att.o), ff.layer_norm, name=f"e{i}.ff_norm")
            delta = self._ffn(w, h, ff.DenseReluDense, f"e{i}.ff", fmt)
            release_module(blk)
        enc, _ = self._norm(w, x, delta, self.t5.encoder.final_layer_norm, name="e.final_norm", out="encoder_out")
        # every decoder layer's cross-attention K and V from one matmul: [B,S,d] x [d, 2*L*H*dk]
        cross = [m for blk in self.t5.decoder.block for m in (blk.layer[1].EncDecAttention.k,
                                                                blk.layer[1].EncDecAttention.v)]
        kv = _linear(w, enc, "cross_kv", fmt, *cross)
        heads = w.op("Concat", [batch, w.const([-1, H, dk])], axis=0)
        parts = w.op("Split", [kv], n_out=2 * L, axis=-1, num_outputs=2 * L)
        for i in range(L):
            for j, kind in enumerate(("k", "v")):
                w.op("Transpose", [w.op("Reshape", [parts[2 * i + j], heads])], perm=[0, 2, 1, 3],
                     names=[f"cross_{kind}_{i}"])
        for blk in self.t5.decoder.block:
            release_module(blk.layer[1])
        w.output("encoder_out", "float32", ["batch", "src", d])
        for name in layer_names(("cross_k", "cross_v"), L):
            w.output(name, "float32", ["batch", H, "src", dk])
        return w.save(path)


class T5DecoderWriter(_T5Writer):
    # -- pieces -----------------------------------------------------------------

    def _bias(self, w: GraphWriter, ids: str, past_len: str | None) -> str:
        """[1,H,T,P+T] relative-position bias + causal mask for queries at positions P..P+T-1."""
        t = w.op("Gather", [w.op("Shape", [ids]), w.const(1)], axis=0)
        p = past_len or w.const(0)
        end = w.op("Add", [p, t])
        q_pos = w.op("Range", [p, end, w.const(1)])
        k_pos = w.op("Range", [w.const(0), end, w.const(1)])
        dist = w.op("Sub", [w.op("Unsqueeze", [q_pos, w.const([1])]), w.op("Unsqueeze", [k_pos, w.const([0])])])
        rows = position_table(self.t5)
        table = w.weight("position_table", rows)
        idx = w.op("Clip", [dist, w.const(0), w.const(len(rows) - 1)])  # distances past the table saturate
        bias = w.op("Transpose", [w.op("Gather", [table, idx], axis=0)], perm=[2, 0, 1])  # [H,T,K]
        masked = w.op("Where", [w.op("Less", [dist, w.const(0)]), w.const(np.finfo(np.float32).min, "float32"),
                                w.const(0.0, "float32")])
        return w.op("Unsqueeze", [w.op("Add", [bias, masked]), w.const([0])])

    def _self_attention(self, w: GraphWriter, qkv: str, bias: str, i: int, cache: tuple | None) -> str:
        """Step (`cache` = (past_k, past_v, seqlens, total)): GroupQueryAttention, present_k/v_i updated in
        place when bound to the past buffers. Prefill: Split + MultiHeadAttention, present = this call's K/V."""
        names = [f"l{i}.self_attention", f"present_k_{i}", f"present_v_{i}"]
        if cache is None:
            q, k, v = w.op("Split", [qkv], n_out=3, axis=-1, num_outputs=3)
            return w.op("MultiHeadAttention", [q, k, v, "", "", bias, "", ""], domain=MS_DOMAIN,
                        num_heads=self.heads, scale=1.0, names=names)[0]
        past_k, past_v, seqlens, total = cache
        inputs = [qkv, "", "", past_k, past_v, seqlens, total, "", "", "", bias]  # cos/sin/position ids unused
        return w.op("GroupQueryAttention", inputs, domain=MS_DOMAIN, num_heads=self.heads,
                    kv_num_heads=self.heads, scale=1.0, names=names)[0]

    # -- graphs -----------------------------------------------------------------

    def write(self, path: Path, with_past: bool, fmt=FP32, weights: WeightFile | None = None) -> list[Path]:
        L, H, dk = self.layers, self.heads, self.dk
        w = GraphWriter("t5_decoder_step" if with_past else "t5_decoder_prefill", weights)
        ids = w.input("decoder_ids", "int64", ["batch", "seq"] if not with_past else ["batch", 1])
        past_len = w.input("past_len", "int64", []) if with_past else None
        kv = {n: [w.input(f"{n}_{i}", "float32", ["batch", H, axis, dk]) for i in range(L)]
              for n, axis in (("past_k", "capacity"), ("past_v", "capacity"), ("cross_k", "src"), ("cross_v", "src"))
              if with_past or n.startswith("cross")}
        x = w.op("Gather", [w.weight("embed_tokens", _np(self.t5.decoder.embed_tokens.weight)), ids], axis=0)
        bias = self._bias(w, ids, past_len)
        lengths = gqa_lengths(w, ids, past_len) if with_past else None
        delta = None
        for i, blk in enumerate(self.t5.decoder.block):
            sa, ca, ff = blk.layer[0], blk.layer[1], blk.layer[2]
            h, x = self._norm(w, x, delta, sa.layer_norm, name=f"l{i}.sa_norm")
            att = sa.SelfAttention
            qkv = _linear(w, h, f"l{i}.qkv", fmt, att.q, att.k, att.v)
            cache = (kv["past_k"][i], kv["past_v"][i], *lengths) if with_past else None
            y = self._self_attention(w, qkv, bias, i, cache)
            h, x = self._norm(w, x, _linear(w, y, f"l{i}.sa_o", fmt, att.o), ca.layer_norm, name=f"l{i}.ca_norm")
            att = ca.EncDecAttention
            y = w.op("MultiHeadAttention", [_linear(w, h, f"l{i}.ca_q", fmt, att.q), kv["cross_k"][i],
                                            kv["cross_v"][i]], domain=MS_DOMAIN, num_heads=H, scale=1.0)
            h, x = self._norm(w, x, _linear(w, y, f"l{i}.ca_o", fmt, att.o), ff.layer_norm, name=f"l{i}.ff_norm")
            delta = self._ffn(w, h, ff.DenseReluDense, f"l{i}.ff", fmt)
            release_module(blk)
        scale = self.cfg.d_model ** -0.5 if getattr(self.cfg, "scale_decoder_outputs", False) else 1.0
        h, _ = self._norm(w, x, delta, self.t5.decoder.final_layer_norm, scale=scale, name="final_norm")
        w.linear(h, "lm_head", _np(self.t5.lm_head.weight).T, None, fmt, out="logits")
        w.output("logits", "float32", ["batch", "seq" if not with_past else 1, self.cfg.vocab_size])
        total = "seq" if not with_past else "present_length"
        for name in layer_names(("present_k", "present_v"), L):
            w.output(name, "float32", ["batch", H, total, dk])
        return w.save(path)

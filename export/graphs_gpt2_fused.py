"""GPT-2 / BioMedLM graphs written op by op with ONNX Runtime's fused kernels, in any weight format.

One cache tensor per layer (`past_k_i`, `present_k_i`: [batch, heads, length, head_dim]), as the T5 graphs.

  gpt2_prefill: ids [B,T] int64, visual [B,Q,d] (Q may be 0), past_k_i/past_v_i [B,H,P,dk] (P may be 0),
                logits_from int64 -> logits [B, T+Q-logits_from, V], present_k_i/present_v_i [B,H,P+T+Q,dk]
                The prompt: ids = prompt, visual = the visual tokens, no past, logits_from = T+Q-1 (the head
                runs on the last position only). Scoring: ids = the candidates [n,L], visual [n,0,d], past =
                the prompt's caches repeated n times, logits_from = 0. MultiHeadAttention with a causal bias.
  gpt2_step:    ids [B,1], past_len int64, past_k_i/past_v_i [B,H,capacity,dk] -> logits [B,1,V],
                present_k_i/present_v_i: GroupQueryAttention on the packed q|k|v, bound in place by the
                runtime (runtime/ort_cache.py) exactly as the T5 step.

Per layer: SkipLayerNormalization (residual add + LayerNorm), one matmul for q|k|v, attention scaled by
1/sqrt(head_dim) and, with scale_attn_by_inverse_layer_idx (BioMedLM), by 1/(layer index + 1) as well,
the output projection, SkipLayerNormalization, the MLP (tanh GELU). Positions continue from the past.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model.stored import release_module
from .graphs_t5_fused import _ACT, _np, gqa_lengths
from .layerwise import layer_names
from .onnx_builder import MS_DOMAIN, GraphWriter, WeightFile
from .quantize import FP32


class Gpt2Writer:
    def __init__(self, gpt2):
        self.gpt2, self.cfg = gpt2, gpt2.config
        cfg = self.cfg
        self.layers, self.heads, self.d = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.dk = self.d // self.heads
        base = self.dk ** -0.5 if cfg.scale_attn_weights else 1.0
        self.scales = [base / (i + 1 if cfg.scale_attn_by_inverse_layer_idx else 1) for i in range(self.layers)]
        if cfg.activation_function not in _ACT:
            raise ValueError(f"GPT-2 activation {cfg.activation_function!r} has no fused graph; known: {', '.join(_ACT)}")
        self.act = _ACT[cfg.activation_function]

    def _norm(self, w: GraphWriter, x: str, delta: str | None, ln, name: str) -> tuple[str, str]:
        """-> (LayerNorm(x + delta), x + delta); delta None: the norm of x alone."""
        gamma, beta = w.weight(f"{name}.weight", _np(ln.weight)), w.weight(f"{name}.bias", _np(ln.bias))
        eps = float(ln.eps)
        if delta is None:
            return w.op("LayerNormalization", [x, gamma, beta], epsilon=eps, axis=-1, stash_type=1), x
        normed, _, _, total = w.op("SkipLayerNormalization", [x, delta, gamma, beta], n_out=4, unused=(1, 2),
                                   domain=MS_DOMAIN, epsilon=eps)
        return normed, total

    @staticmethod
    def _conv1d(w: GraphWriter, x: str, name: str, layer, fmt) -> str:
        """GPT-2's Conv1D: weight already [in, out]."""
        return w.linear(x, name, _np(layer.weight), _np(layer.bias), fmt)

    def _layers(self, w: GraphWriter, x: str, attend, fmt) -> str:
        """The transformer blocks and ln_f; attend(i, qkv) -> attention output [B,T,d] of layer i."""
        delta = None
        for i, blk in enumerate(self.gpt2.transformer.h):
            h, x = self._norm(w, x, delta, blk.ln_1, f"h{i}.ln_1")
            y = attend(i, self._conv1d(w, h, f"h{i}.c_attn", blk.attn.c_attn, fmt))
            h, x = self._norm(w, x, self._conv1d(w, y, f"h{i}.attn.c_proj", blk.attn.c_proj, fmt), blk.ln_2,
                              f"h{i}.ln_2")
            op, attrs = self.act
            h = w.op(op, [self._conv1d(w, h, f"h{i}.c_fc", blk.mlp.c_fc, fmt)], **attrs)
            delta = self._conv1d(w, h, f"h{i}.mlp.c_proj", blk.mlp.c_proj, fmt)
            release_module(blk)
        return self._norm(w, x, delta, self.gpt2.transformer.ln_f, "ln_f")[0]

    def _head(self, w: GraphWriter, h: str, fmt) -> None:
        w.linear(h, "lm_head", _np(self.gpt2.lm_head.weight).T, None, fmt, out="logits")

    def _outputs(self, w: GraphWriter, seq, total) -> None:
        w.output("logits", "float32", ["batch", seq, self.cfg.vocab_size])
        for name in layer_names(("present_k", "present_v"), self.layers):
            w.output(name, "float32", ["batch", self.heads, total, self.dk])

    def _embed(self, w: GraphWriter, ids: str) -> str:
        return w.op("Gather", [w.weight("wte", _np(self.gpt2.transformer.wte.weight)), ids], axis=0)

    def _positions(self, w: GraphWriter, start: str, count: str) -> str:
        """Position embeddings [S,d] of positions start .. start+count-1."""
        pos = w.op("Range", [start, w.op("Add", [start, count]), w.const(1)])
        return w.op("Gather", [w.weight("wpe", _np(self.gpt2.transformer.wpe.weight)), pos], axis=0)

    def write_prefill(self, path: Path, fmt=FP32, weights: WeightFile | None = None) -> list[Path]:
        L, H, dk, d = self.layers, self.heads, self.dk, self.d
        w = GraphWriter("gpt2_prefill", weights)
        ids = w.input("ids", "int64", ["batch", "seq"])
        visual = w.input("visual", "float32", ["vbatch", "query", d])
        past = {n: [w.input(f"{n}_{i}", "float32", ["batch", H, "past", dk]) for i in range(L)]
                for n in ("past_k", "past_v")}
        logits_from = w.input("logits_from", "int64", [])
        emb = self._embed(w, ids)  # [B,T,d]
        vbatch = w.op("Slice", [w.op("Shape", [visual]), w.const([0]), w.const([1])])
        emb = w.op("Expand", [emb, w.op("Concat", [vbatch, w.const([1, 1])], axis=0)])  # a [1,T] prompt, B scans
        x = w.op("Concat", [emb, visual], axis=1)  # [B,S,d]: prompt first, then the visual tokens
        s = w.op("Gather", [w.op("Shape", [x]), w.const(1)], axis=0)
        p = w.op("Gather", [w.op("Shape", [past["past_k"][0]]), w.const(2)], axis=0)
        x = w.op("Add", [x, self._positions(w, p, s)])
        # causal bias [1,1,S,P+S]: query j (at position P+j) sees keys 0 .. P+j
        q_pos = w.op("Unsqueeze", [w.op("Range", [p, w.op("Add", [p, s]), w.const(1)]), w.const([1])])
        k_pos = w.op("Unsqueeze", [w.op("Range", [w.const(0), w.op("Add", [p, s]), w.const(1)]), w.const([0])])
        bias = w.op("Where", [w.op("Greater", [k_pos, q_pos]), w.const(np.finfo(np.float32).min, "float32"),
                              w.const(0.0, "float32")])
        bias = w.op("Unsqueeze", [bias, w.const([0, 1])])

        def attend(i: int, qkv: str) -> str:
            q, k, v = w.op("Split", [qkv], n_out=3, axis=-1, num_outputs=3)
            return w.op("MultiHeadAttention", [q, k, v, "", "", bias, past["past_k"][i], past["past_v"][i]],
                        domain=MS_DOMAIN, num_heads=H, scale=self.scales[i],
                        names=[f"h{i}.attention", f"present_k_{i}", f"present_v_{i}"])[0]

        h = self._layers(w, x, attend, fmt)
        end = w.op("Unsqueeze", [w.op("Add", [p, s]), w.const([0])])
        h = w.op("Slice", [h, w.op("Unsqueeze", [logits_from, w.const([0])]), end, w.const([1])])
        self._head(w, h, fmt)
        self._outputs(w, "scored", "total")
        return w.save(path)

    def write_step(self, path: Path, fmt=FP32, weights: WeightFile | None = None) -> list[Path]:
        L, H, dk = self.layers, self.heads, self.dk
        w = GraphWriter("gpt2_step", weights)
        ids = w.input("ids", "int64", ["batch", 1])
        past_len = w.input("past_len", "int64", [])
        past = {n: [w.input(f"{n}_{i}", "float32", ["batch", H, "capacity", dk]) for i in range(L)]
                for n in ("past_k", "past_v")}
        x = w.op("Add", [self._embed(w, ids), self._positions(w, past_len, w.const(1))])
        seqlens, total = gqa_lengths(w, ids, past_len)

        def attend(i: int, qkv: str) -> str:
            inputs = [qkv, "", "", past["past_k"][i], past["past_v"][i], seqlens, total]
            return w.op("GroupQueryAttention", inputs, domain=MS_DOMAIN, num_heads=H, kv_num_heads=H,
                        scale=self.scales[i], names=[f"h{i}.attention", f"present_k_{i}", f"present_v_{i}"])[0]

        self._head(w, self._layers(w, x, attend, fmt), fmt)
        self._outputs(w, 1, "present_length")
        return w.save(path)

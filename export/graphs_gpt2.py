"""Export-only GPT-2 graphs over the Hugging Face module's weights, with the KV cache as plain tensors.

  prefill: prompt_ids [1,T] int64, visual [B,Q,d] -> last_logits [B,V], k, v [L,B,H,T+Q,dk]
  step:    ids [B,T] int64, past_k, past_v [L,B,H,P,dk] -> logits [B,T,V], k, v [L,B,H,P+T,dk]
Positions are 0..n-1 over [prompt ; visual ; generated] (the reference's cumsum(mask) - 1 with no padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv1d(x: torch.Tensor, layer) -> torch.Tensor:
    """GPT-2's Conv1D (x @ W + b, W [in, out]) as MatMul + Add: traced as is, it becomes a Gemm, which the
    4-bit MatMulNBits quantizer does not take (INT4 bundles kept every projection fp32)."""
    return torch.matmul(x, layer.weight) + layer.bias


class _Gpt2(nn.Module):
    def __init__(self, gpt2):
        super().__init__()
        self.gpt2 = gpt2
        cfg = gpt2.config
        self.heads = cfg.n_head
        self.act = gpt2.transformer.h[0].mlp.act
        # Attention score scale per layer, as GPT-2's config asks: 1/sqrt(head_dim), and for BioMedLM
        # (scale_attn_by_inverse_layer_idx) also 1/(layer index + 1).
        head_dim = cfg.n_embd // cfg.n_head
        base = head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        self.scales = [base / (i + 1 if cfg.scale_attn_by_inverse_layer_idx else 1) for i in range(cfg.n_layer)]
        # The LM head is tied to the token embedding; a graph-local copy keeps the two initializers apart,
        # so weight quantization of the head's MatMul cannot rewrite the embedding Gather's table.
        # Stored [d, V] so that every graph multiplies by it as a MatMul (the quantizers' op), never a Gemm.
        self.head = nn.Parameter(gpt2.lm_head.weight.detach().t().contiguous(), requires_grad=False)

    def run(self, x, past_k, past_v):
        """x [B,T,d] (embeddings without positions) -> (hidden [B,T,d], k, v stacked)."""
        tr = self.gpt2.transformer
        b, t, d = x.shape
        past_len = 0 if past_k is None else past_k.shape[3]
        pos = torch.arange(past_len, past_len + t, device=x.device)
        x = x + tr.wpe(pos)[None]
        q_pos = pos[:, None]
        k_pos = torch.arange(past_len + t, device=x.device)[None, :]
        mask = torch.where(k_pos > q_pos, torch.finfo(x.dtype).min, 0.0).to(x.dtype)  # [T, P+T] causal
        ks, vs = [], []
        for i, blk in enumerate(tr.h):
            h = blk.ln_1(x)
            q, k, v = _conv1d(h, blk.attn.c_attn).split(d, dim=2)
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            if past_k is not None:
                k, v = torch.cat([past_k[i], k], dim=2), torch.cat([past_v[i], v], dim=2)
            ks.append(k)
            vs.append(v)
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scales[i] + mask
            w = F.softmax(scores.float(), dim=-1).to(v.dtype)
            a = torch.matmul(w, v).transpose(1, 2).reshape(b, t, d)
            x = x + _conv1d(a, blk.attn.c_proj)
            x = x + _conv1d(self.act(_conv1d(blk.ln_2(x), blk.mlp.c_fc)), blk.mlp.c_proj)
        return tr.ln_f(x), torch.stack(ks), torch.stack(vs)


class Gpt2PrefillGraph(_Gpt2):
    def forward(self, prompt_ids, visual):
        emb = self.gpt2.transformer.wte(prompt_ids).expand(visual.shape[0], -1, -1)
        hidden, k, v = self.run(torch.cat([emb, visual.to(emb.dtype)], dim=1), None, None)
        return torch.matmul(hidden[:, -1], self.head).float(), k, v


class Gpt2StepGraph(_Gpt2):
    def forward(self, ids, past_k, past_v):
        hidden, k, v = self.run(self.gpt2.transformer.wte(ids), past_k, past_v)
        return torch.matmul(hidden, self.head).float(), k, v

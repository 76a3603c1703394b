"""The static T5 forms: the Hugging Face module's weights computed with the KV cache as plain tensors.

The modules compute with stacked caches [L,B,H,*,dk]; the export traces them (export/layerwise.py gives each one
the shipped interface, one cache tensor per decoder layer i < L) and the CUDA static-cache backend runs them:
  encoder:         prompt_ids [1,T] int64, visual [B,Q,d] -> encoder_out [B,S,d], cross_k_i, cross_v_i [B,H,S,dk]
  decoder_prefill: decoder_ids [B,T] int64, cross_k_i, cross_v_i -> logits [B,T,V], present_k_i, present_v_i [B,H,T,dk]
  decoder_step:    decoder_ids [B,1] int64, past_k_i, past_v_i [B,H,P,dk], cross_k_i, cross_v_i
                   -> logits [B,1,V], present_k_i, present_v_i [B,H,P+1,dk]
The forward of each wrapper is exactly the graph: tensors in, tensors out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, ln) -> torch.Tensor:
    """T5 LayerNorm: no mean, no bias, variance in fp32 (fp16 overflows here)."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    return ln.weight * (x.float() * torch.rsqrt(var + ln.variance_epsilon)).to(ln.weight.dtype)


def split_heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, h, -1).transpose(1, 2)  # [B,H,T,dk]


def attend(q, k, v, bias, o) -> torch.Tensor:
    """T5 attention: no 1/sqrt(dk) scaling, additive bias, softmax in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)) + bias
    w = F.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(w, v).transpose(1, 2)
    return o(out.reshape(out.shape[0], out.shape[1], -1))


def ffn(x: torch.Tensor, ff) -> torch.Tensor:
    """T5 FFN, gated (FLAN-T5: act(x W0) * x W1) or plain (act(x W)); output in wo's dtype (fp32 in fp16 models)."""
    h = ff.act(ff.wi_0(x)) * ff.wi_1(x) if hasattr(ff, "wi_0") else ff.act(ff.wi(x))
    return ff.wo(h.to(ff.wo.weight.dtype))


class T5EncoderGraph(nn.Module):
    """[prompt ; visual] through the T5 encoder, plus every decoder layer's cross-attention K/V."""

    def __init__(self, t5):
        super().__init__()
        self.t5 = t5

    def forward(self, prompt_ids: torch.Tensor, visual: torch.Tensor):
        emb = self.t5.shared(prompt_ids).expand(visual.shape[0], -1, -1)  # [B,T,d]
        x = torch.cat([emb, visual.to(emb.dtype)], dim=1)  # [B,S,d]
        enc = self.t5.encoder(inputs_embeds=x).last_hidden_state
        h = self.t5.config.num_heads
        ks, vs = [], []
        for blk in self.t5.decoder.block:
            att = blk.layer[1].EncDecAttention
            ks.append(split_heads(att.k(enc), h))
            vs.append(split_heads(att.v(enc), h))
        return enc, torch.stack(ks), torch.stack(vs)


class T5Decoder(nn.Module):
    """The T5 decoder over caches given as stacked tensors [L,B,H,*,dk]: `run` is the graph forms' and the CUDA
    static-cache backend's one decoder computation."""

    def __init__(self, t5):
        super().__init__()
        self.t5 = t5
        self.heads = t5.config.num_heads
        self.scale = t5.config.d_model**-0.5 if t5.config.scale_decoder_outputs else None
        # graph-local head weight: a tied head must not share its initializer with the embedding Gather
        self.head = nn.Parameter(t5.lm_head.weight.detach().clone(), requires_grad=False)

    def _position_bias(self, q_len: int, k_len, past_len) -> torch.Tensor:
        """Causal relative-position bias [1,H,T,P+T] for queries at positions past_len..past_len+T-1."""
        att = self.t5.decoder.block[0].layer[0].SelfAttention
        ctx = torch.arange(q_len, device=att.relative_attention_bias.weight.device)[:, None] + past_len
        mem = torch.arange(k_len, device=att.relative_attention_bias.weight.device)[None, :]
        rel = mem - ctx
        bucket = att._relative_position_bucket(rel, bidirectional=False, num_buckets=att.relative_attention_num_buckets,
                                               max_distance=att.relative_attention_max_distance)
        bias = att.relative_attention_bias(bucket).permute(2, 0, 1)[None]  # [1,H,T,K]
        causal = torch.where(rel > 0, torch.finfo(bias.dtype).min, 0.0).to(bias.dtype)
        return bias + causal

    def run(self, ids, past_k, past_v, cross_k, cross_v):
        dtype = self.head.dtype
        x = self.t5.decoder.embed_tokens(ids).float()  # [B,T,d]; the residual stream stays fp32 (fp16 overflows)
        t = ids.shape[1]
        past_len = 0 if past_k is None else past_k.shape[3]
        bias = self._position_bias(t, past_len + t, past_len).to(dtype)
        new_k, new_v = [], []
        for i, blk in enumerate(self.t5.decoder.block):
            sa, ca, ff = blk.layer[0], blk.layer[1], blk.layer[2]
            h = rms_norm(x, sa.layer_norm)
            k, v = split_heads(sa.SelfAttention.k(h), self.heads), split_heads(sa.SelfAttention.v(h), self.heads)
            if past_k is not None:
                k, v = torch.cat([past_k[i], k], dim=2), torch.cat([past_v[i], v], dim=2)
            new_k.append(k)
            new_v.append(v)
            x = x + attend(split_heads(sa.SelfAttention.q(h), self.heads), k, v, bias, sa.SelfAttention.o).float()
            h = rms_norm(x, ca.layer_norm)
            x = x + attend(split_heads(ca.EncDecAttention.q(h), self.heads), cross_k[i], cross_v[i], 0.0,
                           ca.EncDecAttention.o).float()
            x = x + ffn(rms_norm(x, ff.layer_norm), ff.DenseReluDense).float()
        x = rms_norm(x, self.t5.decoder.final_layer_norm)
        if self.scale is not None:
            x = x * self.scale
        logits = F.linear(x, self.head).float()  # logits in fp32
        return logits, torch.stack(new_k), torch.stack(new_v)


class T5DecoderPrefillGraph(T5Decoder):
    def forward(self, decoder_ids, cross_k, cross_v):
        return self.run(decoder_ids, None, None, cross_k, cross_v)


class T5DecoderStepGraph(T5Decoder):
    def forward(self, decoder_ids, past_k, past_v, cross_k, cross_v):
        return self.run(decoder_ids, past_k, past_v, cross_k, cross_v)

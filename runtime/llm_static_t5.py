"""T5 on CUDA in the spirit of gpt-fast: static KV cache, fp16/bf16 weights, the decode step captured in a CUDA graph.

Numerics: the residual stream stays fp32 and the FFN output projection `wo` keeps fp32 weights, because
FLAN-T5 overflows fp16 there; norms and softmax run in fp32 (see model/t5_static.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..model.scoring import decoder_inputs, pad_candidates
from ..model.t5_static import T5Decoder, T5DecoderPrefillGraph, T5EncoderGraph, attend, ffn, rms_norm, split_heads
from .llm_base import LlmBackend


class StaticT5Step(T5Decoder):
    """One decoder step at position `pos` over fixed-size caches: token [B,1], pos [1] -> logits [B,V].

    Every shape is fixed for a given (batch, max_len, max_src), so the step can be replayed as a CUDA graph.
    """

    def __init__(self, t5, batch: int, max_len: int, max_src: int):
        super().__init__(t5)
        cfg, p = t5.config, next(t5.parameters())
        shape = (cfg.num_decoder_layers, batch, cfg.num_heads, max_len, cfg.d_kv)
        self.register_buffer("k", torch.zeros(shape, dtype=p.dtype, device=p.device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=p.dtype, device=p.device), persistent=False)
        cross = (cfg.num_decoder_layers, batch, cfg.num_heads, max_src, cfg.d_kv)
        self.register_buffer("cross_k", torch.zeros(cross, dtype=p.dtype, device=p.device), persistent=False)
        self.register_buffer("cross_v", torch.zeros(cross, dtype=p.dtype, device=p.device), persistent=False)
        self.register_buffer("cross_bias", torch.zeros(1, 1, 1, max_src, dtype=p.dtype, device=p.device),
                             persistent=False)
        self.max_len = max_len

    def load_cross(self, ck: torch.Tensor, cv: torch.Tensor) -> None:
        """Copy cross K/V [L,B,H,S,dk] into the fixed buffers; padding past S is masked out."""
        s = ck.shape[3]
        self.cross_k[:, :, :, :s].copy_(ck)
        self.cross_v[:, :, :, :s].copy_(cv)
        self.cross_bias.fill_(torch.finfo(self.cross_bias.dtype).min)
        self.cross_bias[..., :s] = 0

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        dtype = self.k.dtype
        x = self.t5.decoder.embed_tokens(token).float()  # [B,1,d] residual in fp32
        bias = self._position_bias(1, self.max_len, pos).to(dtype)  # [1,H,1,max_len], masks keys after pos
        for i, blk in enumerate(self.t5.decoder.block):
            sa, ca, ff = blk.layer[0], blk.layer[1], blk.layer[2]
            h = rms_norm(x, sa.layer_norm).to(dtype)
            self.k[i].index_copy_(2, pos, split_heads(sa.SelfAttention.k(h), self.heads))
            self.v[i].index_copy_(2, pos, split_heads(sa.SelfAttention.v(h), self.heads))
            q = split_heads(sa.SelfAttention.q(h), self.heads)
            x = x + attend(q, self.k[i], self.v[i], bias, sa.SelfAttention.o).float()
            h = rms_norm(x, ca.layer_norm).to(dtype)
            q = split_heads(ca.EncDecAttention.q(h), self.heads)
            x = x + attend(q, self.cross_k[i], self.cross_v[i], self.cross_bias, ca.EncDecAttention.o).float()
            x = x + ffn(rms_norm(x, ff.layer_norm).to(dtype), ff.DenseReluDense).float()
        x = rms_norm(x, self.t5.decoder.final_layer_norm).to(dtype)
        if self.scale is not None:
            x = x * self.scale
        return torch.nn.functional.linear(x, self.head)[:, -1].float()  # [B, V]


@dataclass
class StaticState:
    next_logits: torch.Tensor
    encoder_out: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor
    pos: int = 0


class CudaGraphT5Llm(LlmBackend):
    """Encoder + scoring eager (dynamic shapes); greedy decode replays one captured CUDA graph per step.

    Give it the LLM as `T5Family.to_half` leaves it for fp16/bf16 (FFN output projections in fp32).
    """

    name = "torch-cudagraph"

    def __init__(self, t5: nn.Module, precision: str, max_len: int = 64, max_src: int = 256, graphs: bool = True):
        self.t5, self.precision = t5, precision
        self.device = next(t5.parameters()).device
        self.eos_token_id = int(t5.config.eos_token_id)
        self.start = int(t5.config.decoder_start_token_id or 0)
        self.encoder = T5EncoderGraph(t5)
        self.prefill_graph = T5DecoderPrefillGraph(t5)
        self.step_module = StaticT5Step(t5, 1, max_len, max_src)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph, self.use_graphs = None, graphs and self.device.type == "cuda"

    @torch.inference_mode()
    def _capture(self) -> None:
        """Warm up on a side stream, then capture the step (addresses of token/pos/caches fixed from here on)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.step_module(self.token, self.pos)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.step_module(self.token, self.pos)

    @torch.inference_mode()
    def prefill(self, prompt_ids, visual) -> StaticState:
        ids = torch.tensor([prompt_ids], device=self.device)
        enc, ck, cv = self.encoder(ids, visual.to(self.device, self.step_module.k.dtype))
        self.step_module.load_cross(ck, cv)
        state = StaticState(None, enc, ck, cv)
        state.next_logits = self.step(state, self.start)
        return state

    @torch.inference_mode()
    def step(self, state: StaticState, token: int) -> torch.Tensor:
        self.token.fill_(token)
        self.pos.fill_(state.pos)
        state.pos += 1
        if not self.use_graphs:
            return self.step_module(self.token, self.pos)[0]
        if self.graph is None:
            self._capture()
            self.token.fill_(token)
            self.pos.fill_(state.pos - 1)
        self.graph.replay()
        return self.out[0]

    @torch.inference_mode()
    def candidate_logits(self, state: StaticState, candidates) -> np.ndarray:
        labels, _ = pad_candidates(candidates, pad=0)
        n = len(candidates)
        dec_in = decoder_inputs(labels, self.start)
        ck, cv = (t.expand(-1, n, -1, -1, -1) for t in (state.cross_k, state.cross_v))
        logits, _, _ = self.prefill_graph(torch.as_tensor(dec_in, device=self.device), ck, cv)
        return logits.float().cpu().numpy()


CUDA_GRAPH_LLMS = {"t5": CudaGraphT5Llm}  # families with a CUDA-graph decoder, chosen in factory.py on CUDA

"""PyTorch LLM backends (CPU or CUDA; fp32/fp16/bf16), one class per family, Hugging Face modules underneath."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..model.dtypes import DTYPES
from ..model.scoring import decoder_inputs, pad_candidates
from .llm_base import LlmBackend


@dataclass
class T5State:
    encoder_out: torch.Tensor  # [1, S, d]
    cache: Any = None
    next_logits: torch.Tensor | None = None  # [V]


@dataclass
class Gpt2State:
    cache: Any
    length: int  # tokens already in the cache
    next_logits: torch.Tensor  # [V]


class _TorchLlm(LlmBackend):
    name = "torch"

    def __init__(self, llm: torch.nn.Module, precision: str = "fp32"):
        self.llm = llm
        self.precision = precision
        self.device = next(llm.parameters()).device
        # the compute dtype: weights may be stored lower and upcast per block (model.stored.fp32_compute)
        self.dtype = DTYPES[precision]
        self.eos_token_id = int(llm.config.eos_token_id)

    def _ids(self, ids) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ids), dtype=torch.long, device=self.device)


class TorchT5Llm(_TorchLlm):
    """Encoder once over [prompt ; visual]; the decoder scores candidates as one batch against that output."""

    @torch.inference_mode()
    def prefill(self, prompt_ids, visual) -> T5State:
        ids = self._ids([prompt_ids])  # [1, T]
        emb = torch.cat([self.llm.shared(ids), visual.to(self.device, self.dtype)], dim=1)  # [1, T+Q, d]
        enc = self.llm.encoder(inputs_embeds=emb).last_hidden_state
        state = T5State(encoder_out=enc)
        state.next_logits = self.step(state, self.llm.config.decoder_start_token_id)
        return state

    @torch.inference_mode()
    def step(self, state: T5State, token: int) -> torch.Tensor:
        out = self.llm(encoder_outputs=(state.encoder_out,), decoder_input_ids=self._ids([[token]]),
                       past_key_values=state.cache, use_cache=True)
        state.cache = out.past_key_values
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def candidate_logits(self, state: T5State, candidates) -> np.ndarray:
        labels, _ = pad_candidates(candidates, pad=0)
        start = self.llm.config.decoder_start_token_id
        dec_in = decoder_inputs(labels, start)
        enc = state.encoder_out.expand(len(candidates), -1, -1)  # [n, S, d]
        logits = self.llm(encoder_outputs=(enc,), decoder_input_ids=self._ids(dec_in)).logits  # [n, L, V]
        return logits.float().cpu().numpy()


class TorchGpt2Llm(_TorchLlm):
    """Prefix [prompt ; visual] once into a KV cache; candidates continue from a copy of it, as one batch."""

    @torch.inference_mode()
    def prefill(self, prompt_ids, visual) -> Gpt2State:
        ids = self._ids([prompt_ids])
        emb = torch.cat([self.llm.transformer.wte(ids), visual.to(self.device, self.dtype)], dim=1)  # [1, T+Q, d]
        n = emb.shape[1]
        out = self.llm(inputs_embeds=emb, position_ids=torch.arange(n, device=self.device)[None], use_cache=True)
        return Gpt2State(cache=out.past_key_values, length=n, next_logits=out.logits[0, -1].float())

    @torch.inference_mode()
    def step(self, state: Gpt2State, token: int) -> torch.Tensor:
        pos = torch.tensor([[state.length]], device=self.device)
        out = self.llm(input_ids=self._ids([[token]]), position_ids=pos, past_key_values=state.cache, use_cache=True)
        state.cache, state.length = out.past_key_values, state.length + 1
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def candidate_logits(self, state: Gpt2State, candidates) -> np.ndarray:
        ids, _ = pad_candidates(candidates, pad=0)
        n, length = ids.shape
        cache = copy.deepcopy(state.cache)
        cache.batch_repeat_interleave(n)
        pos = torch.arange(state.length, state.length + length, device=self.device)[None].expand(n, -1)
        logits = self.llm(input_ids=self._ids(ids), position_ids=pos, past_key_values=cache).logits  # [n, L, V]
        # token j is predicted by the logits before it: the prefix's last for j = 0
        prev = torch.cat([state.next_logits.to(logits.dtype)[None, None].expand(n, 1, -1), logits[:, :-1]], dim=1)
        return prev.float().cpu().numpy()


TORCH_LLMS = {"t5": TorchT5Llm, "gpt2": TorchGpt2Llm}

"""ONNX Runtime LLM backends over the exported graphs (fp32, INT8 or INT4, as the bundle says), one class per family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .llm_base import LlmBackend, decoder_inputs, pad_candidates, sum_logprobs
from .ort_graph import OrtGraph, host


@dataclass
class OrtState:
    next_logits: np.ndarray  # [V]
    k: Any = None  # self-attention cache [L,1,H,P,dk] (OrtValue, on the device)
    v: Any = None
    cross_k: Any = None  # T5 only: [L,1,H,S,dk]
    cross_v: Any = None


class _OrtLlm(LlmBackend):
    name = "ort"
    graph_names: tuple[str, ...]

    def __init__(self, paths: dict, precision: str, eos_token_id: int, device: str = "cpu",
                 threads: int | None = None, decoder_start_token_id: int = 0):
        self.graphs = {g: OrtGraph(paths[g], device, threads) for g in self.graph_names}
        self.precision, self.eos_token_id, self.start = precision, eos_token_id, decoder_start_token_id

    @staticmethod
    def _visual(visual) -> np.ndarray:
        return np.asarray(visual.detach().cpu().float().numpy() if hasattr(visual, "detach") else visual, np.float32)


class OrtT5Llm(_OrtLlm):
    graph_names = ("t5_encoder", "t5_decoder_prefill", "t5_decoder_step")

    def prefill(self, prompt_ids, visual) -> OrtState:
        _, ck, cv = self.graphs["t5_encoder"](prompt_ids=np.array([prompt_ids], np.int64), visual=self._visual(visual))
        logits, k, v = self.graphs["t5_decoder_prefill"](decoder_ids=np.array([[self.start]], np.int64),
                                                         cross_k=ck, cross_v=cv)
        return OrtState(host(logits)[0, -1], k, v, ck, cv)

    def step(self, state: OrtState, token: int) -> np.ndarray:
        logits, state.k, state.v = self.graphs["t5_decoder_step"](
            decoder_ids=np.array([[token]], np.int64), past_k=state.k, past_v=state.v,
            cross_k=state.cross_k, cross_v=state.cross_v)
        return host(logits)[0, -1]

    def score(self, state: OrtState, candidates) -> np.ndarray:
        labels, mask = pad_candidates(candidates, pad=0)
        n = len(candidates)
        dec_in = decoder_inputs(labels, self.start)
        ck, cv = (np.repeat(host(t), n, axis=1) for t in (state.cross_k, state.cross_v))  # [L,n,H,S,dk]
        logits = host(self.graphs["t5_decoder_prefill"](decoder_ids=dec_in, cross_k=ck, cross_v=cv)[0])
        return sum_logprobs(logits, labels, mask)


class OrtGpt2Llm(_OrtLlm):
    graph_names = ("gpt2_prefill", "gpt2_step")

    def prefill(self, prompt_ids, visual) -> OrtState:
        last, k, v = self.graphs["gpt2_prefill"](prompt_ids=np.array([prompt_ids], np.int64),
                                                 visual=self._visual(visual))
        return OrtState(host(last)[0], k, v)

    def step(self, state: OrtState, token: int) -> np.ndarray:
        logits, state.k, state.v = self.graphs["gpt2_step"](ids=np.array([[token]], np.int64),
                                                           past_k=state.k, past_v=state.v)
        return host(logits)[0, -1]

    def score(self, state: OrtState, candidates) -> np.ndarray:
        ids, mask = pad_candidates(candidates, pad=0)
        n = len(candidates)
        k, v = (np.repeat(host(t), n, axis=1) for t in (state.k, state.v))  # prefix cache for each candidate
        logits = host(self.graphs["gpt2_step"](ids=ids, past_k=k, past_v=v)[0])  # [n,L,V]
        prev = np.concatenate([np.broadcast_to(state.next_logits, (n, 1, logits.shape[-1])), logits[:, :-1]], axis=1)
        return sum_logprobs(prev, ids, mask)


ORT_LLMS = {"t5": OrtT5Llm, "gpt2": OrtGpt2Llm}

"""The LLM backend interface: prefill once, score candidate answers in one batch, greedy-decode with a KV cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..model.scoring import greedy, pad_candidates, sum_logprobs


class LlmBackend(ABC):
    """One LLM family on one runtime. `state` is whatever the backend keeps between verbs."""

    name: str  # backend name, e.g. "torch", "ort"
    precision: str
    eos_token_id: int

    @abstractmethod
    def prefill(self, prompt_ids: list[int], visual) -> Any:
        """Run the prompt + visual tokens [1, Q, d_llm] once; returns a state with `next_logits` [V]."""

    @abstractmethod
    def candidate_logits(self, state, candidates: list[list[int]]) -> np.ndarray:
        """Logits predicting each token of each candidate continuation, one batched pass -> [n, L, V] float32
        (candidates right-padded to the longest, L; positions past a candidate's end are padding)."""

    def score(self, state, candidates: list[list[int]]) -> np.ndarray:
        """Sum of log-probabilities of each candidate token sequence, one batched pass -> [n] float64."""
        ids, mask = pad_candidates(candidates, pad=0)
        return sum_logprobs(self.candidate_logits(state, candidates), ids, mask)

    @abstractmethod
    def step(self, state, token: int):
        """Feed one generated token; returns the logits [V] for the next one (KV cache kept in `state`)."""

    def generate(self, state, max_new_tokens: int) -> list[int]:
        """Greedy decoding from a prefilled state; stops at EOS (not returned) or after `max_new_tokens`."""
        return greedy(state.next_logits, lambda tok: self.step(state, tok), max_new_tokens, self.eos_token_id)[0]

"""The LLM backend interface: prefill once, score candidate answers in one batch, greedy-decode with a KV cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


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
        out: list[int] = []
        logits = state.next_logits
        for i in range(max_new_tokens):
            tok = int(logits.argmax())
            if tok == self.eos_token_id:
                break
            out.append(tok)
            if i + 1 < max_new_tokens:
                logits = self.step(state, tok)
        return out


def pad_candidates(candidates: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists -> (ids [n, L] int64, mask [n, L] bool)."""
    n, length = len(candidates), max(len(c) for c in candidates)
    ids = np.full((n, length), pad, dtype=np.int64)
    mask = np.zeros((n, length), dtype=bool)
    for i, c in enumerate(candidates):
        ids[i, : len(c)] = c
        mask[i, : len(c)] = True
    return ids, mask


def decoder_inputs(labels: np.ndarray, start: int) -> np.ndarray:
    """T5 teacher forcing: labels [n,L] -> decoder input ids [n,L] (start token, then labels shifted right)."""
    return np.concatenate([np.full((labels.shape[0], 1), start, np.int64), labels[:, :-1]], axis=1)


def sum_logprobs(prev_logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """prev_logits [n,L,V] (the logits that predict each token), ids/mask [n,L] -> sum log p per row [n] float64."""
    x = prev_logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=-1))
    picked = np.take_along_axis(x, ids[..., None], axis=-1)[..., 0]
    return ((picked - logz) * mask).sum(axis=1)

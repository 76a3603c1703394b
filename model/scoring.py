"""Answer scoring, the one copy: log-probabilities of token sequences, the diagnosis from the three answers'
log-likelihoods, and the greedy loop every decoder runs."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .prompts import ANSWERS, LABELS


def log_softmax(x) -> np.ndarray:
    """[..., V] logits -> log-probabilities, float64."""
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def pad_candidates(candidates: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
    lp = log_softmax(prev_logits)
    picked = np.take_along_axis(lp, ids[..., None], axis=-1)[..., 0]
    return (picked * mask).sum(axis=1)


def sequence_logprob(logits: torch.Tensor, ids) -> torch.Tensor:
    """logits [L,V] predicting each of `ids` [L] -> sum log p, a differentiable torch scalar (fp32)."""
    target = torch.as_tensor(ids, device=logits.device).reshape(-1, 1)
    return torch.log_softmax(logits.float(), -1).gather(-1, target).sum()


def diagnosis(loglik) -> dict:
    """Sum log p of each answer [3] (LABELS order) -> {label, probabilities (softmax over the 3), answer,
    log_likelihoods}."""
    ll = np.asarray(loglik, dtype=np.float64)
    p = np.exp(ll - ll.max())
    p /= p.sum()
    best = int(np.argmax(ll))
    return {"label": LABELS[best], "probabilities": {k: float(v) for k, v in zip(LABELS, p)},
            "answer": ANSWERS[LABELS[best]], "log_likelihoods": {k: float(s) for k, s in zip(LABELS, ll)}}


# Decision scores of the three answers: the sum of their tokens' log-likelihoods (the default), or the per-token
# mean (the answers differ in length: `Dementia` is one or two tokens, `mild cognitive impairment (MCI)` many).
SCORE_RULES = ("sum", "mean")


def answer_scores(loglik, n_tokens, rule: str = "sum") -> np.ndarray:
    """[..., 3] sum log-likelihoods and [3] (or [..., 3]) answer token counts -> [..., 3] scores under `rule`."""
    ll = np.asarray(loglik, np.float64)
    if rule == "sum":
        return ll
    if rule == "mean":
        return ll / np.asarray(n_tokens, np.float64)
    raise ValueError(f"unknown score rule {rule!r}; one of {SCORE_RULES}")


def softmax(scores) -> np.ndarray:
    """[..., k] scores -> probabilities over the last axis, float64."""
    return np.exp(log_softmax(scores))


def margins(loglik) -> np.ndarray:
    """[n, 3] per-answer log-likelihoods -> [n] gap between the best and the second-best answer (nats)."""
    top2 = np.sort(np.asarray(loglik, np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def greedy(first_logits, step: Callable[[int], object], n: int, eos: int | None = None,
           keep_logits: bool = False) -> tuple[list[int], list]:
    """Greedy decoding: from the logits [V] predicting the first token, up to `n` tokens, calling `step(token)`
    for the next logits; stops before `eos` (not returned) unless `eos` is None. -> (tokens, the logits that
    predicted each token if `keep_logits`, else [])."""
    tokens, seen, logits = [], [], first_logits
    for i in range(n):
        tok = int(logits.argmax())
        if tok == eos:
            break
        tokens.append(tok)
        if keep_logits:
            seen.append(logits)
        if i + 1 < n:
            logits = step(tok)
    return tokens, seen

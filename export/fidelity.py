"""How far an LLM backend's next-token distributions are from the fp32 reference's, on the same tokens.

Label agreement alone saturates on random weights (one answer wins by several to tens of nats), so every artifact is
also measured per token, teacher-forced on the reference's tokens: the three answers (as `classify` scores
them, one batched pass) and a greedy continuation of the prompt (as `ask` decodes it, step by step, EOS not
stopping it). Per position: does the top-1 token agree, and KL(reference || candidate) in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTINUATION_TOKENS = 60  # the published T5 code's generation limit


def log_softmax(x: np.ndarray) -> np.ndarray:
    """[..., V] logits -> log-probabilities, float64."""
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _host(x) -> np.ndarray:
    return np.asarray(x.detach().float().cpu().numpy() if hasattr(x, "detach") else x, np.float32)


@dataclass
class TokenLogits:
    """One case's teacher-forced logits: `answers` [3, L, V] with `mask` [3, L]; `continuation` [C, V] (C may be 0)."""

    answers: np.ndarray
    mask: np.ndarray
    continuation: np.ndarray


def greedy_tokens(llm, state, n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens from a prefilled state, not stopping at EOS (so every case gives n positions), and the
    logits [n, V] that predicted each."""
    out, logits, seen = [], state.next_logits, []
    for i in range(n):
        seen.append(_host(logits))
        out.append(int(seen[-1].argmax()))
        if i + 1 < n:
            logits = llm.step(state, out[-1])
    return out, _stacked(seen, state)


def follow(llm, state, tokens: list[int]) -> np.ndarray:
    """Teacher forcing from a prefilled state: the logits [len(tokens), V] predicting each of `tokens`."""
    seen = [_host(state.next_logits)] if tokens else []
    for tok in tokens[:-1]:
        seen.append(_host(llm.step(state, tok)))
    return _stacked(seen, state)


def _stacked(rows: list[np.ndarray], state) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, _host(state.next_logits).shape[-1]), np.float32)


def from_state(llm, state, answers: list[list[int]], continuation: list[int] | int) -> tuple[TokenLogits, list[int]]:
    """From a prefilled state: the logits predicting each answer token (one batched scoring pass) and each
    continuation token, `continuation` being the tokens to feed (teacher forcing) or how many to decode
    greedily (EOS not stopping it). -> (the logits, the continuation's tokens)."""
    from ..runtime.llm_base import pad_candidates

    ans = _host(llm.candidate_logits(state, answers))
    _, mask = pad_candidates(answers, pad=0)
    if isinstance(continuation, int):
        tokens, steps = greedy_tokens(llm, state, continuation)
    else:
        tokens, steps = continuation, follow(llm, state, continuation)
    return TokenLogits(ans, mask, steps), tokens


def teacher_forced(llm, prompt_ids: list[int], visual, answers: list[list[int]], continuation: list[int]) -> TokenLogits:
    """The backend's logits predicting each answer token (one batched scoring pass) and each continuation
    token (prefill, then one decode step per token fed the given tokens)."""
    return from_state(llm, llm.prefill(prompt_ids, visual), answers, continuation)[0]


def _positions(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, V] reference and candidate logits -> (top-1 agrees [N] bool, KL(ref || cand) [N] nats)."""
    lp, lq = log_softmax(ref), log_softmax(cand)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return ref.argmax(-1) == cand.argmax(-1), np.maximum(kl, 0.0)


def _summary(agree: np.ndarray, kl: np.ndarray) -> dict:
    if not agree.size:
        return {"positions": 0}
    return {"positions": int(agree.size), "top1_agreement": float(agree.mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def token_fidelity(ref: list[TokenLogits], cand: list[TokenLogits]) -> dict:
    """Per-case TokenLogits of the reference and a candidate -> top-1 agreement and KL over the answers' and
    the continuations' positions, separately and together."""
    parts = {"answers": ([], []), "continuation": ([], [])}
    for r, c in zip(ref, cand):
        agree, kl = _positions(r.answers[r.mask], c.answers[r.mask])
        parts["answers"][0].append(agree)
        parts["answers"][1].append(kl)
        n = min(len(r.continuation), len(c.continuation))
        agree, kl = _positions(r.continuation[:n], c.continuation[:n])
        parts["continuation"][0].append(agree)
        parts["continuation"][1].append(kl)
    out = {k: _summary(np.concatenate(a), np.concatenate(b)) for k, (a, b) in parts.items()}
    both = [np.concatenate(parts["answers"][i] + parts["continuation"][i]) for i in (0, 1)]
    return {**_summary(*both), **out}


def margins(loglik: np.ndarray) -> np.ndarray:
    """[n, 3] per-answer log-likelihoods -> [n] gap between the best and the second-best answer (nats)."""
    top2 = np.sort(np.asarray(loglik, np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]

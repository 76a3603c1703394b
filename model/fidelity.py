"""How far an LLM backend's next-token distributions are from the fp32 reference's, on the same tokens.

Label agreement alone saturates on random weights (one answer wins by several to tens of nats), so every artifact is
also measured per token, teacher-forced on the reference's tokens: the three answers (as `classify` scores
them, one batched pass) and a greedy continuation of the prompt (as `ask` decodes it, step by step, EOS not
stopping it). Per position: does the top-1 token agree, and KL(reference || candidate) in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MedblipError
from .prompts import LABELS
from .scoring import diagnosis, greedy, log_softmax, margins, pad_candidates

CONTINUATION_TOKENS = 60  # the published T5 code's generation limit

# vision artifacts' visual tokens against the fp32 PyTorch ones; int8 is a sanity bound (its fidelity is measured)
VISION_TOL = {"fp32": {"max_abs_err": 1e-3, "cosine": 0.9999}, "fp16": {"max_abs_err": 5e-2, "cosine": 0.999},
              "int8": {"max_abs_err": float("inf"), "cosine": 0.95}}


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """max abs error and cosine similarity of two tensors (flattened)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return {"max_abs_err": float(np.abs(a - b).max()), "cosine": cos}


def check_vision(visual, reference, precision: str, what: str) -> dict:
    """A vision artifact's visual tokens [n,Q,d] against the fp32 PyTorch ones -> {max_abs_err, cosine, volumes};
    raises parity_failed outside VISION_TOL[precision], so such an artifact never ships."""
    parity = {**compare(visual, reference), "volumes": len(reference)}
    tol = VISION_TOL[precision]
    if parity["max_abs_err"] > tol["max_abs_err"] or parity["cosine"] < tol["cosine"]:
        raise MedblipError(f"{what} ({precision}) disagrees with PyTorch: {parity}", code="parity_failed")
    return parity


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
    out, seen = greedy(state.next_logits, lambda tok: llm.step(state, tok), n, keep_logits=True)
    return out, _stacked([_host(x) for x in seen], state)


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


@dataclass
class Answers:
    """A format's answers over the evaluation cases: labels, probabilities [n,3] and log-likelihoods [n,3] (LABELS
    order), and per case the teacher-forced logits (answers, continuation) the per-token figures come from."""

    labels: list
    probabilities: np.ndarray
    loglik: np.ndarray
    logits: list

    @classmethod
    def from_logliks(cls, loglik, logits: list) -> "Answers":
        """[n,3] log-likelihoods -> the labels and probabilities `diagnose` gives for them."""
        loglik = np.asarray(loglik, np.float64)
        rows = [diagnosis(ll) for ll in loglik]
        return cls([r["label"] for r in rows], np.array([[r["probabilities"][k] for k in LABELS] for r in rows]),
                   loglik, logits)

    def take(self, keep: list[int]) -> "Answers":
        return Answers([self.labels[c] for c in keep], self.probabilities[keep], self.loglik[keep],
                       [self.logits[c] for c in keep])


def agreement(cand: Answers, ref: Answers) -> dict:
    """The one comparison of a format with the fp32 reference on the same cases: label agreement, probability and
    log-likelihood differences, the reference's smallest margin between its two best answers (how far a label was
    from flipping) and the per-token top-1 agreement and KL."""
    d = cand.loglik - ref.loglik
    return {"cases": len(ref.labels),
            "label_agreement": float(np.mean([a == b for a, b in zip(cand.labels, ref.labels)])),
            "max_abs_prob_diff": float(np.abs(cand.probabilities - ref.probabilities).max()),
            "max_abs_loglik_diff": float(np.abs(d).max()), "mean_abs_loglik_diff": float(np.abs(d).mean()),
            "loglik_diff": {k: float(x) for k, x in zip(LABELS, d.max(axis=0))},
            "min_margin_nats": float(margins(ref.loglik).min()),
            "tokens": token_fidelity(ref.logits, cand.logits)}

"""Evaluation cases at a decision's edge: visual tokens moved until the fp32 reference's two best answers are
within a fraction of a nat of each other.

With random weights the three answers' log-likelihoods differ by several to tens of nats (they differ in length by several
tokens, each costing about log V), so no format could flip a label on the regular cases and label agreement
would measure nothing. From a regular case's visual tokens, gradient steps on those tokens alone (the model
is frozen) shrink the gap between the reference's two best answers below NEAR_TIE_NATS; a format whose
log-likelihoods move by more than that flips the label there.
"""

from __future__ import annotations

import torch

from ..model.prompts import ANSWERS, LABELS
from ..model.reference import ReferencePipeline
from ..model.scoring import sequence_logprob

NEAR_TIE_NATS = 0.5
MAX_STEPS = 60


def _logliks(ref: ReferencePipeline, visual: torch.Tensor, text: str) -> torch.Tensor:
    """[3] sum log p of each answer, differentiable in `visual` [1,Q,d]."""
    out = []
    for k in LABELS:
        ids = ref.family.answer_ids(ref.tokenizer, ANSWERS[k])
        out.append(sequence_logprob(ref.answer_logits(visual, text, ANSWERS[k]), ids))
    return torch.stack(out)


def near_tie(ref: ReferencePipeline, visual: torch.Tensor, text: str, target: float = NEAR_TIE_NATS,
             max_steps: int = MAX_STEPS) -> tuple[torch.Tensor, float, int]:
    """visual [1,Q,d] -> (visual tokens after the steps, |gap| between the two answers that were best at the start,
    steps taken). Best effort: how far the visual tokens can move an answer is the model's (a GPT-2's final
    LayerNorm bounds how unlikely the tokens right after them can become); the manifest records each case's margin."""
    for p in ref.model.parameters():
        p.requires_grad_(False)
    v = visual.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=0.3 * float(visual.std()))
    with torch.no_grad():
        a, b = _logliks(ref, v, text).topk(2).indices.tolist()
    gap, step = float("inf"), 0
    for step in range(max_steps + 1):
        ll = _logliks(ref, v, text)
        gap = abs(float((ll[a] - ll[b]).detach()))
        if gap < target or step == max_steps:
            break
        opt.zero_grad()
        (ll[a] - ll[b]).abs().backward()
        opt.step()
    return v.detach(), gap, step

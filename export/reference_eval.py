"""The fp32 PyTorch reference on the export's evaluation set: what every artifact is compared against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.prompts import LABELS
from ..runtime.llm_torch import TORCH_LLMS
from ..runtime.tasks import Tasks
from .evalset import eval_cases, eval_volumes
from .fidelity import CONTINUATION_TOKENS, TokenLogits, greedy_tokens, margins, teacher_forced, token_fidelity

CONTINUATION_CASES = 2  # cases that also get a greedy continuation (60 decode steps each, per artifact)


@dataclass
class ReferenceEval:
    volumes: torch.Tensor  # [n,1,S,S,S]
    visual: torch.Tensor  # [n,Q,d_llm] fp32
    cases: list  # (volume index, patient text)
    probabilities: np.ndarray  # [n_cases, 3]
    loglik: np.ndarray  # [n_cases, 3] sum log p of each answer
    labels: list
    greedy_ids: list  # per case, the greedy answer tokens to the diagnosis question
    continuations: list  # per case, CONTINUATION_TOKENS greedy tokens not stopped by EOS ([] past the first cases)
    logits: list  # per case, the fp32 TokenLogits on the answers and the continuation
    tasks: Tasks

    @classmethod
    @torch.inference_mode()
    def run(cls, model, tokenizer, n: int = 4) -> "ReferenceEval":
        volumes = eval_volumes(n, model.cfg.vision.image_size)
        visual = torch.cat([model.visual_tokens(volumes[i:i + 1]) for i in range(n)]).float()
        tasks = Tasks(model.family, tokenizer, model.family.max_new_tokens)
        llm = TORCH_LLMS[model.cfg.variant](model.llm, "fp32")
        cases = eval_cases(n)
        labels, probs, loglik = _diagnose_all(tasks, llm, visual, cases)
        greedy = [tasks.ask_ids(llm, visual[i:i + 1], text) for i, text in cases[:CONTINUATION_CASES]]
        conts = [greedy_tokens(llm, llm.prefill(tasks.prompt_ids(text), visual[i:i + 1]), CONTINUATION_TOKENS)
                 if k < CONTINUATION_CASES else [] for k, (i, text) in enumerate(cases)]
        ref = cls(volumes, visual, cases, probs, loglik, labels, greedy, conts, [], tasks)
        ref.logits = ref.token_logits(llm)
        return ref

    def token_logits(self, llm, visual: torch.Tensor | None = None) -> list[TokenLogits]:
        """Teacher-forced logits of a backend on every case's answers and continuation."""
        visual = self.visual if visual is None else visual
        return [teacher_forced(llm, self.tasks.prompt_ids(text), visual[i:i + 1], self.tasks.answer_ids, cont)
                for (i, text), cont in zip(self.cases, self.continuations)]

    def compare(self, llm, visual: torch.Tensor | None = None) -> dict:
        """Run an LLM backend (optionally on other visual tokens) over the cases -> agreement and fidelity."""
        visual = self.visual if visual is None else visual
        labels, probs, loglik = _diagnose_all(self.tasks, llm, visual, self.cases)
        d_ll = np.abs(loglik - self.loglik)
        return {"label_agreement": float(np.mean([a == b for a, b in zip(labels, self.labels)])),
                "max_abs_prob_diff": float(np.abs(probs - self.probabilities).max()),
                "max_abs_loglik_diff": float(d_ll.max()), "mean_abs_loglik_diff": float(d_ll.mean()),
                "loglik_diff": {k: float(d) for k, d in zip(LABELS, (loglik - self.loglik).max(axis=0))},
                "min_margin_nats": float(margins(self.loglik).min()),
                "tokens": token_fidelity(self.logits, self.token_logits(llm, visual)),
                "cases": len(self.cases)}

    def greedy_match(self, llm) -> bool:
        """Identical greedy tokens on the first cases."""
        return all(self.tasks.ask_ids(llm, self.visual[i:i + 1], text) == ids
                   for (i, text), ids in zip(self.cases, self.greedy_ids))

    def as_manifest(self) -> dict:
        return {"volumes": "export.evalset.eval_volumes(n, size, seed=1234)", "cases": [
            {"volume": i, "patient_text": t, "label": lab, "probabilities": dict(zip(LABELS, map(float, p))),
             "log_likelihoods": dict(zip(LABELS, map(float, ll))), "margin_nats": float(m)}
            for (i, t), lab, p, ll, m in zip(self.cases, self.labels, self.probabilities, self.loglik,
                                             margins(self.loglik))]}


def _diagnose_all(tasks: Tasks, llm, visual: torch.Tensor, cases) -> tuple[list, np.ndarray, np.ndarray]:
    """Diagnose every (volume index, patient text) case -> (labels, probabilities [n,3], log-likelihoods [n,3])."""
    rows = [tasks.diagnose(llm, visual[i:i + 1], text) for i, text in cases]
    probs = np.array([[r["probabilities"][k] for k in LABELS] for r in rows])
    loglik = np.array([[r["log_likelihoods"][k] for k in LABELS] for r in rows])
    return [r["label"] for r in rows], probs, loglik

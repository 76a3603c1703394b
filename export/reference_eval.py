"""The fp32 PyTorch reference on the export's evaluation set: what every artifact is compared against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.prompts import LABELS
from ..runtime.llm_torch import TORCH_LLMS
from ..runtime.tasks import Tasks
from .evalset import eval_cases, eval_volumes


@dataclass
class ReferenceEval:
    volumes: torch.Tensor  # [n,1,S,S,S]
    visual: torch.Tensor  # [n,Q,d_llm] fp32
    cases: list  # (volume index, patient text)
    probabilities: np.ndarray  # [n_cases, 3]
    loglik: np.ndarray  # [n_cases, 3] sum log p of each answer
    labels: list
    greedy_ids: list  # per case, the greedy answer tokens to the diagnosis question
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
        greedy = [tasks.ask_ids(llm, visual[i:i + 1], text) for i, text in cases[:2]]
        return cls(volumes, visual, cases, probs, loglik, labels, greedy, tasks)

    def compare(self, llm, visual: torch.Tensor | None = None) -> dict:
        """Run an LLM backend (optionally on other visual tokens) over the cases -> agreement figures."""
        visual = self.visual if visual is None else visual
        labels, probs, loglik = _diagnose_all(self.tasks, llm, visual, self.cases)
        return {"label_agreement": float(np.mean([a == b for a, b in zip(labels, self.labels)])),
                "max_abs_prob_diff": float(np.abs(probs - self.probabilities).max()),
                "max_abs_loglik_diff": float(np.abs(loglik - self.loglik).max()),
                "cases": len(self.cases)}

    def greedy_match(self, llm) -> bool:
        """Identical greedy tokens on the first cases."""
        return all(self.tasks.ask_ids(llm, self.visual[i:i + 1], text) == ids
                   for (i, text), ids in zip(self.cases, self.greedy_ids))

    def as_manifest(self) -> dict:
        return {"volumes": "export.evalset.eval_volumes(n, size, seed=1234)", "cases": [
            {"volume": i, "patient_text": t, "label": lab, "probabilities": dict(zip(LABELS, map(float, p)))}
            for (i, t), lab, p in zip(self.cases, self.labels, self.probabilities)]}


def _diagnose_all(tasks: Tasks, llm, visual: torch.Tensor, cases) -> tuple[list, np.ndarray, np.ndarray]:
    """Diagnose every (volume index, patient text) case -> (labels, probabilities [n,3], log-likelihoods [n,3])."""
    rows = [tasks.diagnose(llm, visual[i:i + 1], text) for i, text in cases]
    probs = np.array([[r["probabilities"][k] for k in LABELS] for r in rows])
    loglik = np.array([[r["log_likelihoods"][k] for k in LABELS] for r in rows])
    return [r["label"] for r in rows], probs, loglik

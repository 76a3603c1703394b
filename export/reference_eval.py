"""The fp32 PyTorch reference on the export's evaluation set: what every artifact is compared against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.prompts import LABELS
from ..runtime.llm_torch import TORCH_LLMS
from ..runtime.reference import ReferencePipeline
from ..runtime.tasks import Tasks
from .evalset import eval_cases, eval_volumes
from .fidelity import CONTINUATION_TOKENS, TokenLogits, greedy_tokens, margins, teacher_forced, token_fidelity
from .near_ties import near_tie

CONTINUATION_CASES = 2  # cases that also get a greedy continuation (60 decode steps each, per artifact)


@dataclass
class ReferenceEval:
    volumes: torch.Tensor  # [n,1,S,S,S]
    visual: torch.Tensor  # [n + k,Q,d_llm] fp32: the volumes' visual tokens, then k near-tie cases' (near_ties.py)
    cases: list  # (row of `visual`, patient text)
    probabilities: np.ndarray  # [n_cases, 3]
    loglik: np.ndarray  # [n_cases, 3] sum log p of each answer
    labels: list
    greedy_ids: list  # per case, the greedy answer tokens to the diagnosis question
    continuations: list  # per case, CONTINUATION_TOKENS greedy tokens not stopped by EOS ([] past the first cases)
    logits: list  # per case, the fp32 TokenLogits on the answers and the continuation
    tasks: Tasks
    near_ties: list  # per near-tie case: {"from_volume", "steps"}

    @classmethod
    def run(cls, model, tokenizer, n: int = 4, near_ties: int = 0,
            near_visual: torch.Tensor | None = None) -> "ReferenceEval":
        """The reference on n volumes x patient texts, plus `near_ties` cases made from the first ones (or, given
        `near_visual` [k,Q,d] from a bundle, those cases' visual tokens as they were made)."""
        with torch.inference_mode():
            volumes = eval_volumes(n, model.cfg.vision.image_size)
            visual = torch.cat([model.visual_tokens(volumes[i:i + 1]) for i in range(n)]).float()
        cases = eval_cases(n)
        k = near_ties if near_visual is None else len(near_visual)
        near, info = [], []
        for j, (i, text) in enumerate(cases[:k]):
            if near_visual is None:
                v, _, steps = near_tie(ReferencePipeline(model, tokenizer), visual[i:i + 1], text)
            else:
                v, steps = near_visual[j:j + 1], None
            near.append(v)
            info.append({"from_volume": i, "steps": steps})
            cases.append((n + j, text))
        return cls._measure(model, tokenizer, volumes, torch.cat([visual, *near]), cases, info)

    @classmethod
    @torch.inference_mode()
    def _measure(cls, model, tokenizer, volumes, visual, cases, info) -> "ReferenceEval":
        tasks = Tasks(model.family, tokenizer, model.family.max_new_tokens)
        llm = TORCH_LLMS[model.cfg.variant](model.llm, "fp32")
        labels, probs, loglik = _diagnose_all(tasks, llm, visual, cases)
        greedy = [tasks.ask_ids(llm, visual[i:i + 1], text) for i, text in cases[:CONTINUATION_CASES]]
        conts = [greedy_tokens(llm, llm.prefill(tasks.prompt_ids(text), visual[i:i + 1]), CONTINUATION_TOKENS)
                 if k < CONTINUATION_CASES else [] for k, (i, text) in enumerate(cases)]
        ref = cls(volumes, visual, cases, probs, loglik, labels, greedy, conts, [], tasks, info)
        ref.logits = ref.token_logits(llm, visual, range(len(cases)))
        return ref

    @property
    def volume_visual(self) -> torch.Tensor:
        """[n,Q,d] the evaluation volumes' visual tokens (what a vision artifact must reproduce)."""
        return self.visual[:len(self.volumes)]

    @property
    def near_tie_visual(self) -> torch.Tensor:
        """[k,Q,d] the near-tie cases' visual tokens (the bundle keeps them for the benchmark)."""
        return self.visual[len(self.volumes):]

    def token_logits(self, llm, visual: torch.Tensor, keep) -> list[TokenLogits]:
        """Teacher-forced logits of a backend on the answers and continuation of the cases numbered `keep`."""
        return [teacher_forced(llm, self.tasks.prompt_ids(self.cases[c][1]), visual[self.cases[c][0]][None],
                               self.tasks.answer_ids, self.continuations[c]) for c in keep]

    def compare(self, llm, visual: torch.Tensor | None = None) -> dict:
        """Run an LLM backend over the cases -> agreement and fidelity. Given other visual tokens for the
        volumes (a vision artifact's, [n,Q,d]), only the volumes' cases are compared."""
        visual = self.visual if visual is None else visual
        keep = [c for c, (i, _) in enumerate(self.cases) if i < len(visual)]
        labels, probs, loglik = _diagnose_all(self.tasks, llm, visual, [self.cases[c] for c in keep])
        ref_ll = self.loglik[keep]
        d_ll = np.abs(loglik - ref_ll)
        return {"label_agreement": float(np.mean([a == self.labels[c] for a, c in zip(labels, keep)])),
                "max_abs_prob_diff": float(np.abs(probs - self.probabilities[keep]).max()),
                "max_abs_loglik_diff": float(d_ll.max()), "mean_abs_loglik_diff": float(d_ll.mean()),
                "loglik_diff": {k: float(d) for k, d in zip(LABELS, (loglik - ref_ll).max(axis=0))},
                "min_margin_nats": float(margins(ref_ll).min()),
                "tokens": token_fidelity([self.logits[c] for c in keep], self.token_logits(llm, visual, keep)),
                "cases": len(keep)}

    def greedy_match(self, llm) -> bool:
        """Identical greedy tokens on the first cases."""
        return all(self.tasks.ask_ids(llm, self.visual[i:i + 1], text) == ids
                   for (i, text), ids in zip(self.cases, self.greedy_ids))

    def as_manifest(self) -> dict:
        """Cases name their volume, or (near ties) their row in the bundle's evaluation/near_ties.npy."""
        n, out = len(self.volumes), []
        for (i, t), lab, p, ll, m in zip(self.cases, self.labels, self.probabilities, self.loglik,
                                         margins(self.loglik)):
            where = {"volume": i} if i < n else {"near_tie": i - n, **self.near_ties[i - n]}
            out.append({**where, "patient_text": t, "label": lab, "probabilities": dict(zip(LABELS, map(float, p))),
                        "log_likelihoods": dict(zip(LABELS, map(float, ll))), "margin_nats": float(m)})
        return {"volumes": "export.evalset.eval_volumes(n, size, seed=1234)", "cases": out}


def _diagnose_all(tasks: Tasks, llm, visual: torch.Tensor, cases) -> tuple[list, np.ndarray, np.ndarray]:
    """Diagnose every (volume index, patient text) case -> (labels, probabilities [n,3], log-likelihoods [n,3])."""
    rows = [tasks.diagnose(llm, visual[i:i + 1], text) for i, text in cases]
    probs = np.array([[r["probabilities"][k] for k in LABELS] for r in rows])
    loglik = np.array([[r["log_likelihoods"][k] for k in LABELS] for r in rows])
    return [r["label"] for r in rows], probs, loglik

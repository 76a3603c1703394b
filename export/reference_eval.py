"""The fp32 PyTorch reference on the export's evaluation set: what every artifact is compared against.

The budget: every case is diagnosed (one prefill, the three answers scored in one pass) and the first
cases also get a greedy continuation of the prompt, teacher-forced on every artifact. At the paper's
sizes each reference decode step upcasts ~1.4 B stored weights to fp32 and an artifact's step streams
GBs, so fewer cases and a shorter continuation are checked there; the budget used is in the manifest.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..model.evalset import eval_cases, eval_volumes
from ..model.fidelity import CONTINUATION_TOKENS, Answers, TokenLogits, agreement, from_state
from ..model.prompts import LABELS
from ..model.reference import ReferencePipeline
from ..model.scoring import margins, pad_candidates, sum_logprobs
from ..model.stored import fp32_compute, release_module
from ..model.tasks import Tasks
from .near_ties import near_tie
from .parity import torch_llm

PAPER_LLM_PARAMETERS = 1e9  # LLMs this large get the paper-size budget


@dataclass(frozen=True)
class EvalBudget:
    cases: int  # (volume, patient text) pairs, each diagnosed
    continuation_cases: int  # the first of them also get a greedy continuation ...
    continuation_tokens: int  # ... this long (EOS not stopping it)
    why: str
    near_ties: int = 0  # cases made to sit at a decision's edge (near_ties.py), from the first volumes

    @classmethod
    def for_model(cls, model, cases: int | None = None, near_ties: int = 2) -> "EvalBudget":
        llm = sum(p.numel() for p in model.llm.parameters())
        if llm >= PAPER_LLM_PARAMETERS:
            return cls(cases or 2, 1, 16, f"paper size ({llm / 1e9:.2f} B LLM parameters): each fp32 reference "
                                         "decode step upcasts the stored decoder, so 1 continuation of 16 tokens; "
                                         "no near-tie cases (their gradient steps would need the model in fp32)")
        return cls(cases or 4, 2, CONTINUATION_TOKENS, "full: 60-token continuations, the published T5 limit",
                   min(near_ties, cases or 4))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReferenceEval:
    volumes: torch.Tensor  # [n,1,S,S,S]
    visual: torch.Tensor  # [n + k,Q,d_llm] fp32: the volumes' visual tokens, then k near-tie cases' (near_ties.py)
    cases: list  # (row of `visual`, patient text)
    answers: Answers  # labels, probabilities and log-likelihoods [n_cases, 3], and per case the fp32 TokenLogits
    continuations: list  # per case, greedy tokens not stopped by EOS ([] past the continuation cases)
    tasks: Tasks
    eos: int
    budget: EvalBudget
    near_ties: list  # per near-tie case: {"from_volume", "steps"}

    @classmethod
    def run(cls, model, tokenizer, budget: EvalBudget, near_visual: torch.Tensor | None = None) -> "ReferenceEval":
        """The fp32 model's answers on the budget's volumes x patient texts, plus budget.near_ties cases made from
        the first ones (or, given `near_visual` [k,Q,d] from a bundle, those cases' visual tokens as they were made).
        `model` may hold its weights as stored (computed in fp32 per block)."""
        with torch.inference_mode(), fp32_compute(model):
            volumes = eval_volumes(budget.cases, model.cfg.vision.image_size)
            visual = torch.cat([model.visual_tokens(volumes[i:i + 1]) for i in range(budget.cases)]).float()
            release_module(model)  # the image half's pages: not needed again here
        cases = eval_cases(budget.cases)
        near, info = _near_ties(model, tokenizer, visual, cases, budget.near_ties, near_visual)
        cases += [(budget.cases + j, text) for j, (_, text) in enumerate(cases[:len(near)])]
        return cls._measure(model, tokenizer, budget, volumes, torch.cat([visual, *near]), cases, info)

    @classmethod
    @torch.inference_mode()
    def _measure(cls, model, tokenizer, budget, volumes, visual, cases, info) -> "ReferenceEval":
        with fp32_compute(model):
            tasks = Tasks(model.family, tokenizer, model.family.max_new_tokens)
            llm = torch_llm(model, "fp32")
            lengths = [budget.continuation_tokens if k < budget.continuation_cases else 0 for k in range(len(cases))]
            logits, conts = _run_cases(tasks, llm, visual, cases, lengths)
        return cls(volumes, visual, cases, Answers.from_logliks(_logliks(logits, tasks), logits), conts, tasks,
                   llm.eos_token_id, budget, info)

    @property
    def volume_visual(self) -> torch.Tensor:
        """[n,Q,d] the evaluation volumes' visual tokens (what a vision artifact must reproduce)."""
        return self.visual[:len(self.volumes)]

    @property
    def near_tie_visual(self) -> torch.Tensor:
        """[k,Q,d] the near-tie cases' visual tokens (the bundle keeps them for the benchmark)."""
        return self.visual[len(self.volumes):]

    def compare(self, llm, visual: torch.Tensor | None = None) -> dict:
        """Run an LLM backend over the cases -> agreement and fidelity. Given other visual tokens for the
        volumes (a vision artifact's, [n,Q,d]), only the volumes' cases are compared.

        One prefill per case: the three answers scored from it (what `classify` computes) and the reference's
        continuation teacher-forced from it. greedy_tokens_identical: every top-1 along the reference's greedy
        answer (up to EOS or the generation limit, within the continuation checked) agrees, so free-running
        greedy decoding gives the same answer."""
        visual = self.visual if visual is None else visual
        keep = [c for c, (i, _) in enumerate(self.cases) if i < len(visual)]
        cand, _ = _run_cases(self.tasks, llm, visual, [self.cases[c] for c in keep],
                             [self.continuations[c] for c in keep])
        return {**agreement(Answers.from_logliks(_logliks(cand, self.tasks), cand), self.answers.take(keep)),
                "greedy_tokens_identical": self._greedy_identical(cand, keep)}

    def prefill_and_score(self, llm) -> None:
        """Run `llm` over every case's prefill and answer scoring, no continuation (what calibration hooks watch)."""
        _run_cases(self.tasks, llm, self.visual, self.cases, [[] for _ in self.cases])

    def calibrate(self, llm, visual: torch.Tensor, continuation: int) -> None:
        """Run `llm` on other visual tokens [n,Q,d] (volume i with patient text i, as eval_cases pairs them): each
        case's prefill, answer scoring and a greedy continuation of `continuation` tokens (what calibration hooks
        watch: the decoder then sees generated tokens too, not only the answers')."""
        cases = eval_cases(len(visual))
        _run_cases(self.tasks, llm, visual, cases, [continuation] * len(cases))

    def _answer(self, tokens: list[int], with_eos: bool = False) -> list[int]:
        """A continuation as `ask` returns it: cut at the generation limit and at EOS (kept if `with_eos`)."""
        out = tokens[:self.tasks.max_new_tokens]
        return out[:out.index(self.eos) + with_eos] if self.eos in out else out

    def _greedy_identical(self, cand: list[TokenLogits], keep: list[int]) -> bool:
        for c, logits in zip(keep, cand):
            answer = self._answer(self.continuations[c], with_eos=True)  # predicting the EOS is part of the answer
            if any(int(logits.continuation[j].argmax()) != t for j, t in enumerate(answer)):
                return False
        return True

    def greedy_match(self, llm) -> bool:
        """Identical free-running greedy answers on the continuation cases (as medblip-infer --question runs)."""
        n = self.budget.continuation_cases  # a continuation shorter than the answer checks the answer's start
        return all(self.tasks.ask_ids(llm, self.visual[i:i + 1], text)[:len(tokens)] == self._answer(tokens)
                   for (i, text), tokens in list(zip(self.cases, self.continuations))[:n])

    def as_manifest(self) -> dict:
        """Cases name their volume, or (near ties) their row in the bundle's evaluation/near_ties.npy."""
        n, out = len(self.volumes), []
        a = self.answers
        for (i, t), lab, p, ll, m in zip(self.cases, a.labels, a.probabilities, a.loglik, margins(a.loglik)):
            where = {"volume": i} if i < n else {"near_tie": i - n, **self.near_ties[i - n]}
            out.append({**where, "patient_text": t, "label": lab, "probabilities": dict(zip(LABELS, map(float, p))),
                        "log_likelihoods": dict(zip(LABELS, map(float, ll))), "margin_nats": float(m)})
        return {"volumes": "model.evalset.eval_volumes(n, size, seed=1234)", "budget": self.budget.as_dict(),
                "cases": out}


def _near_ties(model, tokenizer, visual: torch.Tensor, cases, k: int, given: torch.Tensor | None):
    """-> ([1,Q,d] visual tokens per near-tie case, [{"from_volume", "steps"}]): made by gradient steps on an fp32
    copy of the model (stored low-precision weights cannot be upcast in place under autograd), or as given."""
    if given is not None:
        return [given[j:j + 1] for j in range(len(given))], [{"from_volume": i, "steps": None}
                                                             for i, _ in cases[:len(given)]]
    if not k:
        return [], []
    fp32 = copy.deepcopy(model).float()
    ref = ReferencePipeline(fp32, tokenizer)
    made = [near_tie(ref, visual[i:i + 1], text) for i, text in cases[:k]]
    del fp32, ref
    return [v for v, _, _ in made], [{"from_volume": i, "steps": steps} for (i, _), (_, _, steps) in zip(cases, made)]


def _run_cases(tasks: Tasks, llm, visual: torch.Tensor, cases, continuations) -> tuple[list[TokenLogits], list]:
    """Per case one prefill, the answers' logits from it, then a continuation: `continuations[k]` a token list
    (teacher-forced) or a length (greedy, EOS not stopping it). -> (TokenLogits per case, the tokens)."""
    out = [from_state(llm, llm.prefill(tasks.prompt_ids(text), visual[i:i + 1]), tasks.answer_ids, cont)
           for (i, text), cont in zip(cases, continuations)]
    return [logits for logits, _ in out], [tokens for _, tokens in out]


def _logliks(logits: list[TokenLogits], tasks: Tasks) -> np.ndarray:
    """[n_cases, 3] sum log p of each answer, from the answers' logits (what LlmBackend.score computes)."""
    ids, mask = pad_candidates(tasks.answer_ids, pad=0)
    return np.stack([sum_logprobs(t.answers, ids, mask) for t in logits])

"""Quality next to speed: each row's diagnoses on the evaluation volumes, compared with the fp32 torch backend."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.evalset import eval_volumes
from ..model.fidelity import Answers, TokenLogits, agreement as compare_answers, greedy_tokens, teacher_forced
from ..model.prompts import ANSWERS, LABELS
from ..model.scoring import diagnosis, pad_candidates, sum_logprobs


@dataclass
class EvalSet:
    """The bundle's evaluation set: volumes [n,1,S,S,S] (regenerated, seed 1234), the near-tie cases' visual
    tokens [k,Q,d] (stored in the bundle), and cases (row, patient text): rows < n are volumes, then near ties."""

    volumes: torch.Tensor
    near: torch.Tensor | None
    cases: list
    budget: dict  # the export's evaluation budget (continuation cases and length)

    def visual(self, vision, device: str = "cpu") -> dict[int, torch.Tensor]:
        """row -> visual tokens [1,Q,d]: `vision(volume [1,1,S,S,S])` for a volume, the stored tokens for a near tie."""
        n = len(self.volumes)
        return {i: vision(self.volumes[i:i + 1]) if i < n else self.near[i - n][None].to(device)
                for i in sorted({i for i, _ in self.cases})}


def eval_set(bundle) -> EvalSet:
    m = bundle.manifest
    listed = m["evaluation"]["cases"]
    n = 1 + max(int(c["volume"]) for c in listed if "volume" in c)
    cases = [(int(c["volume"]) if "volume" in c else n + int(c["near_tie"]), c["patient_text"]) for c in listed]
    near = torch.from_numpy(np.load(bundle.path("evaluation"))) if bundle.has("evaluation") else None
    return EvalSet(eval_volumes(n, m["preprocess"]["size"]), near, cases, m["evaluation"]["budget"])


def _answers(rows: list[dict], logits: list[TokenLogits]) -> Answers:
    """Diagnosis rows ({label, probabilities, log_likelihoods}) and their teacher-forced logits -> Answers."""
    return Answers([r["label"] for r in rows], np.array([[r["probabilities"][k] for k in LABELS] for r in rows]),
                   np.array([[r["log_likelihoods"][k] for k in LABELS] for r in rows]), logits)


@torch.inference_mode()
def continuations(pipe, evalset: EvalSet) -> list[list[int]]:
    """The baseline's greedy continuation (EOS not stopping it) for the first cases, [] for the rest; how many
    and how long as the export's evaluation budget (fewer at the paper's sizes)."""
    n, length = evalset.budget["continuation_cases"], evalset.budget["continuation_tokens"]
    out = []
    for k, (i, text) in enumerate(evalset.cases):
        if k >= n:
            out.append([])
            continue
        state = pipe.llm.prefill(pipe.tasks.prompt_ids(text), pipe.visual_tokens(evalset.volumes[i:i + 1]))
        out.append(greedy_tokens(pipe.llm, state, length)[0])
    return out


@torch.inference_mode()
def pipeline_results(pipe, evalset: EvalSet, conts: list[list[int]]) -> Answers:
    """Pipeline verbs (vision at batch 1, classify) over every case -> labels, probabilities [n,3], log-liks [n,3],
    and the teacher-forced logits on the answers and the continuations `conts`."""
    visual = evalset.visual(pipe.visual_tokens)
    tasks = pipe.tasks
    return _answers([pipe.classify(visual[i], text) for i, text in evalset.cases],
                    [teacher_forced(pipe.llm, tasks.prompt_ids(text), visual[i], tasks.answer_ids, cont)
                     for (i, text), cont in zip(evalset.cases, conts)])


@torch.no_grad()
def reference_results(ref, evalset: EvalSet, device: str = "cpu") -> Answers:
    """The reference's diagnoses over every case: its one-pass-per-answer logits, which decide diagnose()'s
    label and probabilities (its generated text does not, so generate is not rerun here)."""
    rows, logits = [], []
    visual = evalset.visual(lambda v: ref.visual_tokens(v.to(device)), device)
    cases = evalset.cases
    answer_ids = [ref.family.answer_ids(ref.tokenizer, ANSWERS[k]) for k in LABELS]
    ids, mask = pad_candidates(answer_ids, pad=0)
    for i, text in cases:
        per = [ref.answer_logits(visual[i], text, ANSWERS[k]).cpu().numpy() for k in LABELS]  # [L_k, V] each
        padded = np.zeros((len(per), ids.shape[1], per[0].shape[-1]), np.float32)
        for k, lg in enumerate(per):
            padded[k, : len(lg)] = lg
        logits.append(TokenLogits(padded, mask, np.zeros((0, padded.shape[-1]), np.float32)))
        rows.append(diagnosis(sum_logprobs(padded, ids, mask)))
    return _answers(rows, logits)


def agreement(results: Answers, baseline: Answers, vs: str) -> dict:
    """`results` against `baseline` (model/fidelity.agreement), saying what the baseline was."""
    return {"vs": vs, **compare_answers(results, baseline)}


def manifest_agreement(results: Answers, manifest: dict) -> dict:
    """The torch fp32 results against the figures the export recorded (a check that the baseline is the bundle's)."""
    cases = manifest["evaluation"]["cases"]
    probs = np.array([[c["probabilities"][k] for k in LABELS] for c in cases])
    same = [a == c["label"] for a, c in zip(results.labels, cases)]
    return {"label_agreement": float(np.mean(same)),
            "max_abs_prob_diff": float(np.abs(results.probabilities - probs).max())}

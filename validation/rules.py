"""Decision rules side by side, each turning a bundle's rows into decisions (and probabilities where it has them).

- `published`: the published code's zero-shot classification: the greedy answer to the diagnosis question
  compared with the three answer strings (case and spacing ignored); an answer that matches none is
  "no decision" (-1), counted, never dropped. No probabilities.
- `sum`: the answer with the highest sum of its tokens' log-likelihoods; softmax over the sums (today's default,
  the `label` and `probabilities` of every medblip-infer row).
- `mean`: the highest per-token mean log-likelihood; softmax over the means.
- `calibrated`: softmax((sum + bias) / temperature), fitted on a calibration split (calibrate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.calibration import calibrated_probabilities
from ..model.prompts import ANSWERS, LABELS
from ..model.scoring import answer_scores, softmax


class Unavailable(Exception):
    """A rule that cannot run on these rows (e.g. the published rule without greedy answers); says why."""


@dataclass
class RowData:
    """What the rules read from one bundle's result rows (failed scans left out)."""

    loglik: np.ndarray  # [n, 3] sum log-likelihood per answer, AD, MCI, NC
    n_tokens: np.ndarray  # [n, 3] answer token counts
    greedy: list | None  # greedy answer texts, or None when the rows lack them

    @classmethod
    def from_rows(cls, rows: list[dict], answer_tokens: dict | None = None) -> "RowData":
        """Rows of medblip-infer (with --decision-detail for the published rule); `answer_tokens` from the bundle's
        tokenizer where the rows lack them."""
        ll = np.array([[r["log_likelihoods"][k] for k in LABELS] for r in rows], np.float64).reshape(-1, 3)
        ntok = []
        for r in rows:
            counts = r.get("answer_tokens") or answer_tokens
            ntok.append([counts[k] for k in LABELS] if counts else [np.nan] * 3)
        greedy = [r["greedy_answer"] for r in rows] if rows and all("greedy_answer" in r for r in rows) else None
        return cls(ll, np.array(ntok, np.float64).reshape(-1, 3), greedy)


@dataclass
class Decisions:
    pred: np.ndarray  # [n] class index, -1 = no decision
    prob: np.ndarray | None  # [n, 3] or None


def _match(text: str) -> int:
    key = " ".join(text.split()).casefold()
    for k, label in enumerate(LABELS):
        if key == " ".join(ANSWERS[label].split()).casefold():
            return k
    return -1


class PublishedRule:
    name, title = "published", "published code: greedy answer text matched to the answer strings"

    def decide(self, data: RowData) -> Decisions:
        if data.greedy is None:
            raise Unavailable("the rows have no greedy_answer (run medblip-infer with --decision-detail, or let "
                              "medblip-eval run the bundle)")
        return Decisions(np.array([_match(t) for t in data.greedy], np.int64), None)


class ScoreRule:
    """Highest score wins; probabilities are the softmax of the scores."""

    def __init__(self, rule: str, title: str):
        self.name, self.rule, self.title = rule, rule, title

    def decide(self, data: RowData) -> Decisions:
        if self.rule == "mean" and not np.isfinite(data.n_tokens).all():
            raise Unavailable("the rows have no answer_tokens and no bundle tokenizer gave them")
        s = answer_scores(data.loglik, data.n_tokens, self.rule)
        return Decisions(s.argmax(1), softmax(s))


class CalibratedRule:
    name, title = "calibrated", "calibrated: per-class bias + temperature over the sum rule's scores"

    def __init__(self, params: dict):
        self.params = params

    def decide(self, data: RowData) -> Decisions:
        p = self.params
        prob = calibrated_probabilities(answer_scores(data.loglik, data.n_tokens, p["rule"]), p["temperature"],
                                        [p["bias"][k] for k in LABELS])
        return Decisions(prob.argmax(1), prob)


def standard_rules() -> list:
    """The rules that need no fitting, in report order; `sum` is the primary rule (comparisons, verdicts)."""
    return [ScoreRule("sum", "sum log-likelihood (default of medblip-infer)"),
            ScoreRule("mean", "per-token mean log-likelihood"), PublishedRule()]


PRIMARY = "sum"

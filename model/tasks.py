"""The two tasks over any LLM backend (runtime/llm_base.LlmBackend): diagnose (score the three answers) and ask
(greedy answer)."""

from __future__ import annotations

from .prompts import ANSWERS, DIAGNOSIS_QUESTION, LABELS, build_prompt
from .scoring import diagnosis


class Tasks:
    """Prompt building and answer scoring for one family + tokenizer, over any LLM backend."""

    def __init__(self, family, tokenizer, max_new_tokens: int):
        self.family, self.tokenizer = family, tokenizer
        self.answer_ids = [family.answer_ids(tokenizer, ANSWERS[k]) for k in LABELS]
        self.max_new_tokens = min(60, max_new_tokens)

    @property
    def answer_tokens(self) -> dict:
        """How many tokens each answer string has, keyed AD, MCI, NC (the per-token mean rule divides by it)."""
        return {k: len(ids) for k, ids in zip(LABELS, self.answer_ids)}

    def decision_detail(self, llm, visual, patient_text: str = "") -> dict:
        """What the other decision rules need beside the log-likelihoods: the answers' token counts and the greedy
        answer to the diagnosis question (the published code's output, matched to the answers by medblip-eval)."""
        return {"answer_tokens": self.answer_tokens, "greedy_answer": self.ask(llm, visual, patient_text)}

    def prompt_ids(self, patient_text: str, question: str = DIAGNOSIS_QUESTION) -> list[int]:
        return self.family.prompt_ids(self.tokenizer, build_prompt(patient_text, question))

    def diagnose(self, llm, visual, patient_text: str = "") -> dict:
        """visual [1,Q,d] -> {label, probabilities, answer, log_likelihoods}: one prefill, one batched scoring pass."""
        state = llm.prefill(self.prompt_ids(patient_text), visual)
        return diagnosis(llm.score(state, self.answer_ids))  # scores: [3] sum log p

    def ask_ids(self, llm, visual, patient_text: str = "", question: str = DIAGNOSIS_QUESTION,
                max_new_tokens: int | None = None) -> list[int]:
        """visual [1,Q,d] -> greedy answer token ids (EOS not included)."""
        state = llm.prefill(self.prompt_ids(patient_text, question), visual)
        return llm.generate(state, min(60, max_new_tokens or self.max_new_tokens))

    def ask(self, llm, visual, patient_text: str = "", question: str = DIAGNOSIS_QUESTION,
            max_new_tokens: int | None = None) -> str:
        ids = self.ask_ids(llm, visual, patient_text, question, max_new_tokens)
        return self.tokenizer.decode(ids).strip()

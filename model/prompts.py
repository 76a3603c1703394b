"""Prompt template and answer strings of the published training code."""

from __future__ import annotations

DIAGNOSIS_QUESTION = "What will this subject be diagnosed with?"
PROMPT_TEMPLATE = "{patient_text}Question: {question} Answer: "  # patient text first, no separator

# Class label -> the exact answer string the model was trained to produce.
ANSWERS = {
    "AD": "Dementia",
    "MCI": "mild cognitive impairment (MCI)",
    "NC": "Not demented",
}
LABELS = tuple(ANSWERS)


def build_prompt(patient_text: str, question: str = DIAGNOSIS_QUESTION) -> str:
    """The exact prompt string, trailing space included."""
    return PROMPT_TEMPLATE.format(patient_text=patient_text, question=question)

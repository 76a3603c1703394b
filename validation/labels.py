"""Diagnosis labels of a cohort CSV: AD, MCI, NC and their usual synonyms, case and spacing ignored."""

from __future__ import annotations

import re

from ..errors import MedblipError
from ..model.prompts import LABELS

# Every spelling a site's export is likely to use; compared after lower-casing and collapsing
# spaces, underscores, hyphens and apostrophes.
SYNONYMS = {
    "AD": ("ad", "alzheimer", "alzheimers", "alzheimer disease", "alzheimers disease", "dementia", "demented",
           "probable ad"),
    "MCI": ("mci", "mild cognitive impairment", "emci", "lmci", "early mci", "late mci", "mild cognitive impairment mci"),
    "NC": ("nc", "cn", "control", "controls", "normal", "normal control", "cognitively normal", "healthy",
           "healthy control", "hc", "not demented", "nondemented", "non demented", "smc"),
}
_LOOKUP = {syn: label for label, syns in SYNONYMS.items() for syn in syns}


def _key(text: str) -> str:
    text = re.sub(r"['’]", "", text.strip().lower())
    return " ".join(re.sub(r"[\s_\-()]+", " ", text).split())


def normalise(text: str, where: str) -> str:
    """A label cell -> AD, MCI or NC; anything else is a `bad_label` error naming `where` (e.g. `row 7`)."""
    label = _LOOKUP.get(_key(text))
    if label is None:
        raise MedblipError(f"{where}: unknown label {text.strip()!r} (expected {', '.join(LABELS)} or a synonym "
                           f"such as CN, control, dementia, mild cognitive impairment)", code="bad_label")
    return label


def index(label: str) -> int:
    """AD, MCI, NC -> 0, 1, 2 (the column order of every matrix medblip-eval writes)."""
    return LABELS.index(label)

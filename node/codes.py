"""The coded concepts a node's structured report uses, with where each code was checked.

DICOM's own codes (DCM, UCUM, LN) are checked against pydicom's concept dictionary, which is generated
from DICOM PS3.16 (the tests look each one up there). The SNOMED CT codes of the three findings are not
in PS3.16; they were checked against public code (FHIR code systems and value sets, clinical code maps)
that use them with these meanings, not against an official SNOMED CT release: see
docs/guides/pacs-node.md, "Codes and their sources", before relying on them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    value: str
    scheme: str
    meaning: str

    def concept(self):
        from highdicom.sr import CodedConcept

        return CodedConcept(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)


# One finding per class label of the model (model/prompts.py LABELS).
FINDINGS = {
    "AD": Code("26929004", "SCT", "Alzheimer's disease"),
    "MCI": Code("386805003", "SCT", "Mild cognitive disorder"),
    "NC": Code("449888003", "SCT", "Normal cognition"),
}
PROBABILITY = Code("122157", "DCM", "Probability")
UNIT_ONE = Code("1", "UCUM", "no units")
FINDING = Code("121071", "DCM", "Finding")
COMMENT = Code("121106", "DCM", "Comment")
BRAIN_MRI = Code("24590-2", "LN", "Brain MRI")
# IHE AI Results: the purpose of the contributing-equipment item that names the algorithm (highdicom refuses it).
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")

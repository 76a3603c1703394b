"""Is this scan like the ones the model was trained on? Input checks (the row's `qc` block and warning codes), the
opt-in conform step, and the out-of-distribution profile. See docs/inputs/qc.md."""

from .checks import CODES, assess
from .conform import ConformSpec, conform
from .ood import OodProfile
from .options import QcOptions

__all__ = ["CODES", "ConformSpec", "OodProfile", "QcOptions", "assess", "conform"]

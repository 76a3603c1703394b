"""--write-calibrated: a copy of a bundle whose manifest carries a calibration, written and verified like any bundle.

Every artifact is copied into bundle/writer.py's temporary folder by BundleWriter.copy_from (hashes recomputed,
other manifest keys kept); the manifest gains `calibration` (model/calibration.py applies it to
every diagnosis) and a note; the schema version stays, so every runtime of this schema reads it (one without the
calibration code ignores the key). The finished bundle is opened and verified before this returns.
"""

from __future__ import annotations

from pathlib import Path

from ..bundle.reader import Bundle
from ..bundle.writer import BundleWriter
from ..errors import MedblipError
from ..model.calibration import calibration_name


def write_calibrated(source: Bundle, out: Path, params: dict) -> Bundle:
    """Write `source` + `params` as a new bundle at `out` (replaced atomically); returns it opened and verified."""
    out = Path(out)
    if out.resolve() == source.root.resolve():
        raise MedblipError("--write-calibrated must name a new folder, not the bundle being evaluated", code="usage")
    with BundleWriter(out) as w:
        w.copy_from(source)
        manifest = {k: v for k, v in source.manifest.items() if k not in ("schema_version", "artifacts")}
        manifest["calibration"] = params
        fitted = params["fitted_on"]
        manifest["notes"] = list(manifest.get("notes", [])) + [
            f"calibrated by medblip-eval ({calibration_name(params)}): fitted on {fitted['scans']} scans of "
            f"{fitted['cohort']}; rows carry `calibrated` beside the raw probabilities"]
        w.commit(manifest)
    return Bundle.open(out, verify=True)

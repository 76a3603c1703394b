"""Print the path of a real T1 brain MRI shipped in nilearn's wheel (the set-up command's demo scan).

    medblip-infer "$(python -m medblip_edge.demo_scan)" --bundle demo-bundle
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MNI_T1 = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def mni_t1_path() -> Path | None:
    """The MNI152 2009a T1 template (197x233x189 uint8) inside the installed nilearn, or None."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / MNI_T1
    return path if path.is_file() else None


if __name__ == "__main__":
    p = mni_t1_path()
    if p is None:
        sys.exit("nilearn is not installed: pip install 'medblip-edge[demo]'")
    print(p)

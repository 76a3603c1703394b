"""The fixed evaluation set made at export: volumes and prompts every artifact is compared on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATIENT_TEXTS = (
    "",
    "The subject is a 74 year old female. MMSE 23, CDR 0.5. ",
    "The subject is a 81 year old male. MMSE 17, CDR 1. APOE4 carrier. ",
    "The subject is a 66 year old male. MMSE 29, CDR 0. ",
)


def eval_volumes(n: int = 4, size: int = 224, seed: int = 1234) -> torch.Tensor:
    """n smooth random volumes [n,1,S,S,S] in [0,1], as preprocessing outputs look (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 8, 8, 8, generator=g)
    vol = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)
    lo = vol.amin(dim=(1, 2, 3, 4), keepdim=True)
    hi = vol.amax(dim=(1, 2, 3, 4), keepdim=True)
    return ((vol - lo) / (hi - lo)).contiguous()


def eval_cases(n: int = 4) -> list[tuple[int, str]]:
    """(volume index, patient text) pairs."""
    return [(i, PATIENT_TEXTS[i % len(PATIENT_TEXTS)]) for i in range(n)]

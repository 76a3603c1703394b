"""A bundle's PyTorch weights: MedBlip's own key names in one safetensors file, tied aliases stored once."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import retie
from .config import MedBlipConfig
from .medblip import MedBlip
from .stored import read_safetensors, write_safetensors


def save_weights(model: MedBlip, path: Path, dtypes: dict[str, torch.dtype] | None = None) -> int:
    """Write the module state dict (aliases of tied weights left out) tensor by tensor; `dtypes` maps key ->
    storage dtype (default: as held, e.g. the checkpoint's own dtypes). Returns bytes written."""
    aliases = {"llm." + a for a in model.family.aliases(model.cfg.llm)}
    dtypes = dtypes or {}
    sd = {k: v.detach().to(dtypes.get(k, v.dtype)) for k, v in model.state_dict().items() if k not in aliases}
    return write_safetensors(sd, path)


def load_weights(cfg: MedBlipConfig, path: Path, dtype: torch.dtype | None = torch.float32,
                 device: str | torch.device = "cpu") -> MedBlip:
    """MedBlip from `save_weights` output, cast to `dtype` (None: as stored, memory-mapped) on `device`
    (built on the meta device and read from the file's mapping: no double copy)."""
    sd = read_safetensors(path)
    with torch.device("meta"):
        model = MedBlip(cfg)
    for alias, src in model.family.aliases(cfg.llm).items():
        sd["llm." + alias] = sd["llm." + src]
    cast = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in sd.items()}  # same device and dtype: v itself
    model.load_state_dict(cast, assign=True, strict=True)
    retie(model)
    return model.eval()

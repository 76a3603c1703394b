"""A bundle's PyTorch weights: MedBlip's own key names in one safetensors file, tied aliases stored once."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import retie
from .config import MedBlipConfig
from .medblip import MedBlip


def save_weights(model: MedBlip, path: Path, dtypes: dict[str, torch.dtype] | None = None) -> None:
    """Write the module state dict (aliases of tied weights left out); `dtypes` maps key -> storage dtype."""
    from safetensors.torch import save_file

    aliases = {"llm." + a for a in model.family.aliases(model.cfg.llm)}
    dtypes = dtypes or {}
    sd = {k: v.detach().to(dtypes.get(k, v.dtype)).contiguous() for k, v in model.state_dict().items()
          if k not in aliases}
    save_file(sd, str(path))


def load_weights(cfg: MedBlipConfig, path: Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> MedBlip:
    """MedBlip from `save_weights` output, cast to `dtype` on `device` (built on the meta device, no double copy)."""
    from safetensors.torch import load_file

    sd = load_file(str(path), device=str(device))
    with torch.device("meta"):
        model = MedBlip(cfg)
    for alias, src in model.family.aliases(cfg.llm).items():
        sd["llm." + alias] = sd["llm." + src]
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True, strict=True)
    retie(model)
    return model.eval()

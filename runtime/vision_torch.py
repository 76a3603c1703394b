"""The PyTorch vision backend: the bundle's weights in a MedBlip module, on CPU or CUDA, fp32/fp16/bf16 (the LLM
backends over the same module are chosen in factory.py)."""

from __future__ import annotations

import torch

from ..bundle.format import TORCH
from ..bundle.reader import Bundle
from ..model.dtypes import DTYPES
from ..model.weights import load_weights
from .vision_base import VisionBackend


class TorchVision(VisionBackend):
    name = "torch"

    def __init__(self, model, precision: str, max_batch: int):
        self.model, self.precision, self.max_batch = model, precision, max_batch
        self.device = model.proj.weight.device

    @torch.inference_mode()
    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.model.visual_tokens(volumes.to(self.device)).float().cpu()  # [B, Q, d_llm]


def load_torch_model(bundle: Bundle, precision: str = "fp32", device: str = "cpu"):
    """MedBlip from the bundle's weights, cast from fp32 to `precision` (the family's fp32 spots kept)."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}")
    return load_weights(bundle.config, bundle.path(TORCH), torch.float32, device).to_precision(DTYPES[precision])

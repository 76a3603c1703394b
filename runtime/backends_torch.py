"""The PyTorch backend: the bundle's weights in a MedBlip module, on CPU or CUDA, fp32/fp16/bf16."""

from __future__ import annotations

import torch

from ..model.weights import load_weights
from .bundle import Bundle
from .llm_torch import TORCH_LLMS
from .vision_base import VisionBackend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchVision(VisionBackend):
    name = "torch"

    def __init__(self, model, precision: str, max_batch: int):
        self.model, self.precision, self.max_batch = model, precision, max_batch
        self.device = model.proj.weight.device

    @torch.inference_mode()
    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.model.visual_tokens(volumes.to(self.device)).float().cpu()  # [B, Q, d_llm]


def load_torch_model(bundle: Bundle, precision: str = "fp32", device: str = "cpu"):
    """MedBlip from the bundle's weights; LayerNorm-heavy parts stay fp32 where the model says so."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}")
    return load_weights(bundle.config, bundle.path("torch"), DTYPES[precision], device)


def torch_backends(bundle: Bundle, precision: str = "fp32", device: str = "cpu"):
    """(vision, llm) sharing one module."""
    model = load_torch_model(bundle, precision, device)
    vision = TorchVision(model, precision, bundle.manifest.get("max_batch", 8))
    llm = TORCH_LLMS[bundle.config.variant](model.llm, precision)
    return vision, llm

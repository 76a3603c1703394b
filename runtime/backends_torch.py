"""The PyTorch backend: the bundle's weights in a MedBlip module, on CPU or CUDA, fp32/fp16/bf16."""

from __future__ import annotations

import torch

from ..model.weights import load_weights
from .bundle import Bundle
from .llm_static_t5 import CudaGraphT5Llm
from .llm_torch import TORCH_LLMS
from .vision_base import VisionBackend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CUDA_GRAPH_LLMS = {"t5": CudaGraphT5Llm}


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
    return load_weights(bundle.config, bundle.path("torch"), torch.float32, device).to_precision(DTYPES[precision])


def torch_llm(model, precision: str, device: str):
    """The LLM backend for a torch model: on CUDA, T5 decodes with a static cache replayed as a CUDA graph."""
    if str(device).startswith("cuda") and model.cfg.variant in CUDA_GRAPH_LLMS:
        return CUDA_GRAPH_LLMS[model.cfg.variant](model.llm, precision)
    return TORCH_LLMS[model.cfg.variant](model.llm, precision)


def torch_backends(bundle: Bundle, precision: str = "fp32", device: str = "cpu"):
    """(vision, llm) sharing one module."""
    model = load_torch_model(bundle, precision, device)
    vision = TorchVision(model, precision, bundle.manifest.get("max_batch", 8))
    return vision, torch_llm(model, precision, device)

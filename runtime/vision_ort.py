"""ONNX Runtime vision backend: the exported vision graph (CPU or CUDA execution provider)."""

from __future__ import annotations

import torch

from .ort_graph import OrtGraph, host
from .vision_base import VisionBackend


class OrtVision(VisionBackend):
    name = "ort"

    def __init__(self, path, precision: str, max_batch: int, device: str = "cpu", threads: int | None = None):
        self.graph = OrtGraph(path, device, threads)
        self.precision, self.max_batch = precision, max_batch

    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        # timing includes the host->device copy of the volume on CUDA
        (out,) = self.graph(volume=volumes.float().numpy())
        return torch.from_numpy(host(out)).float()  # [B, Q, d_llm]

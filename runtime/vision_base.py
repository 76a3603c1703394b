"""The vision backend interface: volumes -> visual tokens (3D ViT + ln_vision + Q-Former + projection)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class VisionBackend(ABC):
    name: str
    precision: str
    max_batch: int

    @abstractmethod
    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        """volumes [B,1,S,S,S] float32 (CPU) -> visual tokens [B, Q, d_llm] float32 (CPU)."""

    def run(self, volumes: torch.Tensor) -> torch.Tensor:
        """Any batch size: split into chunks of at most `max_batch`."""
        parts = [self(volumes[i: i + self.max_batch]) for i in range(0, volumes.shape[0], self.max_batch)]
        return torch.cat(parts, dim=0)

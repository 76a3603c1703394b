"""Settings of a medblip-serve replica (plain data: importing this does not import Ray)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplicaConfig:
    bundle: str
    backend: str = "auto"
    device: str = "cpu"
    precision: str | None = None
    threads: int | None = None  # compute threads of the model (ONNX Runtime / torch intra-op)
    huge_pages: bool = True
    preprocess_workers: int = 2
    max_batch: int | None = None  # None: 1 on CPU (batches do not pay there), the vision graph's largest on cuda
    batch_wait_ms: float = 10.0
    max_body_mb: float = 1024.0
    timeout_s: float = 120.0

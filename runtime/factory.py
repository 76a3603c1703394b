"""The one place a backend is chosen by name."""

from __future__ import annotations

from ..errors import BackendUnavailable
from .bundle import Bundle

BACKENDS = ("torch",)


def make_backends(bundle: Bundle, backend: str, device: str, precision: str | None):
    """-> (vision, llm, {"vision": name, "llm": name}); `auto` takes the fastest the bundle and machine have."""
    if backend == "auto":
        backend = "torch"
    if backend == "torch":
        from .backends_torch import torch_backends

        vision, llm = torch_backends(bundle, precision or "fp32", device)
        return vision, llm, {"vision": "torch", "llm": "torch"}
    raise BackendUnavailable(f"unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")

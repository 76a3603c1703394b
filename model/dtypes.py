"""The one table of compute precisions by name, as the CLI, the manifest and the bench spell them."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16"."""
    return {d: n for n, d in DTYPES.items()}[dtype]

"""The export's parity check of the backends it just wrote: the only module of export/ that runs runtime/ code,
so that what is measured before an artifact ships is exactly what `medblip-infer` will run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.llm_ort import ORT_LLMS
from ..runtime.llm_torch import TORCH_LLMS


def torch_llm(model, precision: str = "fp32"):
    """The torch LLM backend over a MedBlip's LLM (the reference's decoder with a KV cache)."""
    return TORCH_LLMS[model.cfg.variant](model.llm, precision)


def ort_llm(model, graphs: dict[str, Path], precision: str):
    """The ONNX Runtime LLM backend over freshly written graphs {name: path}, with the model's special tokens."""
    cfg = model.llm.config
    return ORT_LLMS[model.cfg.variant](graphs, precision, int(cfg.eos_token_id),
                                       decoder_start_token_id=getattr(cfg, "decoder_start_token_id", 0) or 0)


def engine_visual(engine: Path, meta: dict, volumes) -> np.ndarray:
    """A TensorRT engine just built, run by the runtime's backend on `volumes` [n,1,S,S,S] -> visual tokens [n,Q,d]."""
    from ..runtime.vision_trt import TrtVision

    return TrtVision(engine, {**meta, "precision": "fp16"}).run(volumes).numpy()

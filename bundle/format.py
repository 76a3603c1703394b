"""The bundle format that the export writes and the runtime reads: schema version, file names, artifact names,
hashing, and the TensorRT engine's tensor names."""

from __future__ import annotations

import hashlib
from pathlib import Path

# 2: the tokenizer is one tokenizer.json run by `tokenizers` (model/tokenizer.py); 3: graphs written op by op
# into one weight file per artifact, GPT-2 graphs with per-layer caches, the evaluation budget in the manifest
SCHEMA_VERSION = 3
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Artifact names in manifest["artifacts"]
TORCH = "torch"  # the model's weights (safetensors), for the torch backend and the reference
TOKENIZER = "tokenizer"  # one tokenizer.json
VISION_ONNX = "vision_onnx"  # volume -> visual tokens, fp32 or INT8 (the ViT's MatMuls)
VISION_ONNX_FP16 = "vision_onnx_fp16"  # the same graph in fp16 (LayerNorm/Softmax fp32), for GPUs and TensorRT
VISION_TRT = "vision_trt"  # a TensorRT engine built from VISION_ONNX_FP16
LLM_ONNX = "llm_onnx"  # the LLM graphs with a KV cache

# The vision graph's (and so the TensorRT engine's) input and output tensor names
VISION_INPUT, VISION_OUTPUT = "volume", "visual_tokens"

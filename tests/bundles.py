"""Tiny exported bundles shared by the export and runtime tests (each built once per test session)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from medblip_edge.export.run import ExportOptions, export_bundle

_ROOT = Path(tempfile.mkdtemp(prefix="medblip-test-bundles-"))
atexit.register(shutil.rmtree, _ROOT, True)
_CACHE: dict[tuple, Path] = {}


def tiny_onnx_bundle(preset: str, quant: str) -> Path:
    """`preset` exported with ONNX graphs and the given LLM quantization, once per session (read-only use)."""
    key = (preset, quant)
    if key not in _CACHE:
        out = _ROOT / f"{preset}-{quant}"
        export_bundle(ExportOptions(out=out, preset=preset, llm_quant=quant, max_batch=4), quiet=True)
        _CACHE[key] = out
    return _CACHE[key]

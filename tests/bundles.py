"""Tiny exported bundles shared by the export and runtime tests (each built once per test session)."""

from __future__ import annotations

from pathlib import Path

from medblip_edge.export.run import ExportOptions, export_bundle

_CACHE: dict[tuple, Path] = {}


def tiny_onnx_bundle(root: Path, preset: str, quant: str) -> Path:
    """Export `preset` with ONNX graphs and the given LLM quantization into `root` (memoised)."""
    key = (preset, quant)
    if key not in _CACHE:
        out = root / f"{preset}-{quant}"
        export_bundle(ExportOptions(out=out, preset=preset, llm_quant=quant, max_batch=4), quiet=True)
        _CACHE[key] = out
    return _CACHE[key]

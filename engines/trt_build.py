"""Build a TensorRT engine of the vision graph: strongly typed, one profile over the batch, a persisted timing cache.

The engine is built from `volume [B,1,S,S,S] -> visual_tokens [B,Q,d_llm]` (an ONNX file, possibly with
external data). Precision comes from the graph's own types: an fp16 engine is built from the fp16 ONNX graph
(`vision_fp16.onnx`, LayerNorm/Softmax kept fp32), never from builder flags, which TensorRT 10 ignores for
strongly typed networks and TensorRT 11 removed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..bundle.format import VISION_INPUT as INPUT
from ..errors import BackendUnavailable, MedblipError


def trt_available() -> str | None:
    """None if TensorRT and a CUDA GPU are usable here, else a one-line reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed"
    except Exception as e:  # the wheel is there but its shared libraries are not (e.g. no CUDA runtime)
        return " ".join(f"tensorrt cannot be loaded: {e}".split())
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def engine_key() -> dict:
    """What an engine is tied to: {"gpu": name, "compute_capability": "9.0", "tensorrt": version} of this machine."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    # Compute capability and TensorRT version decide whether the plan deserialises at all; the GPU name
    # decides whether its tactics (timed on that card) are still the right ones.
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "tensorrt": trt.__version__}


def _write(path: Path, blob) -> None:
    """Write a buffer (bytes or TensorRT IHostMemory) atomically: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def build_engine(onnx_path, engine_path, *, min_batch: int, opt_batch: int, max_batch: int,
                 timing_cache_path, workspace_gb: float = 8) -> dict:
    """ONNX vision graph -> serialized engine at `engine_path`; returns metadata for the manifest."""
    reason = trt_available()
    if reason:
        raise BackendUnavailable(f"cannot build a TensorRT engine: {reason}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise MedblipError(f"TensorRT profile needs 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}",
                           code="usage")
    import tensorrt as trt

    onnx_path, engine_path, cache_path = Path(onnx_path), Path(engine_path), Path(timing_cache_path)
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: required opt-in on 10.x, accepted and ignored (always on) on 11.x.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # From a path, not bytes: the parser then finds external-data files next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MedblipError(f"{onnx_path.name}: TensorRT cannot parse it: {errors or 'no parser message'}",
                           code="trt_parse_error")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if INPUT not in inputs:
        raise MedblipError(f"{onnx_path.name}: no input named {INPUT!r} (has {', '.join(inputs)})",
                           code="trt_parse_error")
    dims = tuple(inputs[INPUT].shape)  # e.g. (-1, 1, 224, 224, 224)
    if dims[0] != -1 or any(d < 0 for d in dims[1:]):
        raise MedblipError(f"{onnx_path.name}: {INPUT} has shape {list(dims)}; only the batch dim may be dynamic",
                           code="trt_parse_error")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    # TF32 is on by default and would round fp32 matmul inputs to 10-bit mantissas: fp32 tensors stay fp32.
    config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    rest = dims[1:]
    profile.set_shape(INPUT, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)

    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    loaded = bool(blob) and cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    if not loaded:
        # No cache yet, or one from another GPU / TensorRT (refused): time the tactics afresh.
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise MedblipError(f"{onnx_path.name}: TensorRT could not build an engine (see its log above)",
                           code="trt_build_error")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _write(engine_path, plan)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    _write(cache_path, config.get_timing_cache().serialize())  # the build added its misses to the cache
    return {**engine_key(), "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
            "strongly_typed": True, "tf32": False, "timing_cache": "reused" if loaded else "new",
            "build_seconds": round(time.perf_counter() - t0, 2)}

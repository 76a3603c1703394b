"""The one place ONNX Runtime sessions are made: providers for a device, and the session options every graph uses."""

from __future__ import annotations

from pathlib import Path

from ..errors import BackendUnavailable


def ort_providers(device: str) -> tuple[list, str]:
    """-> (execution providers, OrtValue device name) for 'cpu' or 'cuda[:N]'; one-line error if unavailable."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime)")
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("onnxruntime has no CUDA execution provider here "
                                     "(pip install medblip-edge[gpu] for onnxruntime-gpu, and a CUDA GPU)")
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], "cuda"
    return ["CPUExecutionProvider"], "cpu"


def ort_session(model: str | Path | bytes, device: str = "cpu", threads: int | None = None, spin: bool | None = None,
                optimize: bool = True):
    """An InferenceSession over a graph file (or serialized bytes): all graph optimisations, warnings and above
    only, `threads` intra-op threads (None: ONNX Runtime's default), worker spinning on or off (None: default)."""
    import onnxruntime as ort

    providers, _ = ort_providers(device)
    so = ort.SessionOptions()
    if optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if spin is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)

"""The one place backends are chosen by name: vision and LLM, each the fastest the bundle and machine allow."""

from __future__ import annotations

from ..bundle.format import LLM_ONNX, VISION_ONNX, VISION_ONNX_FP16, VISION_TRT
from ..bundle.reader import Bundle
from ..errors import BackendUnavailable, MedblipError

BACKENDS = ("auto", "torch", "ort", "trt")


def _torch(bundle, device, precision):
    """(vision, llm) sharing one MedBlip module."""
    from .vision_torch import TorchVision, load_torch_model

    precision = precision or "fp32"
    model = load_torch_model(bundle, precision, device)
    return TorchVision(model, precision, bundle.manifest.get("max_batch", 8)), _torch_llm(model, precision, device)


def _torch_llm(model, precision: str, device: str):
    """On CUDA, a family with a CUDA-graph decoder (T5: static cache, the step replayed as a graph) gets it;
    otherwise the eager KV-cache module."""
    from .llm_torch import TORCH_LLMS

    choices = dict(TORCH_LLMS)
    if str(device).startswith("cuda"):
        from .llm_static_t5 import CUDA_GRAPH_LLMS

        choices.update(CUDA_GRAPH_LLMS)
    return choices[model.cfg.variant](model.llm, precision)


def _ort_vision(bundle: Bundle, device: str, threads=None):
    from .vision_ort import OrtVision

    fp16 = device.startswith("cuda") and bundle.has(VISION_ONNX_FP16)
    art = VISION_ONNX_FP16 if fp16 else VISION_ONNX
    return OrtVision(bundle.path(art), bundle.artifacts[art]["precision"], bundle.manifest["max_batch"], device, threads)


def _ort_llm(bundle: Bundle, device: str, threads=None):
    from .llm_ort import ORT_LLMS

    art = bundle.artifacts[LLM_ONNX]
    llm_cfg = bundle.config.llm
    paths = {g: bundle.root / art["files"][g] for g in art["graphs"]}
    return ORT_LLMS[bundle.config.variant](paths, art["precision"], int(llm_cfg["eos_token_id"]), device, threads,
                                           int(llm_cfg.get("decoder_start_token_id") or 0))


def _trt_vision(bundle: Bundle, rebuild: bool):
    """The bundle's engine; with `rebuild`, one built for this machine when the bundle's cannot run here."""
    from .trt_rebuild import engine_for_here
    from .vision_trt import EngineMismatch, TrtVision

    if bundle.has(VISION_TRT):
        try:
            return TrtVision.from_bundle(bundle)
        except EngineMismatch:
            if not rebuild:
                raise
    elif not rebuild:
        raise BackendUnavailable(f"bundle {bundle.root.name} has no TensorRT engine (export with --trt)")
    return TrtVision(*engine_for_here(bundle))


def make_backends(bundle: Bundle, backend: str, device: str, precision: str | None, threads: int | None = None,
                  rebuild_trt: bool = False):
    """-> (vision, llm, {"vision": name, "llm": name}).

    rebuild_trt: when the bundle's TensorRT engine was built for another GPU or TensorRT version (or the
    bundle has none), build one for this machine from its fp16 vision graph (see trt_rebuild).
    """
    if backend not in BACKENDS:
        raise MedblipError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}", code="usage")
    if precision is not None and backend not in ("torch", "auto"):
        raise MedblipError("--precision applies to the torch backend; ONNX/TensorRT precision is fixed at export",
                           code="usage")
    if backend == "torch" or (backend == "auto" and precision is not None):
        vision, llm = _torch(bundle, device, precision)
        return vision, llm, {"vision": "torch", "llm": "torch"}
    has_onnx = bundle.has(VISION_ONNX) and bundle.has(LLM_ONNX)
    if backend in ("ort", "trt") and not has_onnx:
        raise BackendUnavailable(f"bundle {bundle.root.name} has no ONNX graphs (exported with --no-onnx)")
    if backend == "auto" and not has_onnx:
        vision, llm = _torch(bundle, device, precision)
        return vision, llm, {"vision": "torch", "llm": "torch", "why": "bundle has no ONNX graphs"}
    llm = _ort_llm(bundle, device, threads)
    why = None
    if backend == "trt" or (backend == "auto" and (bundle.has(VISION_TRT) or rebuild_trt)):
        try:
            return _trt_vision(bundle, rebuild_trt), llm, {"vision": "trt", "llm": "ort"}
        except BackendUnavailable as e:
            if backend == "trt":
                raise
            why = f"TensorRT engine not usable here: {e}"
    chosen = {"vision": "ort", "llm": "ort"}
    if why:
        chosen["why"] = why
    return _ort_vision(bundle, device, threads), llm, chosen

"""The TensorRT vision backend: a serialized engine of the vision graph, run by tensor name on a CUDA stream."""

from __future__ import annotations

from pathlib import Path

import torch

from ..bundle.format import VISION_INPUT as INPUT, VISION_OUTPUT as OUTPUT, VISION_TRT
from ..engines.trt_build import engine_key, trt_available
from ..errors import BackendUnavailable, BundleError, MedblipError
from .vision_base import VisionBackend

ARTIFACT = VISION_TRT  # manifest entry: files.main = the engine; precision, profile and engine_key() fields


class EngineMismatch(BackendUnavailable):
    """The engine was built for another GPU architecture or TensorRT version (`--rebuild-trt` builds one here)."""


def _describe(key: dict) -> str:
    return f"{key.get('gpu')} (sm {key.get('compute_capability')}) / TensorRT {key.get('tensorrt')}"


class TrtVision(VisionBackend):
    """Engine `volume [B,1,S,S,S] -> visual_tokens [B,Q,d_llm]`; takes and returns CPU float32 tensors.

    A call's time includes the host-to-device copy of the volumes and the device-to-host copy of the tokens.
    """

    name = "trt"

    def __init__(self, engine_path: str | Path, meta: dict):
        """`meta`: the artifact's manifest entry (precision, profile and the engine key it was built with)."""
        reason = trt_available()
        if reason:
            raise BackendUnavailable(f"trt backend: {reason}")
        try:
            self.precision = meta["precision"]
            self.min_batch, self.max_batch = meta["profile"]["min"], meta["profile"]["max"]
            built = {k: meta[k] for k in ("gpu", "compute_capability", "tensorrt")}
        except KeyError as e:
            raise BundleError(f"{ARTIFACT} manifest entry lacks {e.args[0]!r}", code="bad_manifest")
        here = engine_key()
        if built != here:  # a plan only runs on the GPU arch and TensorRT version it was built for
            raise EngineMismatch(f"engine built for {_describe(built)}, this is {_describe(here)}; "
                                 f"--rebuild-trt builds one for this machine")
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"{Path(engine_path).name}: TensorRT cannot deserialize this engine")
        modes = {self.engine.get_tensor_name(i): self.engine.get_tensor_mode(self.engine.get_tensor_name(i))
                 for i in range(self.engine.num_io_tensors)}
        if modes.get(INPUT) != trt.TensorIOMode.INPUT or modes.get(OUTPUT) != trt.TensorIOMode.OUTPUT:
            raise BundleError(f"{Path(engine_path).name}: expected input {INPUT!r} and output {OUTPUT!r}, "
                              f"found {', '.join(modes)}", code="bad_engine")
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.BF16: torch.bfloat16}
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        # One buffer per tensor at the profile's max batch; a smaller batch uses its leading rows, so the
        # addresses bound here stay valid for every call.
        in_shape = (self.max_batch, *tuple(self.engine.get_tensor_shape(INPUT))[1:])  # [max, 1, S, S, S]
        out_shape = (self.max_batch, *tuple(self.engine.get_tensor_shape(OUTPUT))[1:])  # [max, Q, d_llm]
        self.inp = torch.empty(in_shape, dtype=dtypes[self.engine.get_tensor_dtype(INPUT)], device="cuda")
        self.out = torch.empty(out_shape, dtype=dtypes[self.engine.get_tensor_dtype(OUTPUT)], device="cuda")
        self.context.set_tensor_address(INPUT, self.inp.data_ptr())
        self.context.set_tensor_address(OUTPUT, self.out.data_ptr())

    @classmethod
    def from_bundle(cls, bundle, artifact: str = ARTIFACT) -> "TrtVision":
        """The bundle's engine artifact (checked against its SHA-256 when the bundle was opened)."""
        return cls(bundle.path(artifact), bundle.artifacts[artifact])

    @torch.inference_mode()
    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        """volumes [B,1,S,S,S] float32 CPU, B <= max_batch -> visual tokens [B,Q,d_llm] float32 CPU."""
        b = volumes.shape[0]
        if b > self.max_batch:
            raise ValueError(f"batch {b} > engine max batch {self.max_batch}; use run() to chunk")
        n = max(b, self.min_batch)  # the profile rejects batches below its min: pad with zero volumes
        with torch.cuda.stream(self.stream):
            self.inp[:b].copy_(volumes)  # H2D (and cast, for an fp16 input) on self.stream
            if n > b:
                self.inp[b:n].zero_()
            self.context.set_input_shape(INPUT, (n, *self.inp.shape[1:]))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise MedblipError("TensorRT execution failed (see its log above)", code="trt_run_error")
            tokens = self.out[:b].to("cpu", torch.float32)  # D2H on self.stream; waits for the engine
        self.stream.synchronize()
        return tokens  # [B, Q, d_llm]

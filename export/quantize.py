"""LLM weight quantization of exported ONNX graphs (offline; the runtime only loads the result).

Each `--llm-quant` names a weight format per kind of graph, because ONNX Runtime's fastest CPU kernel
depends on how many rows the matmuls see:

- gemm graphs (T5 encoder and prefill/scoring, GPT-2 prefill: many tokens per call): int8 is dynamic
  quantization (per-channel INT8 weights, activations quantized per call, DynamicQuantizeMatMul on
  the integer GEMM);
- gemv graphs (the one-token decode step, run once per generated token): int8 is MatMulNBits at
  8 bits, block 128, which reads the weights once with integer dot products.
int4 is MatMulNBits at 4 bits: block 32 in the gemm graphs, which score the diagnosis (small blocks
keep a 4-bit grid close to the weights), block 128 in the decode step (faster there: 5.27 against
6.43 ms on the small preset in results/cpu-small-decode-variants-2026-11-28; greedy-token
agreement with fp32 is recorded in the manifest like every other figure).

MatMulNBits is symmetric and blockwise (one fp32 scale per block along K); at accuracy level 4 the
CPU kernel quantizes activations to INT8 per block. `medblip-bench decode-formats`
times these choices against each other on one machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..quiet import quiet_logs

ACCURACY_LEVEL = 4  # int8 activations and integer dot products on CPUs
MS_DOMAIN = "com.microsoft"


def quiet_quantizer_logs():
    """ONNX Runtime's quantizers log advice and one line per node at INFO/WARNING level (some on the root logger):
    errors only, while they run."""
    return quiet_logs("", "onnxruntime", "onnxruntime.quantization")


def _external(src: Path) -> bool:
    return src.with_name(src.name + ".data").exists()


@dataclass(frozen=True)
class BlockQuant:
    """Weight-only blockwise quantization (MatMulNBits)."""

    bits: int
    block: int
    accuracy: int = ACCURACY_LEVEL  # MatMulNBits accuracy_level: 4 = int8 activations, 0 = fp32 compute

    @property
    def bytes_per_weight(self) -> float:
        """Bytes read per weight: the integer plus its share of the block's fp32 scale."""
        return self.bits / 8 + 4 / self.block

    @property
    def bytes_text(self) -> str:
        return f"{self.bits / 8:g} B + an fp32 scale per {self.block}"

    def describe(self) -> str:
        return f"MatMulNBits {self.bits}-bit, block {self.block}, symmetric, accuracy level {self.accuracy}"

    def raised(self) -> "BlockQuant | None":
        """The tolerance's first step up from 4 bits (export/fallback.py): the same kernel at 8 bits, same block."""
        return BlockQuant(8, self.block, self.accuracy) if self.bits < 8 else None

    def pack(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """weight [K, N] float32 -> (blocks [N, K/block, block*bits/8] uint8, scales [N, K/block] float32), with
        ONNX Runtime's own quantization kernel (as its MatMulNBitsQuantizer calls it)."""
        from onnxruntime.capi import _pybind_state as ort_c

        k, n = weight.shape
        w = padded_rows(weight, self.block)
        blocks = w.shape[0] // self.block
        packed = np.zeros((n, blocks, self.block * self.bits // 8), np.uint8)
        scales = np.zeros((n, blocks), np.float32)
        zero = np.zeros((n, -(-blocks * self.bits // 8)), np.uint8)  # unused: symmetric
        kernel = {4: ort_c.quantize_matmul_4bits, 8: ort_c.quantize_matmul_8bits}[self.bits]
        kernel(packed, w, scales, zero, self.block, n, k, True)
        return packed, scales

    def emit(self, w, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None,
             out: str | None = None) -> str:
        """x @ weight (+ bias) as one MatMulNBits node; weight [K, N] float32."""
        packed, scales = self.pack(weight)
        inputs = [x, w.weight(f"{name}.q{self.bits}", packed), w.weight(f"{name}.scales", scales)]
        if bias is not None:
            inputs += ["", "", w.weight(f"{name}.bias", bias)]
        return w.op("MatMulNBits", inputs, domain=MS_DOMAIN, K=weight.shape[0], N=weight.shape[1], bits=self.bits,
                    block_size=self.block, accuracy_level=self.accuracy, names=[out] if out else None)

    def __call__(self, src: Path, dst: Path) -> None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(src), load_external_data=True)
        with quiet_quantizer_logs():
            q = MatMulNBitsQuantizer(model, bits=self.bits, block_size=self.block, is_symmetric=True,
                                     accuracy_level=self.accuracy)
            q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=_external(src))


@dataclass(frozen=True)
class FittedBlockQuant(BlockQuant):
    """BlockQuant with each block's scale fitted: the shrink of the block's extreme (0.5..1, either end of the
    signed grid) that minimises the block's squared weight error, instead of the extreme itself. Measured in
    `medblip-bench quantization` against the plain scales; not a default (it did not help there)."""

    steps: int = 20

    def describe(self) -> str:
        return super().describe() + ", scales fitted to the weight error"

    def pack(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = blocks_of(weight, self.block)
        lo, hi = signed_range(self.bits)
        extreme = block_extremes(b)
        best, err = extreme / lo, np.full(extreme.shape, np.inf)
        for shrink in np.linspace(0.5, 1.0, self.steps + 1):
            for end in (lo, -hi):  # the extreme on the grid's -2^(b-1) end, or on its +2^(b-1)-1 end
                s = np.where(extreme == 0, 1.0, extreme / end * shrink)
                e = ((np.clip(np.rint(b / s[..., None]), lo, hi) * s[..., None] - b) ** 2).sum(-1)
                best, err = np.where(e < err, s, best), np.minimum(e, err)
        return pack_ints(np.clip(np.rint(b / best[..., None]), lo, hi), self.bits), best.astype(np.float32)


def padded_rows(weight: np.ndarray, block: int) -> np.ndarray:
    """weight [K, N] -> [K rounded up to whole blocks, N] float32, the added rows zero (MatMulNBits' blocking)."""
    k, n = weight.shape
    w = np.zeros((-(-k // block) * block, n), np.float32)
    w[:k] = weight
    return w


def blocks_of(weight: np.ndarray, block: int) -> np.ndarray:
    """weight [K, N] -> [N, K/block, block] float32, K zero-padded to whole blocks (MatMulNBits' blocking)."""
    w = padded_rows(weight, block)
    return w.T.reshape(weight.shape[1], -1, block)


def signed_range(bits: int) -> tuple[int, int]:
    """The symmetric grid's integers: -2^(bits-1) .. 2^(bits-1) - 1."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def block_extremes(b: np.ndarray) -> np.ndarray:
    """[..., block] -> [...]: each block's value of largest magnitude, its sign kept (MatMulNBits' scale source)."""
    return np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]


def pack_ints(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers [N, blocks, block] in [-2^(bits-1), 2^(bits-1) - 1] -> MatMulNBits' uint8 blocks: stored
    with offset 2^(bits-1), at 4 bits two per byte, the first in the low nibble (ONNX Runtime's layout)."""
    u = (q + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return np.ascontiguousarray(u)


@dataclass(frozen=True)
class DynamicInt8:
    """ONNX Runtime dynamic quantization: per-channel INT8 weights, activations quantized per call."""

    bits: int = 8
    bytes_per_weight: float = 1.0  # per-channel scales: one float per output row, negligible
    bytes_text: str = "1 B"

    def describe(self) -> str:
        return "dynamic INT8 (per-channel weights, DynamicQuantizeMatMul)"

    @staticmethod
    def pack(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """weight [K, N] float32 -> (int8 [K, N], scales [N]): symmetric per output column, range +-127."""
        scale = np.abs(weight).max(axis=0) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return np.clip(np.rint(weight / scale), -127, 127).astype(np.int8), scale

    def emit(self, w, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None,
             out: str | None = None) -> str:
        """x @ weight (+ bias) as one DynamicQuantizeMatMul node (activations quantized per call)."""
        q, scale = self.pack(weight)
        inputs = [x, w.weight(f"{name}.q8", q), w.weight(f"{name}.scale", scale),
                  w.weight(f"{name}.zero", np.zeros(scale.shape, np.int8))]
        if bias is not None:
            inputs.append(w.weight(f"{name}.bias", bias))
        return w.op("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN, names=[out] if out else None)


    def __call__(self, src: Path, dst: Path) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        clean = _without_value_info(src, dst.with_name(dst.stem + ".clean.onnx"))
        try:
            with quiet_quantizer_logs():
                # DefaultTensorType: shape inference cannot type the outputs of ONNX Runtime's fused kernels
                quantize_dynamic(str(clean), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=_external(src),
                                 extra_options={"MatMulConstBOnly": True,
                                                "DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            for p in (clean, clean.with_name(clean.name + ".data")):
                p.unlink(missing_ok=True)


@dataclass(frozen=True)
class Fp32:
    """Weights as they are: MatMul (+ Add)."""

    bits: int = 32
    bytes_per_weight: float = 4.0
    bytes_text: str = "4 B"

    def describe(self) -> str:
        return "fp32"

    def emit(self, w, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None,
             out: str | None = None) -> str:
        names = [out] if out else None
        if bias is None:
            return w.op("MatMul", [x, w.weight(name, weight)], names=names)
        return w.op("Add", [w.op("MatMul", [x, w.weight(name, weight)]), w.weight(f"{name}.bias", bias)], names=names)


FP32 = Fp32()


@dataclass(frozen=True)
class Fp16:
    """fp16 weights and matmuls (for GPUs): activations cast to fp16 at each matmul and back, so the residual
    stream, norms, softmax and the logits stay fp32."""

    bits: int = 16
    bytes_per_weight: float = 2.0
    bytes_text: str = "2 B"
    fp16_activations: bool = True  # a writer keeps overflow-prone matmuls (FLAN-T5's FFN `wo`) in fp32

    def describe(self) -> str:
        return "fp16 weights and matmuls, fp32 between them"

    def emit(self, w, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None,
             out: str | None = None) -> str:
        half = w.op("Cast", [x], to=10)  # FLOAT16
        y = w.op("MatMul", [half, w.weight(name, weight.astype(np.float16))])
        names = [out] if out else None
        if bias is None:
            return w.op("Cast", [y], to=1, names=names)
        return w.op("Add", [w.op("Cast", [y], to=1), w.weight(f"{name}.bias", bias)], names=names)


def _without_value_info(src: Path, dst: Path) -> Path:
    """Copy of `src` without intermediate shape annotations: the quantizer re-infers shapes and trips over
    stale ones the exporter left (seen on GPT-2's tied embedding / LM head)."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    del model.graph.value_info[:]
    external = _external(src)
    onnx.save(model, str(dst), save_as_external_data=external, location=dst.name + ".data" if external else None)
    return dst


@dataclass(frozen=True)
class LlmQuant:
    """One `--llm-quant` choice: the weight format of gemm graphs and of the gemv (decode-step) graph."""

    gemm: BlockQuant | DynamicInt8 | Fp32 | Fp16
    gemv: BlockQuant | DynamicInt8 | Fp32 | Fp16

    def for_graph(self, decode: bool):
        return self.gemv if decode else self.gemm


QUANTIZERS = {"int8": LlmQuant(gemm=DynamicInt8(), gemv=BlockQuant(bits=8, block=128)),
              "int4": LlmQuant(gemm=BlockQuant(bits=4, block=32), gemv=BlockQuant(bits=4, block=128))}
# what the op-by-op writers emit per --llm-quant
LLM_FORMATS = {"none": LlmQuant(gemm=FP32, gemv=FP32), **QUANTIZERS, "fp16": LlmQuant(gemm=Fp16(), gemv=Fp16())}
VISION_FORMATS = {"fp32": FP32, "int8": DynamicInt8()}  # the ViT's matmuls per --precision (CPU graphs)

"""A weight format that quantizes every MatMul but the ones it keeps at fp32 (the tolerance's fallback).

The graph writers (export/graphs_*.py) hand each matmul to its format by a name unique within the artifact
("e0.qkv", "l1.ff.wo", "lm_head", "b3.fc1"); a graph with several decoders (T5 prefill and step) uses the
same name for the same weights, so one name keeps that matmul at fp32 in every graph. A kept matmul is
written as FP32 writes it: a plain MatMul whose weight initializer carries the matmul's name, which is how
a test (or anyone) reads back from an ONNX file which matmuls were left unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .quantize import FP32


@dataclass(frozen=True)
class Mixed:
    """`base` for every matmul, FP32 for the names in `keep`."""

    base: object
    keep: frozenset = frozenset()

    @property
    def bits(self) -> int:
        return self.base.bits

    @property
    def bytes_per_weight(self) -> float:
        return self.base.bytes_per_weight

    @property
    def bytes_text(self) -> str:
        return self.base.bytes_text

    def describe(self) -> str:
        text = self.base.describe()
        return f"{text}; {len(self.keep)} MatMul(s) kept fp32" if self.keep else text

    def emit(self, w, x: str, name: str, weight, bias=None, out: str | None = None) -> str:
        return (FP32 if name in self.keep else self.base).emit(w, x, name, weight, bias, out)


@dataclass
class Census:
    """Wraps a format and records each matmul it writes: name -> weight parameters (K * N), in writing order."""

    fmt: object
    seen: dict = field(default_factory=dict)

    def __getattr__(self, item):
        return getattr(self.fmt, item)

    def emit(self, w, x: str, name: str, weight, bias=None, out: str | None = None) -> str:
        self.seen[name] = int(weight.shape[0]) * int(weight.shape[1])
        return self.fmt.emit(w, x, name, weight, bias, out)

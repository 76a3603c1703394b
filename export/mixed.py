"""A weight format that quantizes every MatMul but the ones it raises to 8 bits or keeps at fp32 (the tolerance's
fallback, export/fallback.py).

The graph writers (export/graphs_*.py) hand each matmul to its format by a name unique within the artifact
("e0.qkv", "l1.ff.wo", "lm_head", "b3.fc1"); a graph with several decoders (T5 prefill and step) uses the
same name for the same weights, so one name keeps that matmul at fp32 in every graph. A kept matmul is
written as FP32 writes it: a plain MatMul whose weight initializer carries the matmul's name, which is how
a test (or anyone) reads back from an ONNX file which matmuls were left unquantized. A raised matmul is written
by the base format's 8-bit step (quantize.BlockQuant.raised: MatMulNBits at 8 bits, same block, weight
initializer `<name>.q8`) inside the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .quantize import FP32


@dataclass(frozen=True)
class Mixed:
    """`base` for every matmul, its 8-bit step for the names in `raised`, FP32 for the names in `keep`."""

    base: object
    keep: frozenset = frozenset()
    raised: frozenset = frozenset()

    @property
    def bits(self) -> int:
        return self.base.bits

    @property
    def bytes_per_weight(self) -> float:
        return self.base.bytes_per_weight

    @property
    def bytes_text(self) -> str:
        return self.base.bytes_text

    @property
    def higher(self):
        """The format a raised matmul is written in (None: the base has no step between it and fp32)."""
        return higher_of(self.base)

    def describe(self) -> str:
        text = self.base.describe()
        if self.raised:
            text += f"; {len(self.raised)} MatMul(s) raised to {self.higher.describe()}"
        return f"{text}; {len(self.keep)} MatMul(s) kept fp32" if self.keep else text

    def emit(self, w, x: str, name: str, weight, bias=None, out: str | None = None) -> str:
        fmt = FP32 if name in self.keep else self.higher if name in self.raised else self.base
        return fmt.emit(w, x, name, weight, bias, out)


def higher_of(fmt):
    """The 8-bit step above `fmt` (a 4-bit MatMulNBits format, smoothed or not), or None."""
    raised = getattr(fmt, "raised", None)
    return raised() if callable(raised) else None


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

"""The tolerance a quantized graph must meet against the fp32 reference on the evaluation set.

Measured with the one comparison (model/fidelity.agreement, via ReferenceEval.compare): the per-token mean KL
(reference || candidate) and top-1 agreement over the answers' and the continuations' positions, and the
diagnosis label agreement. The defaults per format are the project's goals:

| format | labels agree | top-1 | mean KL (nats) |
| --- | --- | --- | --- |
| int8 | 1.00 | >= 0.95 | <= 0.01 |
| int4 | - | >= 0.85 | <= 0.05 |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULTS = {"int8": {"max_kl": 0.01, "min_top1": 0.95, "min_labels": 1.0},
            "int4": {"max_kl": 0.05, "min_top1": 0.85, "min_labels": None}}
MAX_FP32_SHARE = 0.25  # default cap: at most this share of the quantizable matmul weights kept at fp32
MAX_INT8_SHARE = 1.0  # default cap on the weights a 4-bit graph raises to 8 bits before keeping any at fp32


@dataclass(frozen=True)
class Tolerance:
    max_kl: float
    min_top1: float | None = None
    min_labels: float | None = None  # label agreement; None: not required

    @classmethod
    def for_format(cls, fmt: str, max_kl: float | None = None, min_top1: float | None = None,
                   min_labels: float | None = None) -> "Tolerance":
        """The format's defaults (DEFAULTS; int8's for other formats), each overridden where given."""
        d = DEFAULTS.get(fmt, DEFAULTS["int8"])
        return cls(d["max_kl"] if max_kl is None else max_kl, d["min_top1"] if min_top1 is None else min_top1,
                   d["min_labels"] if min_labels is None else min_labels)

    def shortfalls(self, result: dict) -> list[str]:
        """What `result` (a ReferenceEval.compare dict) misses, one phrase each; [] when it meets the tolerance."""
        t = result["tokens"]
        out = []
        if t["kl_mean"] > self.max_kl:
            out.append(f"mean KL {t['kl_mean']:.3g} > {self.max_kl:g}")
        if self.min_top1 is not None and t["top1_agreement"] < self.min_top1:
            out.append(f"top-1 {t['top1_agreement']:.3f} < {self.min_top1:g}")
        if self.min_labels is not None and result["label_agreement"] < self.min_labels:
            out.append(f"label agreement {result['label_agreement']:.2f} < {self.min_labels:g}")
        return out

    def text(self) -> str:
        parts = [f"mean KL <= {self.max_kl:g}"]
        if self.min_top1 is not None:
            parts.append(f"top-1 >= {self.min_top1:g}")
        if self.min_labels is not None:
            parts.append(f"labels >= {self.min_labels:g}")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


def closeness(shortfalls: list, result: dict) -> tuple:
    """How near a graph outside the tolerance comes: fewest shortfalls, then lowest mean KL (smaller is nearer)."""
    return len(shortfalls), result["tokens"]["kl_mean"]


def figures(result: dict) -> dict:
    """The figures the tolerance reads, for the manifest's trial records."""
    t = result["tokens"]
    return {"kl_mean": t["kl_mean"], "top1": t["top1_agreement"], "label_agreement": result["label_agreement"],
            "max_abs_loglik_diff": result["max_abs_loglik_diff"]}

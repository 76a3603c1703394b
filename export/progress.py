"""Step-by-step progress on stderr for long exports, and the closing summary table."""

from __future__ import annotations

import sys
from contextlib import contextmanager


class Progress:
    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.total, self.i = total, 0
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self._pending: list[str] = []
        self.records: list[dict] = []  # per step: title, seconds, peak RSS

    def _say(self, text: str, end: str = "\n") -> None:
        if not self.quiet:
            print(text, end=end, file=self.stream, flush=True)

    @contextmanager
    def step(self, what: str):
        from .resources import Meter

        self.i += 1
        self._say(f"[{self.i}/{self.total}] {what} ...", end="")
        try:
            with Meter() as meter:
                yield
        except BaseException:
            self._say(" failed")
            self._pending.clear()
            raise
        self.records.append({"step": what, **meter.result})
        self._say(f" done ({meter.result['seconds']:.1f} s, peak RSS {meter.result['peak_rss_mib'] / 1024:.1f} GiB)")
        for text in self._pending:
            self._say(f"      {text}")
        self._pending.clear()

    def note(self, text: str) -> None:
        """A detail line, printed under the step that is running."""
        self._pending.append(text)


def summary_table(artifacts: dict) -> str:
    """artifact | size | precision | parity, one row per artifact."""
    rows = [("artifact", "size", "precision", "parity vs PyTorch fp32")]
    for name, a in artifacts.items():
        parity = a.get("parity") or {}
        shown = {k: v for k, v in parity.items() if not isinstance(v, (dict, list))}
        tokens = parity.get("tokens") or {}
        if tokens.get("positions"):  # per-token fidelity: top-1 agreement and KL against fp32
            shown.update(top1=tokens["top1_agreement"], kl_mean=tokens["kl_mean"], kl_max=tokens["kl_max"])
        text = ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        rows.append((name, _size(a.get("bytes", 0)), str(a.get("precision", "-")), text or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

"""Quantized graphs held to the export's tolerance: the fallback search (export/fallback.py) run over a graph
writer, the chosen mix written into the bundle and measured again as shipped, and what the raised (8-bit) and
kept (fp32) matmuls cost.

A graph outside the tolerance is never shipped silently: the export fails (MedblipError, code
"out_of_tolerance") unless --allow-out-of-tolerance, and then the artifact's `quantization.met` is false and
the export prints a note.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import MedblipError
from .fallback import search_levels
from .mixed import Census, Mixed, higher_of
from .tolerance import MAX_FP32_SHARE, MAX_INT8_SHARE, Tolerance, closeness, figures

COLLECT_BYTES = 256 << 20  # a trial's graphs this large are collected (gc) before the next trial is written


def tolerance_of(opts, fmt: str) -> Tolerance:
    return Tolerance.for_format(fmt, opts.max_kl, opts.min_top1, opts.min_labels)


def share_of(opts) -> float:
    """The cap on weights kept fp32. Random-weight presets: 0 unless given (their answers mean nothing, so no
    fallback is searched for them; their figures are measured and recorded all the same)."""
    if opts.max_fp32_share is not None:
        return opts.max_fp32_share
    return 0.0 if random_weights(opts) else MAX_FP32_SHARE


def raised_share_of(opts) -> float:
    """The cap on weights raised to 8 bits inside a 4-bit graph; random-weight presets: 0 unless given."""
    if opts.max_int8_share is not None:
        return opts.max_int8_share
    return 0.0 if random_weights(opts) else MAX_INT8_SHARE


def random_weights(opts) -> bool:
    return opts.preset is not None


def allow_out(opts) -> bool:
    """Whether a mix outside the tolerance may ship (marked): asked for, or random weights (a preset)."""
    return opts.allow_out_of_tolerance or random_weights(opts)


def alternatives_wanted(opts) -> bool:
    """Other quantizers (smoothing alphas, GPTQ) are tried for checkpoints, and for presets only where a fallback
    was asked for."""
    return (opts.smooth or opts.gptq) and (not random_weights(opts) or opts.max_fp32_share is not None)


def _flat(files) -> set:
    """A graph's files ({graph: [files]} or a list), each once."""
    return {f for fs in files.values() for f in fs} if isinstance(files, dict) else set(files)


def disk_bytes(files) -> int:
    """Bytes of a graph's files ({graph: [files]} or a list), each file counted once."""
    return sum(Path(f).stat().st_size for f in _flat(files))


class TolerantWrite:
    """Runs the search for one artifact. `write(folder, fmt_of) -> files` writes the artifact's graphs with
    fmt_of(decode) the format of each graph's matmuls; `compare(files) -> dict` is the reference's comparison
    of those graphs (ReferenceEval.compare); `fmt_of_keep(keep, raised)` -> fmt_of for a mix (`keep` at fp32,
    `raised` at the format's 8-bit step). max_raised_share None: the format has no 8-bit step."""

    def __init__(self, what: str, precision: str, tol: Tolerance, max_share: float, scratch: Path,
                 write: Callable, compare: Callable, fmt_of_keep: Callable, max_raised_share: float | None = None):
        self.what, self.precision, self.tol, self.max_share = what, precision, tol, max_share
        self.max_raised_share = max_raised_share
        self.scratch, self.write, self.compare, self.fmt_of_keep = scratch, write, compare, fmt_of_keep
        self.sizes: dict[str, int] = {}
        self._first: dict | None = None
        self.shipped_fmt_of: Callable | None = None

    def _trial(self, keep: frozenset, census: bool = False, raised: frozenset = frozenset()):
        if self.scratch.exists():
            shutil.rmtree(self.scratch)
        self.scratch.mkdir(parents=True)
        mix, wrapped = self.fmt_of_keep(keep, raised), {}

        def fmt_of(decode):
            return wrapped.setdefault(decode, Census(mix(decode))) if census else mix(decode)
        files = self.write(self.scratch, fmt_of)
        for c in wrapped.values():
            self.sizes.update(c.seen)
        self._held = (self.fmt_of_keep, (keep, raised), files)  # what the scratch folder holds now
        return files

    def _ship(self, folder: Path, keep: frozenset, raised: frozenset, measured: dict):
        """The chosen mix into `folder` -> (files, its comparison). The graphs the scratch folder still holds
        (the last trial, when it is the chosen mix) are moved there as they were measured; otherwise written
        again and measured again."""
        fmt_of_keep, held_keep, files = self._held
        if fmt_of_keep is self.fmt_of_keep and held_keep == (keep, raised):
            folder.mkdir(parents=True, exist_ok=True)
            moved = {}
            for src in _flat(files):
                moved[src] = Path(shutil.move(str(src), str(folder / src.name)))
            self._held = (None, None, None)
            relocated = ({g: [moved[f] for f in fs] for g, fs in files.items()} if isinstance(files, dict)
                         else [moved[f] for f in files])
            return relocated, {k: v for k, v in measured.items() if k != "bytes_on_disk"}
        shipped = self.write(folder, self.fmt_of_keep(keep, raised))
        return shipped, self.compare(shipped)

    def _measured(self, files) -> dict:
        """The reference's comparison of a trial's graphs, with their size on disk."""
        out = {**self.compare(files), "bytes_on_disk": disk_bytes(files)}
        if out["bytes_on_disk"] > COLLECT_BYTES:  # large graphs: free the trial's sessions before the next
            gc.collect()
        return out

    def measure(self, keep: frozenset, raised: frozenset = frozenset()) -> dict:
        if not keep and not raised and self._first is not None:
            return self._first
        return self._measured(self._trial(keep, raised=raised))

    def _better_quantizer(self, alternatives: Callable | None) -> list[dict]:
        """Before any fallback: each alternative quantizer (alternatives() -> [(label, fmt_of_keep)], made only
        now) measured fully quantized; the best (fewest shortfalls, then lowest mean KL) replaces the plain one
        when it does better. -> what was tried, for the manifest."""
        if alternatives is None:
            return []
        best, tried = ("plain", self.fmt_of_keep, self._first), [{"quantizer": "plain", **figures(self._first),
                                                                   "shortfalls": self.tol.shortfalls(self._first)}]
        for label, fmt_of_keep in alternatives():
            self.fmt_of_keep = fmt_of_keep
            result = self._measured(self._trial(frozenset()))
            tried.append({"quantizer": label, **figures(result), "shortfalls": self.tol.shortfalls(result)})
            if _score(result, self.tol) < _score(best[2], self.tol):
                best = (label, fmt_of_keep, result)
        self.fmt_of_keep, self._first = best[1], best[2]
        for t in tried:
            t["chosen"] = t["quantizer"] == best[0]
        return tried

    def run(self, folder: Path, allow_out: bool, timer: Callable | None = None, alternatives: Callable | None = None):
        """Search, then write the chosen mix into `folder` and measure it there. -> (files, result, record,
        note); raises out_of_tolerance when no mix meets the tolerance and `allow_out` is false. timer(files) ->
        {figure: ms}: where matmuls were kept, the record's cost has each figure of the shipped graphs minus the
        fully quantized ones' (timed one after the other on this machine)."""
        self._first = self._measured(self._trial(frozenset(), census=True))
        tried = self._better_quantizer(alternatives) if self.tol.shortfalls(self._first) else []
        fb = search_levels(self.sizes, self.measure, self.tol, self.max_share, self.max_raised_share)
        if tried:
            fb.record["quantizers_tried"] = tried
        shipped, result = self._ship(folder, fb.keep, fb.raised, fb.result)
        self.shipped_fmt_of = self.fmt_of_keep(fb.keep, fb.raised)  # the shipped graphs' formats, for the manifest
        shortfalls = self.tol.shortfalls(result)
        record = {**fb.record, "met": not shortfalls, "shortfalls": shortfalls,
                  "kept_matmuls": sorted(fb.keep), "raised_matmuls": sorted(fb.raised),
                  "quantized_matmuls": sorted(set(self.sizes) - fb.keep - fb.raised),
                  "cost": {"bytes": disk_bytes(shipped) - self._first["bytes_on_disk"]}}
        if self.max_raised_share is not None:
            record["max_int8_share"] = self.max_raised_share
        n = len(self.sizes)
        if shortfalls and not allow_out:
            raise MedblipError(
                f"{self.what} ({self.precision}) misses the tolerance ({self.tol.text()}) with every mix "
                f"{self._caps()}: the closest {self._mix_text(fb.keep, fb.raised)} of {n} and gives "
                f"{', '.join(shortfalls)}. Loosen --max-kl / --min-top1 / --min-labels, raise --max-fp32-share"
                f"{' / --max-int8-share' if self.max_raised_share is not None else ''}, or pass "
                "--allow-out-of-tolerance to ship it marked", code="out_of_tolerance")
        if timer is not None:  # the shipped graphs' speed; where matmuls were kept, against the fully quantized
            record["speed_ms"] = timer(shipped)
            if fb.keep or fb.raised:
                record["cost"].update(time_cost(timer, record["speed_ms"], self._trial(frozenset())))
        note = None
        if shortfalls:
            note = f"{self.what} ({self.precision}) shipped OUTSIDE its tolerance: {', '.join(shortfalls)}"
        elif fb.keep or fb.raised:
            note = f"{self.what} ({self.precision}): {self._mix_text(fb.keep, fb.raised)} of {n} matmuls to meet " \
                   f"{self.tol.text()}"
        return shipped, result, record, note

    def _caps(self) -> str:
        fp32 = f"keeping at most {self.max_share:g} of its matmul weights at fp32"
        if self.max_raised_share is None:
            return fp32
        return f"raising at most {self.max_raised_share:g} of them to 8 bits and {fp32}"

    @staticmethod
    def _mix_text(keep: frozenset, raised: frozenset) -> str:
        parts = ([f"raises {len(raised)} to 8 bits"] if raised else []) + [f"keeps {len(keep)} at fp32"]
        return " and ".join(parts)


def _score(result: dict, tol: Tolerance) -> tuple:
    return closeness(tol.shortfalls(result), result)


def time_cost(timer: Callable, shipped: dict, all_quantized) -> dict:
    """timer's figures for the fully quantized graphs, and the shipped mix's minus theirs (ms)."""
    b = timer(all_quantized)
    return {"all_quantized_ms": b, **{f"{k}_ms" if not k.endswith("_ms") else k: round(shipped[k] - b[k], 3)
                                      for k in shipped}}


def mixed_llm(formats) -> Callable:
    """(keep, raised) -> fmt_of(decode) for an LlmQuant: each graph's format with `keep` at fp32 and `raised` at
    its 8-bit step."""
    return lambda keep, raised=frozenset(): (lambda decode: Mixed(formats.for_graph(decode), keep, raised))


def has_raised_step(formats) -> bool:
    """Whether every graph's format of an LlmQuant has an 8-bit step (4-bit MatMulNBits)."""
    return higher_of(formats.gemm) is not None and higher_of(formats.gemv) is not None

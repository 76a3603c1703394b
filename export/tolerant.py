"""Quantized graphs held to the export's tolerance: the fallback search (export/fallback.py) run over a graph
writer, the chosen mix written into the bundle and measured again as shipped, and what the kept matmuls cost.

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
from .fallback import search
from .mixed import Census, Mixed
from .tolerance import MAX_FP32_SHARE, Tolerance, figures

COLLECT_BYTES = 256 << 20  # a trial's graphs this large are collected (gc) before the next trial is written


def tolerance_of(opts, fmt: str) -> Tolerance:
    return Tolerance.for_format(fmt, opts.max_kl, opts.min_top1, opts.min_labels)


def share_of(opts) -> float:
    """The cap on weights kept fp32. Random-weight presets: 0 unless given (their answers mean nothing, so no
    fallback is searched for them; their figures are measured and recorded all the same)."""
    if opts.max_fp32_share is not None:
        return opts.max_fp32_share
    return 0.0 if random_weights(opts) else MAX_FP32_SHARE


def random_weights(opts) -> bool:
    return opts.preset is not None


def allow_out(opts) -> bool:
    """Whether a mix outside the tolerance may ship (marked): asked for, or random weights (a preset)."""
    return opts.allow_out_of_tolerance or random_weights(opts)


def smoothing_wanted(opts) -> bool:
    """Smoothing alphas are tried for checkpoints, and for presets only where a fallback was asked for."""
    return opts.smooth and (not random_weights(opts) or opts.max_fp32_share is not None)


def disk_bytes(files) -> int:
    """Bytes of a graph's files ({graph: [files]} or a list), each file counted once."""
    flat = [f for fs in files.values() for f in fs] if isinstance(files, dict) else list(files)
    return sum(Path(f).stat().st_size for f in set(flat))


class TolerantWrite:
    """Runs the search for one artifact. `write(folder, fmt_of) -> files` writes the artifact's graphs with
    fmt_of(decode) the format of each graph's matmuls; `compare(files) -> dict` is the reference's comparison
    of those graphs (ReferenceEval.compare); `fmt_of_keep(keep)` -> fmt_of for a mix."""

    def __init__(self, what: str, precision: str, tol: Tolerance, max_share: float, scratch: Path,
                 write: Callable, compare: Callable, fmt_of_keep: Callable):
        self.what, self.precision, self.tol, self.max_share = what, precision, tol, max_share
        self.scratch, self.write, self.compare, self.fmt_of_keep = scratch, write, compare, fmt_of_keep
        self.sizes: dict[str, int] = {}
        self._first: dict | None = None

    def _trial(self, keep: frozenset, census: bool = False):
        if self.scratch.exists():
            shutil.rmtree(self.scratch)
        self.scratch.mkdir(parents=True)
        mix, wrapped = self.fmt_of_keep(keep), {}

        def fmt_of(decode):
            return wrapped.setdefault(decode, Census(mix(decode))) if census else mix(decode)
        files = self.write(self.scratch, fmt_of)
        for c in wrapped.values():
            self.sizes.update(c.seen)
        self._held = (self.fmt_of_keep, keep, files)  # what the scratch folder holds now
        return files

    def _ship(self, folder: Path, keep: frozenset, measured: dict):
        """The chosen mix into `folder` -> (files, its comparison). The graphs the scratch folder still holds
        (the last trial, when it is the chosen mix) are moved there as they were measured; otherwise written
        again and measured again."""
        fmt_of_keep, held_keep, files = self._held
        if fmt_of_keep is self.fmt_of_keep and held_keep == keep:
            folder.mkdir(parents=True, exist_ok=True)
            moved = {}
            for src in {f for fs in (files.values() if isinstance(files, dict) else [files]) for f in fs}:
                moved[src] = Path(shutil.move(str(src), str(folder / src.name)))
            self._held = (None, None, None)
            relocated = ({g: [moved[f] for f in fs] for g, fs in files.items()} if isinstance(files, dict)
                         else [moved[f] for f in files])
            return relocated, {k: v for k, v in measured.items() if k != "bytes_on_disk"}
        shipped = self.write(folder, self.fmt_of_keep(keep))
        return shipped, self.compare(shipped)

    def measure(self, keep: frozenset) -> dict:
        if not keep and self._first is not None:
            return self._first
        files = self._trial(keep)
        out = {**self.compare(files), "bytes_on_disk": disk_bytes(files)}
        if out["bytes_on_disk"] > COLLECT_BYTES:  # large graphs: free the trial's sessions before the next
            gc.collect()
        return out

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
            files = self._trial(frozenset())
            result = {**self.compare(files), "bytes_on_disk": disk_bytes(files)}
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
        files = self._trial(frozenset(), census=True)
        self._first = {**self.compare(files), "bytes_on_disk": disk_bytes(files)}
        tried = self._better_quantizer(alternatives) if self.tol.shortfalls(self._first) else []
        fb = search(self.sizes, self.measure, self.tol, self.max_share)
        if tried:
            fb.record["quantizers_tried"] = tried
        shipped, result = self._ship(folder, fb.chosen.keep, fb.chosen.result)
        shortfalls = self.tol.shortfalls(result)
        record = {**fb.record, "met": not shortfalls, "shortfalls": shortfalls,
                  "kept_matmuls": sorted(fb.chosen.keep), "quantized_matmuls": sorted(set(self.sizes) - fb.chosen.keep),
                  "cost": {"bytes": disk_bytes(shipped) - self._first["bytes_on_disk"]}}
        if shortfalls and not allow_out:
            kept = len(fb.chosen.keep)
            raise MedblipError(
                f"{self.what} ({self.precision}) misses the tolerance ({self.tol.text()}) with every mix keeping at "
                f"most {self.max_share:g} of its matmul weights at fp32: the closest keeps {kept} of {len(self.sizes)} "
                f"and gives {', '.join(shortfalls)}. Loosen --max-kl / --min-top1 / --min-labels, raise "
                f"--max-fp32-share, or pass --allow-out-of-tolerance to ship it marked", code="out_of_tolerance")
        if timer is not None:  # the shipped graphs' speed; where matmuls were kept, against the fully quantized
            record["speed_ms"] = timer(shipped)
            if fb.chosen.keep:
                record["cost"].update(time_cost(timer, record["speed_ms"], self._trial(frozenset())))
        note = None
        if shortfalls:
            note = f"{self.what} ({self.precision}) shipped OUTSIDE its tolerance: {', '.join(shortfalls)}"
        elif fb.chosen.keep:
            note = (f"{self.what} ({self.precision}): {len(fb.chosen.keep)} of {len(self.sizes)} matmuls kept fp32 to "
                    f"meet {self.tol.text()}")
        return shipped, result, record, note


def _score(result: dict, tol: Tolerance) -> tuple:
    return (len(tol.shortfalls(result)), result["tokens"]["kl_mean"])


def time_cost(timer: Callable, shipped: dict, all_quantized) -> dict:
    """timer's figures for the fully quantized graphs, and the shipped mix's minus theirs (ms)."""
    b = timer(all_quantized)
    return {"all_quantized_ms": b, **{f"{k}_ms" if not k.endswith("_ms") else k: round(shipped[k] - b[k], 3)
                                      for k in shipped}}


def mixed_llm(formats) -> Callable:
    """keep -> fmt_of(decode) for an LlmQuant: each graph's format with `keep` at fp32."""
    return lambda keep: (lambda decode: Mixed(formats.for_graph(decode), keep))

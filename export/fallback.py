"""Which matmuls a quantized graph raises to higher precision so that the whole graph meets its tolerance.

1. The fully quantized graph is measured; if it meets the tolerance, nothing is kept.
2. Sensitivity: each matmul quantized alone (every other one fp32), the whole graph run on the evaluation set,
   its mean KL against the reference (then top-1 loss, then the largest log-likelihood change) is that matmul's
   sensitivity: the effect on the final next-token distribution, measured, not a proxy.
3. Quantize from the least sensitive upward: keep the k most sensitive at fp32, k the smallest that meets the
   tolerance, found by doubling k and then bisecting between the last mix that missed and the first that met
   (each mix is measured; the one chosen is always one measured to meet it). At most `max_share` of the
   quantizable weights stay fp32 (past that the graph is no longer the format asked for): a matmul too large
   for what is left of the share is skipped and the next most sensitive considered.

Where the base format has an 8-bit step (a 4-bit graph: export/quantize.BlockQuant.raised), the higher
precision comes in two steps, `search_levels`: step 3 first raises the most sensitive matmuls to 8 bits (at
most `max_raised_share` of the weights), and only if every mix there misses, keeps the most sensitive of those
at fp32 (at most `max_share`), the rest still at 8 bits. Both steps use the one sensitivity order of step 2.

The cost: one graph write and one evaluation pass per matmul for step 2, and about 2 log2(N) for step 3, at the
evaluation set's budget (seconds for the test fixtures; the whole search is skipped when step 1 meets it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .tolerance import Tolerance, closeness, figures


@dataclass
class Mix:
    keep: frozenset
    result: dict  # ReferenceEval.compare of the graph keeping `keep` at fp32
    shortfalls: list

    @property
    def met(self) -> bool:
        return not self.shortfalls


@dataclass
class Fallback:
    """The search's outcome: the mix to ship (the smallest that met, or the closest measured if none did)."""

    chosen: Mix
    met: bool
    record: dict = field(default_factory=dict)
    alone: dict = field(default_factory=dict)  # matmul -> its comparison quantized alone (step 2), when measured
    largest: frozenset = frozenset()  # the largest mix the share allowed (the most sensitive that fit)


def _rank_key(result: dict) -> tuple:
    t = result["tokens"]
    return (t["kl_mean"], -t["top1_agreement"], result["max_abs_loglik_diff"])


def search(sizes: dict[str, int], measure: Callable[[frozenset], dict], tol: Tolerance, max_share: float,
           say: Callable[[str], None] = lambda s: None, alone: dict | None = None, level: str = "fp32") -> Fallback:
    """sizes: matmul name -> weight parameters; measure(keep) -> ReferenceEval.compare dict of the graph with the
    names in `keep` at higher precision (`level`) and every other matmul quantized. alone: step 2's figures when
    already measured (name -> the comparison with that matmul alone quantized)."""
    start = time.perf_counter()
    trials: dict[frozenset, Mix] = {}

    def mix(keep: frozenset) -> Mix:
        if keep not in trials:
            result = measure(keep)
            trials[keep] = Mix(keep, result, tol.shortfalls(result))
        return trials[keep]

    names = list(sizes)
    full = mix(frozenset())
    record = {"tolerance": tol.as_dict(), f"max_{level}_share": max_share, "matmuls": len(names),
              "all_quantized": {**figures(full.result), "shortfalls": full.shortfalls}}
    if full.met:
        return Fallback(full, True, {**record, "kept": [], "kept_parameter_share": 0.0,
                                     "seconds": round(time.perf_counter() - start, 1),
                                     "why": "the fully quantized graph meets the tolerance"})
    budget = max_share * sum(sizes.values())
    if not names or min(sizes.values()) > budget:  # nothing may be kept: the fully quantized graph is the mix
        return Fallback(full, False, {**record, "kept": [], "kept_parameter_share": 0.0,
                                      "seconds": round(time.perf_counter() - start, 1),
                                      "why": f"no matmul fits within {max_share:g} of the weights kept at {level}"})
    if alone is None:
        say(f"{full.shortfalls[0]} fully quantized: measuring the {len(names)} matmuls' sensitivity")
        everything = frozenset(names)
        alone = {n: measure(everything - {n}) for n in names}
    order = sorted(names, key=lambda n: _rank_key(alone[n]), reverse=True)  # most sensitive first
    fits, total = [], 0  # the most sensitive first, each that still fits within the share (larger ones skipped)
    for n in order:
        if total + sizes[n] <= budget:
            fits.append(n)
            total += sizes[n]
    k_max = len(fits)
    prefix = [frozenset(fits[:k]) for k in range(k_max + 1)]
    lo, hi = 0, None  # lo: a k measured to miss; hi: the smallest k measured to meet
    k = 1
    while k <= k_max:
        if mix(prefix[k]).met:
            hi = k
            break
        lo, k = k, (k_max if k < k_max < 2 * k else 2 * k)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if mix(prefix[mid]).met:
            hi = mid
        else:
            lo = mid
    if hi is not None:
        chosen = mix(prefix[hi])
    else:  # none met: the closest measured mix (fewest shortfalls, then lowest mean KL), for --allow-out-of-tolerance
        chosen = min((trials[p] for p in prefix if p in trials),
                     key=lambda m: (*closeness(m.shortfalls, m.result), len(m.keep)))
    skipped = [n for n in order[:order.index(fits[-1]) + 1] if n not in fits] if fits else []
    missed = trials[prefix[lo]]
    rank = {n: i + 1 for i, n in enumerate(order)}
    kept = [{"matmul": n, "parameters": sizes[n], "sensitivity_rank": rank[n],
             "alone": figures(alone[n]),
             "why": (f"sensitivity rank {rank[n]} of {len(names)} (quantized alone: mean KL "
                     f"{alone[n]['tokens']['kl_mean']:.3g}, top-1 {alone[n]['tokens']['top1_agreement']:.3f}); "
                     f"{'raising' if level == 'int8' else 'keeping'} the {lo} most sensitive "
                     f"{'to 8 bits' if level == 'int8' else 'at fp32'} missed: {'; '.join(missed.shortfalls)}")}
            for n in order if n in chosen.keep]
    all_params = sum(sizes.values())
    record.update({
        "kept": kept, "kept_parameter_share": sum(sizes[n] for n in chosen.keep) / all_params,
        "max_kept_within_share": k_max, "skipped_too_large": skipped,
        "sensitivity": [{"matmul": n, "parameters": sizes[n], **figures(alone[n])} for n in order],
        # additivity check of the order: the alone KLs summed, against the fully quantized graph's
        "alone_kl_sum": sum(alone[n]["tokens"]["kl_mean"] for n in names),
        "trials": [{"kept": len(m.keep), **figures(m.result), "shortfalls": m.shortfalls}
                   for keep, m in trials.items() if keep in prefix],
        "seconds": round(time.perf_counter() - start, 1),
        "why": ("the smallest measured mix that meets the tolerance" if chosen.met else
                f"no mix keeping at most {max_share:g} of the weights at {level} meets the tolerance"),
    })
    return Fallback(chosen, chosen.met, record, alone, prefix[k_max])


@dataclass
class Levels:
    """search_levels' outcome: the matmuls kept fp32 and those raised to 8 bits, the comparison of that mix."""

    keep: frozenset
    raised: frozenset
    result: dict
    met: bool
    record: dict


def search_levels(sizes: dict[str, int], measure: Callable[[frozenset, frozenset], dict], tol: Tolerance,
                  max_share: float, max_raised_share: float | None,
                  say: Callable[[str], None] = lambda s: None) -> Levels:
    """measure(keep, raised) -> the comparison of the graph with `keep` at fp32, `raised` at the base format's
    8-bit step and every other matmul quantized. max_raised_share None: no 8-bit step (straight to fp32)."""
    def fp32_only(**extra) -> Levels:
        fb = search(sizes, lambda keep: measure(keep, frozenset()), tol, max_share, say)
        return Levels(fb.chosen.keep, frozenset(), fb.chosen.result, fb.met, {**fb.record, "steps": ["fp32"], **extra})

    if not max_raised_share:
        return fp32_only()
    up = search(sizes, lambda raised: measure(frozenset(), raised), tol, max_raised_share, say, level="int8")
    record = {**up.record, "max_fp32_share": max_share, "steps": ["int8"],
              "raised": up.record.get("kept", []), "kept": [], "kept_parameter_share": 0.0,
              "raised_parameter_share": up.record.get("kept_parameter_share", 0.0)}
    if up.met:
        return Levels(frozenset(), up.chosen.keep, up.chosen.result, True, record)
    if not up.alone:  # no matmul fits the 8-bit share: the fp32 step alone
        return fp32_only(raised=[], raised_parameter_share=0.0)
    say(f"no mix raising at most {max_raised_share:g} of the weights to 8 bits meets the tolerance: keeping fp32")
    top = search(sizes, lambda keep: measure(keep, up.largest - keep), tol, max_share, say, alone=up.alone)
    raised = up.largest - top.chosen.keep
    if not top.met and _closer(up.chosen, top.chosen):  # nothing met: ship the closest of both steps
        return Levels(frozenset(), up.chosen.keep, up.chosen.result, False, record)
    total = sum(sizes.values())
    record.update({"steps": ["int8", "fp32"], "kept": top.record.get("kept", []),
                   "kept_parameter_share": sum(sizes[n] for n in top.chosen.keep) / total,
                   "raised": [r for r in up.record.get("kept", []) if r["matmul"] in raised],
                   "raised_parameter_share": sum(sizes[n] for n in raised) / total,
                   "fp32_trials": top.record.get("trials", []), "fp32_skipped_too_large": top.record.get(
                       "skipped_too_large", []), "why": top.record["why"],
                   "seconds": round(up.record["seconds"] + top.record["seconds"], 1)})
    return Levels(top.chosen.keep, raised, top.chosen.result, top.met, record)


def _closer(a: Mix, b: Mix) -> bool:
    return closeness(a.shortfalls, a.result) <= closeness(b.shortfalls, b.result)

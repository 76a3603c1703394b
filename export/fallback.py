"""Which matmuls a quantized graph keeps at fp32 so that the whole graph meets its tolerance.

1. The fully quantized graph is measured; if it meets the tolerance, nothing is kept.
2. Sensitivity: each matmul quantized alone (every other one fp32), the whole graph run on the evaluation set,
   its mean KL against the reference (then top-1 loss, then the largest log-likelihood change) is that matmul's
   sensitivity: the effect on the final next-token distribution, measured, not a proxy.
3. Quantize from the least sensitive upward: keep the k most sensitive at fp32, k the smallest that meets the
   tolerance, found by doubling k and then bisecting between the last mix that missed and the first that met
   (each mix is measured; the one chosen is always one measured to meet it). At most `max_share` of the
   quantizable weights stay fp32 (past that the graph is no longer the format asked for): a matmul too large
   for what is left of the share is skipped and the next most sensitive considered.

The cost: one graph write and one evaluation pass per matmul for step 2, and about 2 log2(N) for step 3, at the
evaluation set's budget (seconds for the test fixtures; the whole search is skipped when step 1 meets it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .tolerance import Tolerance, figures


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


def _rank_key(result: dict) -> tuple:
    t = result["tokens"]
    return (t["kl_mean"], -t["top1_agreement"], result["max_abs_loglik_diff"])


def search(sizes: dict[str, int], measure: Callable[[frozenset], dict], tol: Tolerance, max_share: float,
           say: Callable[[str], None] = lambda s: None) -> Fallback:
    """sizes: matmul name -> weight parameters; measure(keep) -> ReferenceEval.compare dict of the graph with the
    names in `keep` at fp32 and every other matmul quantized."""
    start = time.perf_counter()
    trials: dict[frozenset, Mix] = {}

    def mix(keep: frozenset) -> Mix:
        if keep not in trials:
            result = measure(keep)
            trials[keep] = Mix(keep, result, tol.shortfalls(result))
        return trials[keep]

    names = list(sizes)
    full = mix(frozenset())
    record = {"tolerance": tol.as_dict(), "max_fp32_share": max_share, "matmuls": len(names),
              "all_quantized": {**figures(full.result), "shortfalls": full.shortfalls}}
    if full.met:
        return Fallback(full, True, {**record, "kept": [], "kept_parameter_share": 0.0,
                                     "seconds": round(time.perf_counter() - start, 1),
                                     "why": "the fully quantized graph meets the tolerance"})
    budget = max_share * sum(sizes.values())
    if not names or min(sizes.values()) > budget:  # nothing may be kept: the fully quantized graph is the mix
        return Fallback(full, False, {**record, "kept": [], "kept_parameter_share": 0.0,
                                      "seconds": round(time.perf_counter() - start, 1),
                                      "why": f"no matmul fits within {max_share:g} of the weights kept at fp32"})
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
                     key=lambda m: (len(m.shortfalls), m.result["tokens"]["kl_mean"], len(m.keep)))
    skipped = [n for n in order[:order.index(fits[-1]) + 1] if n not in fits] if fits else []
    missed = trials[prefix[lo]]
    rank = {n: i + 1 for i, n in enumerate(order)}
    kept = [{"matmul": n, "parameters": sizes[n], "sensitivity_rank": rank[n],
             "alone": figures(alone[n]),
             "why": (f"sensitivity rank {rank[n]} of {len(names)} (quantized alone: mean KL "
                     f"{alone[n]['tokens']['kl_mean']:.3g}, top-1 {alone[n]['tokens']['top1_agreement']:.3f}); "
                     f"keeping the {lo} most sensitive missed: {'; '.join(missed.shortfalls)}")}
            for n in order if n in chosen.keep]
    all_params = sum(sizes.values())
    record.update({
        "kept": kept, "kept_parameter_share": sum(sizes[n] for n in chosen.keep) / all_params,
        "max_kept_within_share": k_max, "skipped_too_large": skipped,
        "sensitivity": [{"matmul": n, "parameters": sizes[n], **figures(alone[n])} for n in order],
        "trials": [{"kept": len(m.keep), **figures(m.result), "shortfalls": m.shortfalls}
                   for keep, m in trials.items() if keep in prefix],
        "seconds": round(time.perf_counter() - start, 1),
        "why": ("the smallest measured mix that meets the tolerance" if chosen.met else
                f"no mix keeping at most {max_share:g} of the weights at fp32 meets the tolerance"),
    })
    return Fallback(chosen, chosen.met, record)

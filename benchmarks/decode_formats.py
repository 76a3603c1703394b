"""`medblip-bench decode-formats`: which decoder-step graph and weight format decode fastest here: one process,
the variants interleaved.

From the bundle's fp32 weights (a T5-family bundle): the traced step graph and the one written with
fused kernels, each in fp32, ONNX Runtime dynamic INT8 (per-channel, DynamicQuantizeMatMul) and
MatMulNBits at 8 and 4 bits with blocks of 32 and 128, all with their weights on 2 MiB pages as the
runtime loads them, plus the two shipped formats again on 4 KiB pages. Rounds of each variant in turn, so that a
busy neighbour on a shared machine slows every variant alike; p50 over all rounds, ratio to the
shipped int8 step, and each variant's memory floor (its weight bytes; the small KV cache left out) from
the same run's measured bandwidth.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from ..export.quantize import ACCURACY_LEVEL, QUANTIZERS, BlockQuant, DynamicInt8
from ..runtime.hugepages import new_memory_on_huge_pages
from ..runtime.ort_cache import InPlaceKV
from ..runtime.ort_graph import OrtGraph
from .limits import bandwidth
from .suite import Outcome, Run, suite
from .timing import summary, time_calls

SMALL_PAGES = "(4 KiB pages)"  # rows loaded outside new_memory_on_huge_pages(), as the runtime with --no-huge-pages
DECODE_PAST = 16  # cached tokens before the timed step: the bench's mean past over its 16 decode steps
SRC = 45  # encoder tokens: a short prompt + 32 visual tokens


def _formats() -> dict:
    """name -> (quantizer or None for fp32, bytes per weight)."""
    quantizers = {"int8-dynamic": DynamicInt8(),
                  **{f"int{b}-block{k}": BlockQuant(b, k) for b, k in ((8, 32), (8, 128), (4, 32), (4, 128))}}
    return {"fp32": (None, 4.0), **{name: (q, q.bytes_per_weight) for name, q in quantizers.items()}}


def _graphs(bundle_path: Path, work: Path) -> dict[str, Path]:
    """{"traced": fp32 step graph, "fused": fp32 step graph} from the bundle's weights."""
    from ..bundle.reader import Bundle
    from ..export.graphs_t5_fused import T5DecoderWriter
    from ..export.llm_graphs import traced_t5_step
    from ..model.weights import load_weights

    bundle = Bundle.open(bundle_path)
    model = load_weights(bundle.config, bundle.path("torch"))
    out = {}
    for kind, write in (("traced", traced_t5_step), ("fused", lambda t5, p: T5DecoderWriter(t5).write(p, True))):
        (work / kind).mkdir()
        out[kind] = write(model.llm, work / kind / "step.onnx")[0]
    return out


def _feeds(graph: OrtGraph, rng) -> dict:
    """Random inputs for a T5 step graph: one token, DECODE_PAST cached tokens, SRC encoder tokens."""
    feeds = {"decoder_ids": np.array([[5]], np.int64)}
    for i in graph.session.get_inputs():
        if i.name == "past_len":
            feeds[i.name] = np.array(DECODE_PAST, np.int64)
        elif i.name != "decoder_ids":
            shape = [1 if d == "batch" else DECODE_PAST if d in ("past", "capacity") else SRC if d == "src" else d
                     for d in i.shape]
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _runner(graph: OrtGraph, rng):
    """One decode step at DECODE_PAST cached tokens, called as the runtime calls this graph (runtime/ort_cache.py)."""
    feeds = _feeds(graph, rng)
    if "past_len" not in graph.inputs:
        return lambda: graph(**feeds)
    layers = sum(n.startswith("past_k_") for n in feeds)
    cache = InPlaceKV(graph, [feeds[f"past_k_{i}"] for i in range(layers)], [feeds[f"past_v_{i}"] for i in range(layers)],
                      {n: v for n, v in feeds.items() if n.startswith("cross_")}, DECODE_PAST)

    def step():
        cache.length = DECODE_PAST  # the same position every call: the same work as the traced rows
        cache.step(5)
    return step


def time_interleaved(graphs: dict, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Each round: every variant in turn, 3 untimed steps then `per_round` timed -> {variant: ms per step}."""
    rng = np.random.default_rng(0)
    runners = {k: _runner(g, rng) for k, g in graphs.items()}
    ms: dict[str, list[float]] = {k: [] for k in graphs}
    for _ in range(rounds):
        for k, step in runners.items():
            ms[k] += time_calls(step, "cpu", per_round, warmup=3)[0]
    return ms


def _variants(run: Run, bundle_path: Path, work: Path) -> tuple[dict, dict, dict]:
    """Every (graph, format) variant written and quantized in `work` -> (paths, bytes per weight, the fp32 graphs)."""
    run.say("writing the traced and fused fp32 step graphs ...")
    graphs = _graphs(bundle_path, work)
    paths, bpw = {}, {}
    for kind, src in graphs.items():
        for fmt, (quantize, nbytes) in _formats().items():
            name = f"{kind} {fmt}"
            paths[name], bpw[name] = src, nbytes
            if quantize is not None:
                paths[name] = src.with_name(f"{fmt}.onnx")
                run.say(f"quantizing {name} ...")
                quantize(src, paths[name])
    return paths, bpw, graphs


def measure(run: Run, bundle_path: Path, rounds: int, per_round: int) -> dict:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="medblip-variants-") as tmp:
        paths, bpw, graphs = _variants(run, bundle_path, Path(tmp))
        shipped = [f"fused {_shipped_name(k)}" for k in QUANTIZERS]
        # loaded before the scope below, so they stay on 4 KiB pages (the runtime with huge_pages=False)
        graphs_by_variant = {f"{k} {SMALL_PAGES}": OrtGraph(paths[k], spin=True) for k in shipped}
        with new_memory_on_huge_pages() as moved:
            graphs_by_variant = {**{k: OrtGraph(p, spin=True) for k, p in paths.items()}, **graphs_by_variant}
        for k in shipped:
            paths[f"{k} {SMALL_PAGES}"], bpw[f"{k} {SMALL_PAGES}"] = paths[k], bpw[k]
        nodes = {k: len(onnx.load(str(p), load_external_data=False).graph.node) for k, p in paths.items()}
        weights = _step_weights(graphs["fused"])
        bw = bandwidth("cpu", quick=False)["bytes_per_s"]
        run.say(f"timing {len(graphs_by_variant)} variants, {rounds} rounds x {per_round} steps ...")
        ms = time_interleaved(graphs_by_variant, rounds, per_round)
        bw = max(bw, bandwidth("cpu", quick=False)["bytes_per_s"])
    base = summary(ms[f"fused {_shipped_name('int8')}"])["p50"]  # the rows' own p50, so the shipped row is 1.0
    rows = []
    for name, samples in ms.items():
        s = summary(samples)
        floor_ms = 1e3 * weights * bpw[name] / bw
        rows.append({"variant": name, "nodes": nodes[name], **{k: s[k] for k in ("p50", "p90", "min", "n")},
                     "floor_ms": round(floor_ms, 3),
                     "p50_over_floor": round(s["p50"] / floor_ms, 2), "vs_shipped_int8": round(s["p50"] / base, 2)})
    return {"bundle": str(bundle_path), "decode_past": DECODE_PAST, "src": SRC, "accuracy_level": ACCURACY_LEVEL,
            "huge_pages": moved.as_json(), "huge_pages_described": moved.describe(),
            "step_weights": weights, "bandwidth_bytes_per_s": bw, "onnxruntime": ort.__version__,
            "shipped": {k: _shipped_name(k) for k in QUANTIZERS}, "rows": rows}


def report(res: dict) -> str:
    lines = [f"2 MiB pages: {res['huge_pages_described']}. Step at {res['decode_past']} cached tokens, {res['src']} "
             f"encoder tokens; floor = the step's weight bytes / {res['bandwidth_bytes_per_s'] / 1e9:.3g} GB/s "
             "measured in the same run.", "",
             "| variant | nodes | p50 ms | p90 ms | floor ms | p50/floor | vs shipped int8 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['variant']} | {r['nodes']} | {r['p50']:.2f} | {r['p90']:.2f} | {r['floor_ms']:.2f} | "
              f"{r['p50_over_floor']:.2f} | {r['vs_shipped_int8']:.2f} |" for r in res["rows"]]
    return "\n".join(lines)


@suite("decode-formats")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A T5-family bundle (its fp32 weights are read; its own LLM graphs are not used).")
@click.option("--rounds", default=10, show_default=True, help="Rounds over all variants.")
@click.option("--per-round", default=30, show_default=True, help="Timed steps per variant per round.")
def command(run: Run, bundle_path: Path, rounds: int, per_round: int) -> Outcome:
    """Time one LLM decode step (T5) per graph form and weight format, on 2 MiB pages as the runtime loads
    them, interleaved in one process so a busy neighbour slows every variant alike.

    Variants: the traced step graph and the one written with fused kernels, each in fp32, ONNX Runtime
    dynamic INT8 and MatMulNBits at 8 and 4 bits with blocks of 32 and 128; the two shipped formats again
    on 4 KiB pages. Per variant: p50/p90 ms, node count, ratio to the shipped int8 step, and the memory
    floor (its weight bytes over the bandwidth measured in the same run).
    """
    return Outcome("Decode step per graph form and weight format", measure(run, bundle_path, rounds, per_round),
                   report)


def _shipped_name(precision: str) -> str:
    q = QUANTIZERS[precision].gemv
    return f"int{q.bits}-block{q.block}" if isinstance(q, BlockQuant) else "int8-dynamic"


def _step_weights(graph: Path) -> int:
    """Weights one step reads: every MatMul initializer (the embedding Gather reads one row, not counted)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            total += int(np.prod(inits[node.input[1]].dims))
    return total

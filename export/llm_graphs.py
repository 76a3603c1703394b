"""Which ONNX graphs each LLM family ships: traced modules with example inputs and dynamic axes, or
graphs written op by op (`write`) where fused ONNX Runtime kernels beat the traced ops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim

from .graphs_gpt2 import Gpt2PrefillGraph, Gpt2StepGraph
from .graphs_t5 import Layerwise, T5DecoderPrefillGraph, T5DecoderStepGraph, T5EncoderGraph, layer_names
from .graphs_t5_fused import T5DecoderWriter


@dataclass
class GraphSpec:
    name: str  # file stem and manifest key suffix
    module: torch.nn.Module
    args: tuple
    inputs: list[str]
    outputs: list[str]
    dynamic: dict  # by input name (Layerwise adapters take *args: {"args": (per position)})
    write: Callable[[Path], list[Path]] | None = None  # fp32 only: path -> files written, instead of tracing
    decode: bool = False  # the per-token decode graph: its matmuls are matrix-vector products at batch 1

    def export(self, path: Path, fused: bool) -> list[Path]:
        from .onnx_export import export_onnx

        if fused and self.write is not None:
            return self.write(path)
        return export_onnx(self.module, self.args, path, self.inputs, self.outputs, self.dynamic)


def _dims():
    # Traced with sizes >= 2 so that torch.export keeps these axes symbolic (1 is specialised).
    return (Dim("batch", min=1, max=64), Dim("seq", min=1, max=1024), Dim("past", min=1, max=2048),
            Dim("src", min=1, max=2048), Dim("prompt", min=1, max=1024))


@torch.no_grad()
def t5_graphs(llm, d_llm: int, num_query: int) -> list[GraphSpec]:
    """Encoder (traced), decoder prefill and step (written with fused kernels; traced for fp16), per-layer caches."""
    batch, seq, past, src, prompt = _dims()
    n = llm.config.num_decoder_layers
    ids = torch.tensor([[5, 6, 7, 8, 1]])
    visual = torch.randn(2, num_query, d_llm)
    enc = T5EncoderGraph(llm)
    _, ck, cv = enc(ids, visual)
    dec_ids = torch.zeros(2, 3, dtype=torch.long)
    prefill = T5DecoderPrefillGraph(llm)
    _, sk, sv = prefill(dec_ids, ck, cv)
    cross, cache = (list(ck), list(cv)), (list(sk), list(sv))
    on_src, on_past = [{0: batch, 2: src}] * n, [{0: batch, 2: past}] * n
    fused = T5DecoderWriter(llm)
    present = ["logits", *layer_names(("present_k", "present_v"), n)]
    return [
        GraphSpec("t5_encoder", Layerwise(enc, 2), (ids, visual), ["prompt_ids", "visual"],
                  ["encoder_out", *layer_names(("cross_k", "cross_v"), n)], {"args": ({1: prompt}, {0: batch})}),
        GraphSpec("t5_decoder_prefill", Layerwise(prefill, 1), (dec_ids, *cross),
                  ["decoder_ids", *layer_names(("cross_k", "cross_v"), n)], present,
                  {"args": ({0: batch, 1: seq}, on_src, on_src)},
                  write=lambda path: fused.write(path, with_past=False)),
        GraphSpec("t5_decoder_step", Layerwise(T5DecoderStepGraph(llm), 1), (dec_ids[:, :1], *cache, *cross),
                  ["decoder_ids", *layer_names(("past_k", "past_v", "cross_k", "cross_v"), n)], present,
                  {"args": ({0: batch}, on_past, on_past, on_src, on_src)},
                  write=lambda path: fused.write(path, with_past=True), decode=True),
    ]


@torch.no_grad()
def gpt2_graphs(llm, d_llm: int, num_query: int) -> list[GraphSpec]:
    batch, seq, past, _, prompt = _dims()
    ids = torch.tensor([[5, 6, 7, 8]])
    visual = torch.randn(2, num_query, d_llm)
    prefill = Gpt2PrefillGraph(llm)
    _, k, v = prefill(ids, visual)
    step_ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    return [
        GraphSpec("gpt2_prefill", prefill, (ids, visual), ["prompt_ids", "visual"], ["last_logits", "present_k",
                  "present_v"], {"prompt_ids": {1: prompt}, "visual": {0: batch}}),
        GraphSpec("gpt2_step", Gpt2StepGraph(llm), (step_ids, k, v), ["ids", "past_k", "past_v"],
                  ["logits", "present_k", "present_v"],
                  {"ids": {0: batch, 1: seq}, "past_k": {1: batch, 3: past}, "past_v": {1: batch, 3: past}},
                  decode=True),
    ]


LLM_GRAPHS = {"t5": t5_graphs, "gpt2": gpt2_graphs}

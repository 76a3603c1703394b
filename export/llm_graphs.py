"""Which ONNX graphs each LLM family ships, each written op by op in the export's weight format.

A graph's `write(path, fmt, weights)` writes it with its matmuls in `fmt` (export/quantize.py), its weights
into the artifact's shared WeightFile; `decode` marks the graph run once per generated token (its matmuls
are matrix-vector products at batch 1, which may want another format).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim

from ..model.t5_static import T5DecoderPrefillGraph, T5DecoderStepGraph, T5EncoderGraph
from .graphs_gpt2_fused import Gpt2Writer
from .graphs_t5_fused import T5DecoderWriter, T5EncoderWriter
from .layerwise import Layerwise, layer_names


@dataclass
class LlmGraph:
    name: str  # file stem and manifest key
    write: Callable[..., list[Path]]  # (path, fmt, weights) -> files written
    decode: bool = False


def t5_graphs(t5) -> list[LlmGraph]:
    """Encoder (prompt + visual tokens -> cross-attention K/V per decoder layer), decoder prefill (scores the
    answers as one batch) and step (one token, caches updated in place)."""
    dec = T5DecoderWriter(t5)
    return [LlmGraph("t5_encoder", T5EncoderWriter(t5).write),
            LlmGraph("t5_decoder_prefill", lambda path, fmt, weights: dec.write(path, False, fmt, weights)),
            LlmGraph("t5_decoder_step", lambda path, fmt, weights: dec.write(path, True, fmt, weights), decode=True)]


def gpt2_graphs(gpt2) -> list[LlmGraph]:
    """Prefill (the prompt + visual tokens; with a past, the answers as one batch) and step."""
    w = Gpt2Writer(gpt2)
    return [LlmGraph("gpt2_prefill", w.write_prefill), LlmGraph("gpt2_step", w.write_step, decode=True)]


LLM_GRAPHS = {"t5": t5_graphs, "gpt2": gpt2_graphs}


@torch.no_grad()
def traced_t5_step(t5, path: Path) -> list[Path]:
    """The T5 decoder step traced from model/t5_static.T5DecoderStepGraph (the unfused graph the fused one replaced;
    `medblip-bench decode-formats` times the two against each other)."""
    from .onnx_export import export_onnx

    batch, past, src = Dim("batch", min=1, max=64), Dim("past", min=1, max=2048), Dim("src", min=1, max=2048)
    n = t5.config.num_decoder_layers
    _, ck, cv = T5EncoderGraph(t5)(torch.tensor([[5, 6, 7, 8, 1]]), torch.randn(2, 4, t5.config.d_model))
    dec_ids = torch.zeros(2, 3, dtype=torch.long)
    _, sk, sv = T5DecoderPrefillGraph(t5)(dec_ids, ck, cv)
    on_src, on_past = [{0: batch, 2: src}] * n, [{0: batch, 2: past}] * n
    return export_onnx(Layerwise(T5DecoderStepGraph(t5), 1), (dec_ids[:, :1], list(sk), list(sv), list(ck), list(cv)),
                       path, ["decoder_ids", *layer_names(("past_k", "past_v", "cross_k", "cross_v"), n)],
                       ["logits", *layer_names(("present_k", "present_v"), n)],
                       {"args": ({0: batch}, on_past, on_past, on_src, on_src)})

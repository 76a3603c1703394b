"""Which ONNX graphs each LLM family ships, with example inputs and dynamic axes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import Dim

from .graphs_gpt2 import Gpt2PrefillGraph, Gpt2StepGraph
from .graphs_t5 import T5DecoderPrefillGraph, T5DecoderStepGraph, T5EncoderGraph


@dataclass
class GraphSpec:
    name: str  # file stem and manifest key suffix
    module: torch.nn.Module
    args: tuple
    inputs: list[str]
    outputs: list[str]
    dynamic: dict


def _dims():
    # Traced with sizes >= 2 so that torch.export keeps these axes symbolic (1 is specialised).
    return (Dim("batch", min=1, max=64), Dim("seq", min=1, max=1024), Dim("past", min=1, max=2048),
            Dim("src", min=1, max=2048), Dim("prompt", min=1, max=1024))


@torch.no_grad()
def t5_graphs(llm, d_llm: int, num_query: int) -> list[GraphSpec]:
    batch, seq, past, src, prompt = _dims()
    ids = torch.tensor([[5, 6, 7, 8, 1]])
    visual = torch.randn(2, num_query, d_llm)
    enc = T5EncoderGraph(llm)
    _, ck, cv = enc(ids, visual)
    dec_ids = torch.zeros(2, 3, dtype=torch.long)
    prefill = T5DecoderPrefillGraph(llm)
    _, sk, sv = prefill(dec_ids, ck, cv)
    kv = {1: batch, 3: src}
    return [
        GraphSpec("t5_encoder", enc, (ids, visual), ["prompt_ids", "visual"], ["encoder_out", "cross_k", "cross_v"],
                  {"prompt_ids": {1: prompt}, "visual": {0: batch}}),
        GraphSpec("t5_decoder_prefill", prefill, (dec_ids, ck, cv), ["decoder_ids", "cross_k", "cross_v"],
                  ["logits", "self_k", "self_v"], {"decoder_ids": {0: batch, 1: seq}, "cross_k": kv, "cross_v": kv}),
        GraphSpec("t5_decoder_step", T5DecoderStepGraph(llm), (dec_ids[:, :1], sk, sv, ck, cv),
                  ["decoder_ids", "past_k", "past_v", "cross_k", "cross_v"], ["logits", "self_k", "self_v"],
                  {"decoder_ids": {0: batch}, "past_k": {1: batch, 3: past}, "past_v": {1: batch, 3: past},
                   "cross_k": kv, "cross_v": kv}),
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
                  {"ids": {0: batch, 1: seq}, "past_k": {1: batch, 3: past}, "past_v": {1: batch, 3: past}}),
    ]


LLM_GRAPHS = {"t5": t5_graphs, "gpt2": gpt2_graphs}

"""ONNX Runtime LLM backends over the exported graphs (fp32, INT8 or INT4, as the bundle says), one class per family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..model.scoring import decoder_inputs, pad_candidates
from .llm_base import LlmBackend
from .ort_cache import step_cache
from .ort_graph import OrtGraph, host


@dataclass
class OrtState:
    next_logits: np.ndarray  # [V]
    cache: Any = None  # the decode step's per-layer caches (ort_cache.InPlaceKV or GrowingKV)
    cross: dict | None = None  # T5: {"cross_k_i": [1,H,S,dk], "cross_v_i": ...} from the encoder
    prefix: dict | None = None  # GPT-2: {"past_k_i": [1,H,P,dk], ...} of the prompt, for scoring the answers


class _OrtLlm(LlmBackend):
    name = "ort"
    graph_names: tuple[str, ...]
    decode_graph: str  # the one graph run once per generated token: its thread pool spins between calls

    def __init__(self, paths: dict, precision: str, eos_token_id: int, device: str = "cpu",
                 threads: int | None = None, decoder_start_token_id: int = 0):
        self.graphs = {g: OrtGraph(paths[g], device, threads, spin=g == self.decode_graph) for g in self.graph_names}
        self.precision, self.eos_token_id, self.start = precision, eos_token_id, decoder_start_token_id

    @staticmethod
    def _visual(visual) -> np.ndarray:
        return np.asarray(visual.detach().cpu().float().numpy() if hasattr(visual, "detach") else visual, np.float32)


class OrtT5Llm(_OrtLlm):
    """T5 graphs with one cache tensor per decoder layer (names from export/layerwise.layer_names)."""

    graph_names = ("t5_encoder", "t5_decoder_prefill", "t5_decoder_step")
    decode_graph = "t5_decoder_step"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        outputs = self.graphs["t5_decoder_step"].outputs
        self.layers = sum(name.startswith("present_k_") for name in outputs)

    def prefill(self, prompt_ids, visual) -> OrtState:
        enc = self.graphs["t5_encoder"]
        out = enc(prompt_ids=np.array([prompt_ids], np.int64), visual=self._visual(visual))
        cross = dict(zip(enc.outputs[1:], out[1:]))
        dec = self.graphs["t5_decoder_prefill"](decoder_ids=np.array([[self.start]], np.int64), **cross)
        keys, values = dec[1:1 + self.layers], dec[1 + self.layers:]  # [logits, present_k_0.., present_v_0..]
        cache = step_cache(self.graphs["t5_decoder_step"], keys, values, cross, length=1)
        return OrtState(host(dec[0])[0, -1], cross=cross, cache=cache)

    def step(self, state: OrtState, token: int) -> np.ndarray:
        return state.cache.step(token)

    def candidate_logits(self, state: OrtState, candidates) -> np.ndarray:
        labels, _ = pad_candidates(candidates, pad=0)
        n = len(candidates)
        cross = {name: np.repeat(host(t), n, axis=0) for name, t in state.cross.items()}  # [n,H,S,dk] each
        return host(self.graphs["t5_decoder_prefill"](decoder_ids=decoder_inputs(labels, self.start), **cross)[0])


class OrtGpt2Llm(_OrtLlm):
    """GPT-2 graphs with one cache tensor per layer (export/graphs_gpt2_fused.py): the prefill graph runs the
    prompt (no past) and, continuing the prompt's caches, the answers as one batch; the step graph decodes."""

    graph_names = ("gpt2_prefill", "gpt2_step")
    decode_graph = "gpt2_step"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pre = self.graphs["gpt2_prefill"].session
        self.layers = sum(o.name.startswith("present_k_") for o in pre.get_outputs())
        shape = next(i.shape for i in pre.get_inputs() if i.name == "past_k_0")  # [batch, H, past, dk]
        self.heads, self.head_dim = shape[1], shape[3]
        self.d = next(i.shape[2] for i in pre.get_inputs() if i.name == "visual")

    def _past(self, batch: int) -> dict:
        empty = np.zeros((batch, self.heads, 0, self.head_dim), np.float32)
        return {f"past_{kv}_{i}": empty for kv in "kv" for i in range(self.layers)}

    def prefill(self, prompt_ids, visual) -> OrtState:
        visual = self._visual(visual)  # [1,Q,d]
        n = len(prompt_ids) + visual.shape[1]
        out = self.graphs["gpt2_prefill"](ids=np.array([prompt_ids], np.int64), visual=visual, **self._past(1),
                                          logits_from=np.array(n - 1, np.int64))
        keys, values = out[1:1 + self.layers], out[1 + self.layers:]
        prefix = {f"past_{kv}_{i}": t for kv, ts in (("k", keys), ("v", values)) for i, t in enumerate(ts)}
        cache = step_cache(self.graphs["gpt2_step"], keys, values, {}, length=n)
        return OrtState(host(out[0])[0, -1], cache=cache, prefix=prefix)

    def step(self, state: OrtState, token: int) -> np.ndarray:
        return state.cache.step(token)

    def candidate_logits(self, state: OrtState, candidates) -> np.ndarray:
        ids, _ = pad_candidates(candidates, pad=0)
        n = len(candidates)
        past = {k: np.repeat(host(t), n, axis=0) for k, t in state.prefix.items()}  # the prompt's caches, per answer
        logits = host(self.graphs["gpt2_prefill"](ids=ids, visual=np.zeros((n, 0, self.d), np.float32), **past,
                                                  logits_from=np.array(0, np.int64))[0])  # [n,L,V]
        # token j is predicted by the logits before it: the prefix's last for j = 0
        return np.concatenate([np.broadcast_to(state.next_logits, (n, 1, logits.shape[-1])), logits[:, :-1]], axis=1)


ORT_LLMS = {"t5": OrtT5Llm, "gpt2": OrtGpt2Llm}

"""How a decode-step graph (T5's or GPT-2's) keeps its per-layer self-attention caches between tokens.

- `InPlaceKV` (graphs with a `past_len` input: the fused step, GroupQueryAttention; on CPU): per-layer
  buffers with room to grow are bound as both `past_*` and `present_*`, the kernel writes the new
  token's K/V at position `past_len`, and the binding is made once; per token only the token id and
  its position are rebound. Nothing is copied or allocated per token; full buffers double.
- `GrowingKV` (traced graphs, fp16 included, and any step on another device): each call returns
  caches one token longer, which become the next call's inputs. ONNX Runtime's CUDA kernel of
  GroupQueryAttention is fp16/bf16 only, so an fp32-activation fused step on the CUDA provider runs
  that node on the CPU provider, where a device buffer cannot be updated in place.
"""

from __future__ import annotations

import numpy as np

from .ort_graph import OrtGraph, bind_input, host


def step_cache(graph: OrtGraph, keys: list, values: list, cross: dict, length: int):
    """The cache object for this step graph: caches [B,H,length,dk] per layer from the prefill; `cross`: other
    inputs fixed for the whole answer (T5's cross-attention K/V; none for GPT-2)."""
    kind = InPlaceKV if "past_len" in graph.inputs and graph.device == "cpu" else GrowingKV
    return kind(graph, keys, values, cross, length)


def _token_input(graph: OrtGraph) -> str:
    """The step graph's token input: the first one (T5 `decoder_ids`, GPT-2 `ids`)."""
    return graph.inputs[0]


class GrowingKV:
    def __init__(self, graph: OrtGraph, keys: list, values: list, cross: dict, length: int):
        self.graph, self.keys, self.values, self.cross, self.length = graph, keys, values, cross, length

    def step(self, token: int) -> np.ndarray:
        past = {f"past_{kv}_{i}": t for kv, ts in (("k", self.keys), ("v", self.values)) for i, t in enumerate(ts)}
        if "past_len" in self.graph.inputs:
            past["past_len"] = np.array(self.length, np.int64)
        out = self.graph(**{_token_input(self.graph): np.array([[token]], np.int64)}, **past, **self.cross)
        layers = len(self.keys)
        self.keys, self.values = out[1:1 + layers], out[1 + layers:]
        self.length += 1
        return host(out[0])[0, -1]


class InPlaceKV:
    INITIAL_CAPACITY = 64  # tokens; doubled when full

    def __init__(self, graph: OrtGraph, keys: list, values: list, cross: dict, length: int):
        self.graph, self.cross, self.length = graph, cross, length
        self._allocate(max(self.INITIAL_CAPACITY, 2 * length), [host(t) for t in keys], [host(t) for t in values])

    def _allocate(self, capacity: int, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Fresh buffers holding the first `length` positions of `keys`/`values`, and the binding over them."""
        import onnxruntime as ort

        def buffer(cached: np.ndarray) -> np.ndarray:
            b, h, _, dk = cached.shape
            out = np.zeros((b, h, capacity, dk), np.float32)
            out[:, :, :self.length] = cached[:, :, :self.length]
            return out

        self.capacity = capacity
        self._host = [buffer(t) for t in keys + values]
        caches = [ort.OrtValue.ortvalue_from_numpy(t) for t in self._host]  # share the arrays' memory (CPU)
        layers = len(keys)
        binding = self.graph.session.io_binding()
        binding.bind_output("logits", "cpu")  # first bound, so get_outputs()[0]
        for name, value in self.cross.items():
            bind_input(binding, name, value)
        for i, (k, v) in enumerate(zip(caches[:layers], caches[layers:])):
            for kv, value in (("k", k), ("v", v)):
                binding.bind_ortvalue_input(f"past_{kv}_{i}", value)
                binding.bind_ortvalue_output(f"present_{kv}_{i}", value)  # same buffer: updated in place
        self._binding = binding

    def _contents(self) -> list[np.ndarray]:
        """Every layer's K buffer, then every V buffer: what the kernel has written in place."""
        return self._host

    def step(self, token: int) -> np.ndarray:
        if self.length + 1 > self.capacity:
            everything = self._contents()
            half = len(everything) // 2
            self._allocate(2 * self.capacity, everything[:half], everything[half:])
        self._binding.bind_cpu_input(_token_input(self.graph), np.array([[token]], np.int64))
        self._binding.bind_cpu_input("past_len", np.array(self.length, np.int64))
        self.graph.session.run_with_iobinding(self._binding)
        self.length += 1
        # the bound logits output is one buffer that every step overwrites: hand out a copy (V floats)
        return host(self._binding.get_outputs()[0])[0, -1].copy()

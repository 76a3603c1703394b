"""One ONNX Runtime session with IO binding: on CUDA, outputs (the KV cache) stay on the device between calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engines.ort_session import ort_providers, ort_session


class OrtGraph:
    """`graph(name=array_or_ortvalue, ...)` -> list of OrtValues in output order.

    spin: let the session's worker threads busy-wait between kernels and between calls. Only the graph
    called in a tight loop (the decode step) should: each session has its own thread pool, and a
    pool still spinning after its call competes for the cores with the next session's kernels (on two
    cores, visibly so for the decode steps right after scoring).
    """

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, spin: bool = False):
        _, self.device = ort_providers(device)
        self.session = ort_session(path, device, threads, spin=spin)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, **feeds):
        binding = self.session.io_binding()
        for name, value in feeds.items():
            bind_input(binding, name, value)
        for name in self.outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()


def bind_input(binding, name: str, value) -> None:
    """A host array (copied to the device by ONNX Runtime if needed) or an OrtValue already in place."""
    if isinstance(value, np.ndarray):
        binding.bind_cpu_input(name, np.asarray(value, order="C"))  # (ascontiguousarray would make a 0-d input 1-d)
    else:
        binding.bind_ortvalue_input(name, value)


def host(value) -> np.ndarray:
    """OrtValue (any device) or array -> numpy on the host."""
    return value if isinstance(value, np.ndarray) else value.numpy()

"""The torch backend on CUDA (fp32/fp16/bf16, CUDA-graph decode for T5) against the CPU fp32 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medblip_edge.model.evalset import eval_volumes
from medblip_edge.export.run import ExportOptions, export_bundle
from medblip_edge.model.prompts import LABELS
from medblip_edge.runtime.llm_static_t5 import CudaGraphT5Llm
from medblip_edge.runtime.llm_torch import TORCH_LLMS
from medblip_edge.runtime.pipeline import Pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA GPU on this machine")]
PROB_TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


@pytest.fixture(scope="module", params=["tiny", "tiny-biomedlm"])
def bundle(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / request.param
    export_bundle(ExportOptions(out=out, preset=request.param, onnx=False), quiet=True)
    return out


def _probs(pipe, visual, texts):
    rows = [pipe.classify(visual[i:i + 1], t) for i, t in enumerate(texts)]
    return [r["label"] for r in rows], np.array([[r["probabilities"][k] for k in LABELS] for r in rows])


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_agrees_with_cpu_fp32(bundle, precision):
    texts = ["", "MMSE 21. ", "MMSE 29. "]
    vols = eval_volumes(3)
    cpu = Pipeline.from_bundle(bundle, backend="torch")
    gpu = Pipeline.from_bundle(bundle, backend="torch", device="cuda", precision=precision)
    ref_labels, ref_p = _probs(cpu, cpu.visual_tokens(vols), texts)
    labels, p = _probs(gpu, gpu.visual_tokens(vols), texts)
    assert labels == ref_labels
    assert np.abs(p - ref_p).max() < PROB_TOL[precision]
    if gpu.bundle.config.variant == "t5":
        assert isinstance(gpu.llm, CudaGraphT5Llm)


def test_cuda_graph_decode_matches_eager(tmp_path_factory):
    """fp32: the CUDA-graph decode gives the dynamic-cache tokens; bf16: the same tokens as its eager replay
    (bf16 rounding differs between the two caches' orders of operations, so only same-kernel runs must match)."""
    out = tmp_path_factory.mktemp("cg") / "tiny"
    export_bundle(ExportOptions(out=out, preset="tiny", onnx=False), quiet=True)
    for precision in ("fp32", "bf16"):
        pipe = Pipeline.from_bundle(out, backend="torch", device="cuda", precision=precision)
        visual = pipe.visual_tokens(eval_volumes(1))
        graph = pipe.tasks.ask_ids(pipe.llm, visual, "MMSE 24. ")
        assert graph and pipe.tasks.ask_ids(pipe.llm, visual, "MMSE 24. ") == graph  # replay after a new prefill
        eager = CudaGraphT5Llm(pipe.llm.t5, precision, graphs=False)
        assert pipe.tasks.ask_ids(eager, visual, "MMSE 24. ") == graph
        if precision == "fp32":
            assert pipe.tasks.ask_ids(TORCH_LLMS["t5"](pipe.llm.t5, precision), visual, "MMSE 24. ") == graph

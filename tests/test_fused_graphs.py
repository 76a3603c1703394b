"""The T5 decoder graphs written with ONNX Runtime's fused kernels compute what the traced graphs compute."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from medblip_edge.model.t5_static import T5DecoderPrefillGraph, T5DecoderStepGraph
from medblip_edge.export.graphs_t5_fused import T5DecoderWriter
from medblip_edge.export.llm_graphs import traced_t5_step
from medblip_edge.engines.ort_session import ort_session
from medblip_edge.export.quantize import QUANTIZERS
from medblip_edge.model.config import preset
from medblip_edge.model.llm import family
from medblip_edge.runtime.ort_cache import GrowingKV, InPlaceKV, step_cache
from medblip_edge.runtime.ort_graph import OrtGraph

# (name, config overrides): the presets' FLAN-T5 layout, original T5's plain (ungated) FFN with a tied
# (scaled) head, and FLAN-T5's own tanh GELU
VARIANTS = [("flan-gated-gelu", {}),
            ("t5-plain-ffn-tied", {"feed_forward_proj": "relu", "tie_word_embeddings": True}),
            ("gated-gelu-tanh", {"dense_act_fn": "gelu_new"})]


def _t5(overrides: dict, seed: int = 0):
    cfg = dict(preset("tiny").llm, vocab_size=97, **overrides)
    torch.manual_seed(seed)
    model = family("t5").build(cfg)
    if "dense_act_fn" in overrides:  # build() applies MedBLIP's exact-GELU override; undo it for this case
        from transformers.activations import ACT2FN

        model.config.dense_act_fn = overrides["dense_act_fn"]
        for blk in model.decoder.block:
            blk.layer[2].DenseReluDense.act = ACT2FN[overrides["dense_act_fn"]]
    with torch.no_grad():  # rel-pos bias and norms away from their init values, so a mix-up shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _kv(rng, t5, batch: int, length: int) -> np.ndarray:
    c = t5.config
    return rng.standard_normal((c.num_decoder_layers, batch, c.num_heads, length, c.d_kv), np.float32)


def _feeds(**stacked) -> dict:
    """{"past_k": [L,B,H,P,dk], ...} -> {"past_k_0": [B,H,P,dk], ...}: the graphs' per-layer inputs."""
    return {f"{name}_{i}": layer for name, t in stacked.items() for i, layer in enumerate(t)}


def _max_err(ort_out, torch_out) -> float:
    """Fused outputs [logits, present_k_0.., present_v_0..] vs traced (logits, k [L,..], v [L,..])."""
    logits, k, v = (t.numpy() for t in torch_out)
    layers = len(k)
    got_k, got_v = np.stack(ort_out[1:1 + layers]), np.stack(ort_out[1 + layers:])
    return max(float(np.abs(a - b).max()) for a, b in ((ort_out[0], logits), (got_k, k), (got_v, v)))


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_fused_decoder_graphs_match_traced_modules(tmp_path, name, overrides):
    t5 = _t5(overrides)
    writer = T5DecoderWriter(t5)
    writer.write(tmp_path / "prefill.onnx", with_past=False)
    writer.write(tmp_path / "step.onnx", with_past=True)
    prefill, step = ort_session(tmp_path / "prefill.onnx"), ort_session(tmp_path / "step.onnx")
    rng = np.random.default_rng(1)
    ck, cv = _kv(rng, t5, 2, 9), _kv(rng, t5, 2, 9)
    ids = rng.integers(0, 97, (2, 5)).astype(np.int64)
    with torch.no_grad():
        want = T5DecoderPrefillGraph(t5)(*map(torch.from_numpy, (ids, ck, cv)))
    got = prefill.run(None, {"decoder_ids": ids, **_feeds(cross_k=ck, cross_v=cv)})
    assert _max_err(got, want) < 1e-4, name
    # one step after short and long pasts: 140 > max_distance 128 exercises the saturated distances
    for past in (3, 140):
        pk, pv = _kv(rng, t5, 2, past), _kv(rng, t5, 2, past)
        nxt = rng.integers(0, 97, (2, 1)).astype(np.int64)
        with torch.no_grad():
            want = T5DecoderStepGraph(t5)(*map(torch.from_numpy, (nxt, pk, pv, ck, cv)))
        feeds = {"decoder_ids": nxt, "past_len": np.array(past, np.int64)}
        got = step.run(None, {**feeds, **_feeds(past_k=pk, past_v=pv, cross_k=ck, cross_v=cv)})
        assert got[1].shape == (2, 2, past + 1, 32)  # not bound in place: caches one token longer come back
        assert _max_err(got, want) < 1e-4, (name, past)


@pytest.mark.slow
def test_in_place_caches_step_like_the_traced_module(tmp_path, monkeypatch):
    """The runtime's InPlaceKV over the fused step (buffers bound as past and present, grown when full) and its
    GrowingKV over the traced step both follow the traced PyTorch module token by token."""
    t5 = _t5({})
    T5DecoderWriter(t5).write(tmp_path / "step.onnx", with_past=True)
    monkeypatch.setattr(InPlaceKV, "INITIAL_CAPACITY", 4)  # room for 2 x 3 cached = 6; 9 after 6 steps: grows
    rng = np.random.default_rng(2)
    ck, cv, pk, pv = _kv(rng, t5, 1, 7), _kv(rng, t5, 1, 7), _kv(rng, t5, 1, 3), _kv(rng, t5, 1, 3)
    graph = OrtGraph(tmp_path / "step.onnx")
    cache = step_cache(graph, list(pk), list(pv), _feeds(cross_k=ck, cross_v=cv), length=3)
    assert isinstance(cache, InPlaceKV)
    # the traced step graph (what fp16 bundles ship) through the other cache kind, on the same tokens
    traced = OrtGraph(traced_t5_step(t5, tmp_path / "traced.onnx")[0])
    growing = step_cache(traced, list(pk), list(pv), _feeds(cross_k=ck, cross_v=cv), length=3)
    assert isinstance(growing, GrowingKV)
    # and the fused step fed caches that grow (how it runs off the CPU, see ort_cache)
    growing_fused = GrowingKV(graph, list(pk), list(pv), _feeds(cross_k=ck, cross_v=cv), length=3)
    kept = []  # every step's logits, held across later steps: each call's result stays its own
    for token in rng.integers(0, 97, 6):
        got, got_traced = cache.step(int(token)), growing.step(int(token))
        kept.append((got, got.copy()))
        assert np.abs(growing_fused.step(int(token)) - got).max() < 1e-5
        with torch.no_grad():
            want, k, v = T5DecoderStepGraph(t5)(*map(torch.from_numpy, (np.array([[token]]), pk, pv, ck, cv)))
        pk, pv = k.numpy(), v.numpy()
        assert np.abs(got - want.numpy()[0, -1]).max() < 1e-4
        assert np.abs(got_traced - want.numpy()[0, -1]).max() < 1e-4
    assert all(np.array_equal(a, b) for a, b in kept)
    assert cache.length == 9 and cache.capacity == 12
    layers = t5.config.num_decoder_layers
    held = np.stack(cache._contents())  # [2L, 1, H, capacity, dk]
    np.testing.assert_allclose(held[:layers, :, :, :9], pk, atol=1e-5)
    np.testing.assert_allclose(held[layers:, :, :, :9], pv, atol=1e-5)
    assert not held[:, :, :, 9:].any()  # positions not yet written stay empty


def test_fused_step_is_a_few_kernels_per_layer(tmp_path):
    """Per layer: 3 norms, 6 matmuls, 2 attention kernels, 1 Split (gated FFN), act and Mul; no cache copies."""
    t5 = _t5({})
    T5DecoderWriter(t5).write(tmp_path / "step.onnx", with_past=True)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "step.onnx")).graph.node)
    layers = t5.config.num_decoder_layers
    assert ops["GroupQueryAttention"] == layers and ops["MultiHeadAttention"] == layers
    assert ops["Split"] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 3 * layers  # layer 0's first norm has no residual
    assert ops["MatMul"] == 6 * layers + 1
    assert sum(ops.values()) <= 14 * layers + 26, ops  # + embedding, position bias, final norm, head
    assert ops["Concat"] == 0 and ops["Gather"] <= 4, ops  # no per-layer cache slicing or stacking
    for name, quant in QUANTIZERS.items():  # every weight MatMul, the LM head included, is quantized
        dst = tmp_path / f"{name}.onnx"
        quant.for_graph(decode=True)(tmp_path / "step.onnx", dst)
        nodes = onnx.load(str(dst)).graph.node
        bits = {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert Counter(n.op_type for n in nodes)["MatMulNBits"] == 6 * layers + 1
        assert bits == {quant.gemv.bits} and "MatMul" not in {n.op_type for n in nodes}


def test_unknown_activation_is_refused():
    t5 = _t5({})
    t5.config.dense_act_fn = "silu"
    with pytest.raises(ValueError, match="silu"):
        T5DecoderWriter(t5)


# -- the T5 encoder and the GPT-2 graphs, written op by op ------------------------------------------------

def test_fused_encoder_matches_traced_module(tmp_path):
    """Prompts short and long enough that the bidirectional relative positions saturate (> 128 apart)."""
    from medblip_edge.model.t5_static import T5EncoderGraph
    from medblip_edge.export.graphs_t5_fused import T5EncoderWriter

    t5 = _t5({})
    T5EncoderWriter(t5).write(tmp_path / "enc.onnx")
    sess = ort_session(tmp_path / "enc.onnx")
    rng = np.random.default_rng(3)
    visual = rng.standard_normal((2, 4, t5.config.d_model)).astype(np.float32)
    for length in (5, 200):
        ids = rng.integers(0, 97, (1, length))
        got = sess.run(None, {"prompt_ids": ids, "visual": visual})
        with torch.no_grad():
            enc, ck, cv = T5EncoderGraph(t5)(torch.from_numpy(ids), torch.from_numpy(visual))
        layers = len(ck)
        assert np.abs(got[0] - enc.numpy()).max() < 1e-4
        assert np.abs(np.stack(got[1:1 + layers]) - ck.numpy()).max() < 1e-4
        assert np.abs(np.stack(got[1 + layers:]) - cv.numpy()).max() < 1e-4


def _gpt2(layers: int = 3):
    cfg = dict(preset("tiny-biomedlm").llm, vocab_size=97, n_layer=layers)
    torch.manual_seed(0)
    model = family("gpt2").build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_fused_gpt2_graphs_match_traced_modules(tmp_path):
    """Prefill (prompt + visual tokens), the answers as a batch continuing its caches, and a step; per-layer
    attention scaled by 1/(layer + 1) as BioMedLM's config asks."""
    from medblip_edge.export.graphs_gpt2 import Gpt2PrefillGraph, Gpt2StepGraph
    from medblip_edge.export.graphs_gpt2_fused import Gpt2Writer

    g = _gpt2()
    assert g.config.scale_attn_by_inverse_layer_idx
    w = Gpt2Writer(g)
    w.write_prefill(tmp_path / "prefill.onnx")
    w.write_step(tmp_path / "step.onnx")
    prefill, step = ort_session(tmp_path / "prefill.onnx"), ort_session(tmp_path / "step.onnx")
    rng = np.random.default_rng(4)
    L, H, dk, d = 3, g.config.n_head, g.config.n_embd // g.config.n_head, g.config.n_embd
    ids, visual = rng.integers(0, 97, (1, 6)), rng.standard_normal((1, 4, d)).astype(np.float32)
    empty = {f"past_{kv}_{i}": np.zeros((1, H, 0, dk), np.float32) for kv in "kv" for i in range(L)}
    out = prefill.run(None, {"ids": ids, "visual": visual, "logits_from": np.array(9, np.int64), **empty})
    with torch.no_grad():
        last, k, v = Gpt2PrefillGraph(g)(torch.from_numpy(ids), torch.from_numpy(visual))
    assert out[0].shape == (1, 1, 97) and np.abs(out[0][:, -1] - last.numpy()).max() < 1e-4
    assert np.abs(np.stack(out[1:1 + L]) - k.numpy()).max() < 1e-4
    cand = rng.integers(0, 97, (3, 4))
    past = {f"past_{kv}_{i}": np.repeat(out[(1 if kv == "k" else 1 + L) + i], 3, 0) for kv in "kv" for i in range(L)}
    scored = prefill.run(None, {"ids": cand, "visual": np.zeros((3, 0, d), np.float32),
                                "logits_from": np.array(0, np.int64), **past})
    with torch.no_grad():
        want, _, _ = Gpt2StepGraph(g)(torch.from_numpy(cand), k.repeat(1, 3, 1, 1, 1), v.repeat(1, 3, 1, 1, 1))
    assert np.abs(scored[0] - want.numpy()).max() < 1e-4
    one = step.run(None, {"ids": np.array([[5]]), "past_len": np.array(10, np.int64),
                          **{f"past_{kv}_{i}": out[(1 if kv == "k" else 1 + L) + i] for kv in "kv" for i in range(L)}})
    with torch.no_grad():
        want, k2, _ = Gpt2StepGraph(g)(torch.tensor([[5]]), k, v)
    assert np.abs(one[0] - want.numpy()).max() < 1e-4 and np.abs(one[1] - k2[0].numpy()).max() < 1e-4


def test_gpt2_runtime_decodes_in_place_like_the_module(tmp_path, monkeypatch):
    """OrtGpt2Llm: the step's caches bound in place (grown past their first capacity) follow transformers'
    own GPT-2 token by token; the answers scored from the prefill graph match it too."""
    from medblip_edge.export.llm_graphs import gpt2_graphs
    from medblip_edge.export.onnx_builder import WeightFile
    from medblip_edge.export.quantize import FP32
    from medblip_edge.runtime.llm_ort import OrtGpt2Llm
    from medblip_edge.runtime.llm_torch import TorchGpt2Llm

    g = _gpt2()
    with WeightFile(tmp_path / "llm.data") as weights:
        paths = {s.name: s.write(tmp_path / f"{s.name}.onnx", FP32, weights)[0] for s in gpt2_graphs(g)}
    assert weights.bytes_shared > 0, "prefill and step share their fp32 weights on disk"
    monkeypatch.setattr(InPlaceKV, "INITIAL_CAPACITY", 4)
    ort_llm, ref = OrtGpt2Llm(paths, "fp32", eos_token_id=0), TorchGpt2Llm(g, "fp32")
    visual = torch.randn(1, 4, g.config.n_embd)
    with torch.inference_mode():
        a, b = ort_llm.prefill([5, 6, 7], visual), ref.prefill([5, 6, 7], visual)
        assert isinstance(a.cache, InPlaceKV)
        cands = [[3, 4, 5], [6]]
        assert np.abs(ort_llm.candidate_logits(a, cands) - ref.candidate_logits(b, cands))[0].max() < 1e-4
        for token in (9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12):
            assert np.abs(ort_llm.step(a, token) - ref.step(b, token).numpy()).max() < 1e-4
    assert a.cache.capacity > 14


@pytest.mark.parametrize("graph", ["encoder", "step"])
def test_quantized_graphs_written_directly_equal_quantizing_the_fp32_graph(tmp_path, graph):
    """The writers emit each weight format themselves (no fp32 graph of a paper-size LLM is ever built); the
    result runs exactly as ONNX Runtime's own quantizers applied to the fp32 graph."""
    from medblip_edge.export.graphs_t5_fused import T5EncoderWriter
    from medblip_edge.export.quantize import FP32

    t5 = _t5({})

    def write(path, fmt=FP32):
        if graph == "encoder":
            return T5EncoderWriter(t5).write(path, fmt)
        return T5DecoderWriter(t5).write(path, True, fmt)

    write(tmp_path / "fp32.onnx")
    rng = np.random.default_rng(5)
    if graph == "encoder":
        feeds = {"prompt_ids": rng.integers(0, 97, (1, 7)),
                 "visual": rng.standard_normal((1, 4, t5.config.d_model)).astype(np.float32)}
    else:
        feeds = {"decoder_ids": np.array([[3]]), "past_len": np.array(2, np.int64),
                 **_feeds(past_k=_kv(rng, t5, 1, 2), past_v=_kv(rng, t5, 1, 2), cross_k=_kv(rng, t5, 1, 9),
                          cross_v=_kv(rng, t5, 1, 9))}
    for name, quant in QUANTIZERS.items():
        fmt = quant.for_graph(decode=graph == "step")
        fmt(tmp_path / "fp32.onnx", tmp_path / f"{name}-file.onnx")
        write(tmp_path / f"{name}-direct.onnx", fmt)
        a = ort_session(tmp_path / f"{name}-file.onnx").run(None, feeds)
        b = ort_session(tmp_path / f"{name}-direct.onnx").run(None, feeds)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), name

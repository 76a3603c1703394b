"""TensorRT vision engine: build from a tiny vision ONNX graph, run it, compare with PyTorch fp32.

Tests marked `tensorrt` need TensorRT and a CUDA GPU and skip with the reason otherwise; the absence test runs anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from bundles import tiny_onnx_bundle
from medblip_edge.engines.trt_build import build_engine, engine_key, trt_available
from medblip_edge.errors import BackendUnavailable, MedblipError
from medblip_edge.model import fidelity
from medblip_edge.runtime.vision_trt import TrtVision

REASON = trt_available()


def needs_trt(test):
    """Mark `tensorrt` and skip, with the reason, where TensorRT or a CUDA GPU is missing."""
    return pytest.mark.tensorrt(pytest.mark.skipif(REASON is not None, reason=f"TensorRT: {REASON}")(test))


S = 224  # the graph's static volume size


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model, engine path, artifact metadata, timing cache path) for a tiny fp32 engine, profile 1/2/4."""
    from medblip_edge.model.config import preset
    from medblip_edge.model.medblip import image_encoder_of
    from medblip_edge.model.random_init import random_model

    cfg = preset("tiny")
    model = random_model(replace(cfg, llm={**cfg.llm, "vocab_size": 64}))  # vision path ignores the vocab
    d = tmp_path_factory.mktemp("trt")
    batch = torch.export.Dim("batch", min=1, max=8)
    # Example batch 2, not 1: torch.export would specialise a size-1 dim to a constant.
    # ImageEncoder is the export wrapper: volume [B,1,S,S,S] float32 -> visual tokens [B,Q,d_llm] float32
    torch.onnx.export(image_encoder_of(model), (torch.rand(2, 1, S, S, S),), str(d / "vision.onnx"),
                      dynamo=True, input_names=["volume"], output_names=["visual_tokens"],
                      dynamic_shapes={"volume": {0: batch}}, external_data=True)
    meta = build_engine(d / "vision.onnx", d / "vision.engine", min_batch=1, opt_batch=2, max_batch=4,
                        timing_cache_path=d / "timing.cache", workspace_gb=2)
    return model, d / "vision.engine", {"precision": "fp32", **meta}, d / "timing.cache"


def test_unavailable_reason_is_one_line():
    assert REASON is None or (isinstance(REASON, str) and REASON and "\n" not in REASON)


def test_construction_without_tensorrt_is_backend_unavailable(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError, as if absent
    meta = {"precision": "fp16", "profile": {"min": 1, "opt": 1, "max": 8}}
    with pytest.raises(BackendUnavailable, match="tensorrt is not installed") as e:
        TrtVision(tmp_path / "vision.engine", meta)
    assert "\n" not in str(e.value)


@needs_trt
@pytest.mark.parametrize("b", [1, 3])
def test_engine_matches_pytorch_fp32(built, b):
    model, engine, meta, _ = built
    vision = TrtVision(engine, meta)
    x = torch.rand(b, 1, S, S, S, generator=torch.Generator().manual_seed(b))
    with torch.inference_mode():
        ref = model.visual_tokens(x)  # [b, Q, d_llm] fp32, CPU
    got = vision(x)
    assert got.shape == ref.shape and got.dtype == torch.float32 and got.device.type == "cpu"
    err = (got - ref).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=1).min().item()
    assert cos > 0.999, f"cosine {cos:.6f}, max abs err {err:.3g}"
    assert err < 1e-3 * max(1.0, ref.abs().max().item()), f"max abs err {err:.3g}"


@needs_trt
def test_run_chunks_beyond_max_batch(built):
    model, engine, meta, _ = built
    x = torch.rand(5, 1, S, S, S, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = model.visual_tokens(x)
    got = TrtVision(engine, meta).run(x)  # 4 + 1
    assert torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=1).min() > 0.999


@needs_trt
def test_metadata_records_this_machine(built):
    _, _, meta, _ = built
    assert {k: meta[k] for k in engine_key()} == engine_key()
    assert meta["profile"] == {"min": 1, "opt": 2, "max": 4} and meta["strongly_typed"] is True
    assert meta["compute_capability"].count(".") == 1 and meta["build_seconds"] > 0


@needs_trt
def test_mismatched_engine_key_is_backend_unavailable(built):
    _, engine, meta, _ = built
    other = {**meta, "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.3.0"}
    if {k: other[k] for k in engine_key()} == engine_key():
        other["tensorrt"] = "0.0.0"
    with pytest.raises(BackendUnavailable, match="engine built for NVIDIA H100 80GB HBM3") as e:
        TrtVision(engine, other)
    assert "\n" not in str(e.value) and engine_key()["gpu"] in str(e.value)


@needs_trt
def test_timing_cache_is_written_and_reused(built, tmp_path):
    _, _, meta, cache = built
    assert meta["timing_cache"] == "new" and cache.stat().st_size > 0
    onnx = cache.parent / "vision.onnx"
    again = build_engine(onnx, tmp_path / "again.engine", min_batch=1, opt_batch=2, max_batch=4,
                         timing_cache_path=cache, workspace_gb=2)
    assert again["timing_cache"] == "reused" and (tmp_path / "again.engine").stat().st_size > 0
    assert cache.stat().st_size > 0



@pytest.mark.slow
def test_rebuild_request_without_tensorrt_falls_back_or_fails_in_one_line(mni_path, infer_cmd, tmp_path):
    """`--rebuild-trt` where TensorRT cannot run: auto says why and runs on ONNX Runtime; trt is an error."""
    if REASON is None:
        pytest.skip("TensorRT is usable here: the rebuild itself is tested below")
    b = tiny_onnx_bundle("tiny", "int4")
    env = {**os.environ, "MEDBLIP_TRT_CACHE": str(tmp_path / "cache")}
    auto = subprocess.run([*infer_cmd, str(mni_path), "--bundle", str(b), "--rebuild-trt"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert f"backend: vision=ort llm=ort (TensorRT engine not usable here: cannot rebuild the TensorRT engine: " \
           f"{REASON})" in auto.stderr
    assert json.loads(auto.stdout.strip().splitlines()[-1])["backend"]["vision"] == "ort"
    trt = subprocess.run([*infer_cmd, str(mni_path), "--bundle", str(b), "--backend", "trt", "--rebuild-trt"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert trt.returncode != 0 and "Traceback" not in trt.stderr
    assert f"cannot rebuild the TensorRT engine: {REASON}" in trt.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "cache").exists()


@needs_trt
def test_engine_from_another_machine_is_rebuilt_once_and_cached(tmp_path, monkeypatch):
    from medblip_edge.export.run import ExportOptions, export_bundle
    from medblip_edge.runtime.pipeline import Pipeline

    bundle = tmp_path / "bundle"
    export_bundle(ExportOptions(out=bundle, preset="tiny", llm_quant="none", trt=True, max_batch=2), quiet=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"]["vision_trt"].update(gpu="NVIDIA H100 80GB HBM3", tensorrt="0.0.0")  # "built elsewhere"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("MEDBLIP_TRT_CACHE", str(tmp_path / "cache"))
    fallback = Pipeline.from_bundle(bundle)
    assert fallback.chosen["vision"] == "ort" and "engine built for NVIDIA H100" in fallback.chosen["why"]
    rebuilt = Pipeline.from_bundle(bundle, rebuild_trt=True)
    assert rebuilt.chosen["vision"] == "trt"
    (engine,) = (tmp_path / "cache").glob("*/vision_fp16.engine")
    stamp = engine.stat().st_mtime_ns
    again = Pipeline.from_bundle(bundle, backend="trt", rebuild_trt=True)  # from the cache, not rebuilt
    assert again.chosen["vision"] == "trt" and engine.stat().st_mtime_ns == stamp
    vols = torch.rand(2, 1, S, S, S)
    got, want = again.visual_tokens(vols), fallback.visual_tokens(vols)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    # the export checked its engine on the evaluation volumes, the rebuild checked the new one the same way
    assert manifest["artifacts"]["vision_trt"]["parity"]["max_abs_err"] <= fidelity.VISION_TOL["fp16"]["max_abs_err"]
    meta = json.loads(engine.with_name("engine.json").read_text())
    assert meta["parity"]["cosine"] >= fidelity.VISION_TOL["fp16"]["cosine"] and meta["parity"]["volumes"] == 2


@needs_trt
def test_rebuilt_engine_outside_tolerance_is_refused_and_deleted(tmp_path, monkeypatch):
    from medblip_edge.export.run import ExportOptions, export_bundle
    from medblip_edge.runtime.pipeline import Pipeline

    bundle = tmp_path / "bundle"
    export_bundle(ExportOptions(out=bundle, preset="tiny", llm_quant="none", precision="fp16", max_batch=2),
                  quiet=True)
    monkeypatch.setenv("MEDBLIP_TRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(fidelity.VISION_TOL, "fp16", {"max_abs_err": 0.0, "cosine": 1.1})  # no engine can meet it
    with pytest.raises(MedblipError, match="rebuilt TensorRT engine") as e:
        Pipeline.from_bundle(bundle, backend="trt", rebuild_trt=True)
    assert e.value.code == "parity_failed"
    assert not list((tmp_path / "cache").glob("*/vision_fp16.engine")) and \
        not list((tmp_path / "cache").glob("*/engine.json"))


def test_vision_check_refuses_tokens_outside_tolerance():
    """The one check every vision artifact passes before it ships (ONNX at export, TensorRT at export or rebuild)."""
    ref = torch.randn(2, 4, 8).numpy()
    ok = fidelity.check_vision(ref + 1e-3, ref, "fp16", "engine")
    assert ok["volumes"] == 2 and ok["max_abs_err"] == pytest.approx(1e-3, rel=1e-3) and ok["cosine"] > 0.999
    with pytest.raises(MedblipError, match=r"engine \(fp16\) disagrees with PyTorch") as e:
        fidelity.check_vision(ref + 0.2, ref, "fp16", "engine")
    assert e.value.code == "parity_failed"

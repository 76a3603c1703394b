"""A TensorRT engine for this machine, built from the bundle's fp16 vision graph when asked (`--rebuild-trt`).

A serialized engine only runs on the GPU architecture and TensorRT version it was built for. The bundle
is never modified (its files are SHA-256 checked): the engine goes into a cache folder keyed by the
graph's SHA-256 and this machine's engine key, next to its metadata and timing cache, and later runs
reuse it. A new engine is run on the bundle's evaluation volumes and held to the fp32 PyTorch visual tokens
(the export's fp16 tolerance) before it is kept; its figures go into its metadata, and an engine outside the
tolerance is deleted and refused. Folder: $MEDBLIP_TRT_CACHE, else ~/.cache/medblip-edge/trt.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from ..bundle.format import TORCH, VISION_ONNX_FP16, VISION_TRT
from ..engines.trt_build import build_engine, engine_key, trt_available
from ..errors import BackendUnavailable, MedblipError
from ..model.evalset import eval_volumes
from ..model.fidelity import check_vision
from ..model.stored import fp32_compute
from ..model.weights import load_weights

SOURCE = VISION_ONNX_FP16  # the graph the export builds its engine from (precision from its own types)
SHIPPED = VISION_TRT


def cache_root() -> Path:
    return Path(os.environ.get("MEDBLIP_TRT_CACHE") or Path.home() / ".cache" / "medblip-edge" / "trt")


def _graph_digest(bundle) -> str:
    art = bundle.artifacts[SOURCE]
    return art["sha256"][art["files"]["main"]]


def _profile(bundle) -> dict:
    """The shipped engine's batch profile, else 1 / min(4, max) / the bundle's max batch."""
    shipped = bundle.artifacts.get(SHIPPED, {}).get("profile")
    if shipped:
        return shipped
    top = int(bundle.manifest["max_batch"])
    return {"min": 1, "opt": min(4, top), "max": top}


def engine_for_here(bundle) -> tuple[Path, dict]:
    """-> (engine path, its metadata) for this GPU and TensorRT: from the cache, or built now (minutes)."""
    reason = trt_available()
    if reason:
        raise BackendUnavailable(f"cannot rebuild the TensorRT engine: {reason}")
    if not bundle.has(SOURCE):
        raise BackendUnavailable(f"bundle {bundle.root.name} has no fp16 vision graph to build an engine from "
                                 "(export it with --trt or --precision fp16)")
    key, graph = engine_key(), _graph_digest(bundle)
    tag = hashlib.sha256(json.dumps({"graph": graph, **key}, sort_keys=True).encode()).hexdigest()
    folder = cache_root() / tag[:24]
    engine, meta_path = folder / "vision_fp16.engine", folder / "engine.json"
    if engine.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in key} == key and "parity" in meta:
            return engine, meta
    profile = _profile(bundle)
    print(f"building a TensorRT engine for {key['gpu']} / TensorRT {key['tensorrt']} into {folder} "
          f"(batch {profile['min']}..{profile['max']}; this takes minutes, later runs reuse it)", file=sys.stderr)
    meta = build_engine(bundle.path(SOURCE), engine, min_batch=profile["min"], opt_batch=profile["opt"],
                        max_batch=profile["max"], timing_cache_path=folder / "timing.cache")
    meta = {**meta, "precision": "fp16", "graph_sha256": graph}
    try:
        meta["parity"] = _check(bundle, engine, meta)
    except MedblipError:
        engine.unlink(missing_ok=True)
        raise
    tmp = meta_path.with_name(".engine.json.partial")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)  # written last: an engine without its metadata is rebuilt, never trusted
    return engine, meta


def _check(bundle, engine: Path, meta: dict) -> dict:
    """The new engine's visual tokens on the bundle's evaluation volumes against PyTorch's from the bundle's own
    weights (computed in fp32 as stored) -> {max_abs_err, cosine, volumes}; raises parity_failed outside tolerance."""
    from .vision_trt import TrtVision

    volumes = eval_volumes(2, bundle.config.vision.image_size)  # as the export checks a paper-size engine
    model = load_weights(bundle.config, bundle.path(TORCH), dtype=None)
    with torch.inference_mode(), fp32_compute(model):
        want = torch.cat([model.visual_tokens(volumes[i:i + 1]) for i in range(len(volumes))]).float().numpy()
    del model
    got = TrtVision(engine, meta).run(volumes).numpy()
    return check_vision(got, want, "fp16", "rebuilt TensorRT engine")

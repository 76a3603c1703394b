"""Benchmark-scale export check: the paper-size vision graph (EVA ViT-g 3D, 1B parameters) to ONNX with
external data, then one ONNX Runtime run compared with PyTorch fp32. Random weights; no LLM is built.

    python -m medblip_edge.benchmarks.paper_vision_export --out DIR [--preset paper-t5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from ..model.evalset import eval_volumes
from ..engines.ort_session import ort_session
from ..export.onnx_export import export_onnx
from ..model.fidelity import compare
from ..model.config import preset
from ..model.medblip import ImageEncoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="paper-t5")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = ImageEncoder(preset(args.preset)).eval()
    for p in (model.visual_encoder.cls_token, model.visual_encoder.pos_embed_3d, model.qformer.query_tokens):
        nn.init.normal_(p, std=0.02)
    vol = eval_volumes(2)
    with torch.no_grad():
        ref = model(vol[:1])
    t_build = time.perf_counter() - t0
    t1 = time.perf_counter()
    files = export_onnx(model, (vol,), args.out / "vision.onnx", ["volume"], ["visual_tokens"],
                        {"volume": {0: torch.export.Dim("batch", min=1, max=8)}})
    t_export = time.perf_counter() - t1
    t2 = time.perf_counter()
    out = ort_session(files[0]).run(None, {"volume": vol[:1].numpy()})[0]
    t_ort = time.perf_counter() - t2
    result = {"preset": args.preset, "parameters": sum(p.numel() for p in model.parameters()),
              "files": {f.name: f.stat().st_size for f in files}, "external_data": len(files) > 1,
              "seconds": {"build_and_reference": round(t_build, 1), "export": round(t_export, 1),
                          "ort_load_and_run": round(t_ort, 1)}, "parity": compare(out, ref.numpy())}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

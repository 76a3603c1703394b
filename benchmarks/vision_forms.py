"""The ViT's training-code forms against its fused forms, on one device, in one run.

    python -m medblip_edge.benchmarks.vision_forms --preset paper-t5 [--device cuda] [--dtype fp16]
        [--depth 4] [--batch 1 --batch 8] [--iters 10] [--out FILE.json]

Forms compared (model/vit3d.py): the patch embedding as the Conv3d the checkpoint stores
(`forward_conv`) or as one GEMM over the volume cut into patches (`forward`); attention as scores +
fp32 softmax + weighted sum (`forward_eager`) or `scaled_dot_product_attention` (`forward`); and the
whole ViT with each set. Weights are random (torch's default init) at the preset's sizes; `--depth`
keeps fewer blocks so a paper-size run fits a CPU (per-block figures scale with depth). Each row:
p50 ms, and the largest difference of the output from the training form's.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..model.config import preset
from ..model.dtypes import DTYPES
from ..model.vit3d import VisionTransformer3d, training_forms
from .machine import machine_info
from .timing import p50_ms



def compare(name: str, training, fused, device: str, iters: int) -> dict:
    t_ms, t_out = p50_ms(training, device, iters, warmup=2)
    f_ms, f_out = p50_ms(fused, device, iters, warmup=2)
    diff = (t_out.float() - f_out.float()).abs().max().item()
    return {"op": name, "training_ms": t_ms, "fused_ms": f_ms, "speedup": round(t_ms / f_ms, 2),
            "max_abs_diff": diff}


def _in_training_forms(vit: VisionTransformer3d, x: torch.Tensor) -> torch.Tensor:
    with training_forms(vit):
        return vit(x)


@torch.inference_mode()
def run(preset_name: str, device: str, dtype: str, depth: int | None, batches: list[int], iters: int) -> dict:
    cfg = preset(preset_name).vision
    cfg = replace(cfg, depth=depth or cfg.depth)
    torch.manual_seed(0)
    vit = VisionTransformer3d(cfg).to(device=device, dtype=DTYPES[dtype]).eval()
    rows = []
    for b in batches:
        x = torch.rand(b, 1, cfg.image_size, cfg.image_size, cfg.image_size, device=device, dtype=DTYPES[dtype])
        pe = vit.patch_embed_3d
        rows.append({"batch": b, **compare("patch embedding", lambda: pe.forward_conv(x), lambda: pe(x), device,
                                            iters)})
        tokens = pe(x)
        attn = vit.blocks[0].attn
        rows.append({"batch": b, **compare("attention (one block)", lambda: attn.forward_eager(tokens),
                                            lambda: attn(tokens), device, iters)})
        rows.append({"batch": b, **compare(f"ViT ({cfg.depth} blocks)", lambda: _in_training_forms(vit, x),
                                            lambda: vit(x), device, iters)})
    return {"preset": preset_name, "device": device, "dtype": dtype, "depth": cfg.depth, "iters": iters,
            "machine": machine_info(), "rows": rows}


def report(r: dict) -> str:
    lines = [f"{r['preset']} vision, {r['dtype']} on {r['device']} ({r['depth']} blocks), p50 of {r['iters']}:",
             "| batch | op | training form ms | fused form ms | speed-up | max abs diff |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        lines.append(f"| {row['batch']} | {row['op']} | {row['training_ms']} | {row['fused_ms']} | "
                     f"{row['speedup']}x | {row['max_abs_diff']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--depth", type=int, default=None, help="blocks kept (default: the preset's)")
    ap.add_argument("--batch", type=int, action="append", default=None, help="repeatable (default: 1)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    r = run(args.preset, args.device, args.dtype, args.depth, args.batch or [1], args.iters)
    r["command"] = "python -m medblip_edge.benchmarks.vision_forms " + " ".join(argv or sys.argv[1:])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=1) + "\n")
    print(report(r))


if __name__ == "__main__":
    main()

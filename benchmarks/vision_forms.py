"""`medblip-bench vision-forms`: the ViT's training-code forms against its fused forms, on one device, in one run.

Forms compared (model/vit3d.py): the patch embedding as the Conv3d the checkpoint stores
(`forward_conv`) or as one GEMM over the volume cut into patches (`forward`); attention as scores +
fp32 softmax + weighted sum (`forward_eager`) or `scaled_dot_product_attention` (`forward`); and the
whole ViT with each set. Weights are random (torch's default init) at the preset's sizes; `--depth`
keeps fewer blocks so a paper-size run fits a CPU (per-block figures scale with depth). Each row:
p50 ms, and the largest difference of the output from the training form's.
"""

from __future__ import annotations

from dataclasses import replace

import click
import torch

from ..errors import MedblipError
from ..model.config import preset as preset_config
from ..model.dtypes import DTYPES
from ..model.vit3d import VisionTransformer3d, training_forms
from .suite import Outcome, Run, device_option, suite
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
def run_forms(preset: str, device: str, dtype: str, depth: int | None, batches: list[int], iters: int) -> dict:
    cfg = preset_config(preset).vision
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
    return {"preset": preset, "device": device, "dtype": dtype, "depth": cfg.depth, "iters": iters, "rows": rows}


def report(r: dict) -> str:
    lines = [f"{r['preset']} vision, {r['dtype']} on {r['device']} ({r['depth']} blocks), p50 of {r['iters']}:", "",
             "| batch | op | training form ms | fused form ms | speed-up | max abs diff |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        lines.append(f"| {row['batch']} | {row['op']} | {row['training_ms']} | {row['fused_ms']} | "
                     f"{row['speedup']}x | {row['max_abs_diff']:.2e} |")
    return "\n".join(lines)


@suite("vision-forms")
@click.option("--preset", default="small", show_default=True,
              help="Model sizes to build (random weights): tiny, small, paper-t5, ...")
@device_option
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True, help="Weights and input.")
@click.option("--depth", type=int, default=None, help="ViT blocks kept [default: the preset's]; fewer let a "
              "paper-size run fit a CPU (per-block figures scale with depth).")
@click.option("--batch", type=int, multiple=True, help="Volumes per call; repeatable [default: 1].")
@click.option("--iters", type=int, default=5, show_default=True, help="Timed calls per form (p50 reported; 2 "
              "untimed first).")
def command(run: Run, preset: str, device: str, dtype: str, depth: int | None, batch: tuple, iters: int) -> Outcome:
    """Time the ViT's training-code forms against the fused forms the runtime and the export use, and give the
    largest difference of their outputs.

    Rows per batch: the patch embedding as the checkpoint's Conv3d (`forward_conv`) or one GEMM over the
    volume cut into patches; attention of one block as scores + fp32 softmax + weighted sum (`forward_eager`)
    or scaled_dot_product_attention; the whole ViT with each set (model/vit3d.py). Weights are random at the
    preset's sizes.

    \b
    Example (a GPU):
      medblip-bench vision-forms --preset paper-t5 --device cuda --dtype fp16 --batch 1 --batch 8 --iters 10
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MedblipError("--device cuda but torch sees no CUDA GPU", code="backend_unavailable")
    return Outcome("ViT training forms against fused forms",
                   run_forms(preset, device, dtype, depth, list(batch) or [1], iters), report)


if __name__ == "__main__":  # the old module path
    from .moved import forward

    forward("vision-forms")

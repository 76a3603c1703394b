"""The ViT's fused forms (patch GEMM, scaled_dot_product_attention) against the training code's forms they replace."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from medblip_edge.benchmarks import vision_forms
from medblip_edge.model.config import preset
from medblip_edge.model.vit3d import PatchEmbed3d, VisionTransformer3d, patches


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny").vision


@pytest.mark.parametrize("shape", [(2, 1, 64, 64, 64), (1, 1, 70, 65, 97)])
def test_patch_gemm_is_the_strided_convolution(cfg, shape):
    """Whole patches only, in the conv output's (D,H,W) order; voxels past the last whole patch are dropped."""
    torch.manual_seed(0)
    pe = PatchEmbed3d(replace(cfg, patch=32)).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        conv, gemm = pe.forward_conv(x), pe(x)
    assert gemm.shape == conv.shape == (shape[0], (shape[2] // 32) * (shape[3] // 32) * (shape[4] // 32), cfg.width)
    torch.testing.assert_close(gemm, conv, rtol=1e-4, atol=1e-4)


def test_patches_are_cubes_in_d_h_w_order():
    x = torch.arange(4 * 4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4, 4)
    p = patches(x, 2)  # [1, 8, 8]
    assert p.shape == (1, 8, 8)
    assert p[0, 0].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]  # the first cube, voxels in (d,h,w) order
    assert p[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]  # then along W
    assert p[0, 2, 0].item() == 8 and p[0, 4, 0].item() == 32  # then H, then D


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_attention_is_the_eager_attention(cfg, dtype, tol):
    torch.manual_seed(0)
    vit = VisionTransformer3d(cfg).eval().to(dtype)
    for blk in vit.blocks:  # non-zero biases, so the q/v bias layout is exercised
        torch.nn.init.normal_(blk.attn.q_bias)
        torch.nn.init.normal_(blk.attn.v_bias)
    tokens = torch.randn(2, 1 + cfg.num_patches, cfg.width, dtype=dtype)
    attn = vit.blocks[0].attn
    with torch.no_grad():
        torch.testing.assert_close(attn(tokens).float(), attn.forward_eager(tokens).float(), rtol=tol, atol=tol)


@pytest.mark.slow
def test_vision_forms_benchmark_reports_both_forms_and_restores_the_model(cfg, tmp_path):
    from click.testing import CliRunner

    from medblip_edge.cli import bench_main

    run = CliRunner().invoke(bench_main, ["vision-forms", "--preset", "tiny", "--iters", "1", "--batch", "1", "--batch",
                                          "2", "--out", str(tmp_path)])
    assert run.exit_code == 0, run.output
    r = json.loads((tmp_path / "results.json").read_text())
    assert [row["op"] for row in r["rows"]][:3] == ["patch embedding", "attention (one block)", "ViT (2 blocks)"]
    assert len(r["rows"]) == 6 and all(row["max_abs_diff"] < 1e-3 for row in r["rows"])
    assert "| 2 | ViT (2 blocks) |" in run.output
    vit = VisionTransformer3d(cfg)
    with vision_forms.training_forms(vit):
        assert vit.patch_embed_3d.forward == vit.patch_embed_3d.forward_conv
    assert "forward" not in vars(vit.patch_embed_3d) and all("forward" not in vars(b.attn) for b in vit.blocks)

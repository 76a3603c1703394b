"""The voxel refinement of the relevance map (explain/relevance.py): the moving average it measures detail against,
the attribution that must mark dark voxels when the answer leans on their darkness, and the spreading of each
patch's relevance that keeps the patch's mean."""

from __future__ import annotations

import numpy as np
import torch

from medblip_edge.explain.relevance import box_mean, detail_attribution, refine

S, P = 64, 16


def _volume_with_dark_cube(lo: int = 20, hi: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright textured volume with a dark cube [lo, hi)^3 (CSF-like) -> (volume, cube mask), [1,1,S,S,S]."""
    gen = torch.Generator().manual_seed(0)
    vol = 0.7 + 0.1 * torch.rand(1, 1, S, S, S, generator=gen)
    cube = torch.zeros_like(vol, dtype=torch.bool)
    cube[..., lo:hi, lo:hi, lo:hi] = True
    return vol.masked_fill(cube, 0.0), cube


def test_box_mean_is_the_mean_of_the_voxels_in_the_window():
    x = torch.rand(1, 1, 12, 10, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = box_mean(x, 5)[0, 0].numpy()
    a = x[0, 0].numpy()
    for z, y, w in [(6, 5, 4), (0, 0, 0), (11, 9, 8), (1, 7, 3)]:
        want = a[max(z - 2, 0): z + 3, max(y - 2, 0): y + 3, max(w - 2, 0): w + 3].mean()
        assert abs(got[z, y, w] - want) < 1e-12
    assert torch.allclose(box_mean(torch.full((1, 1, 8, 8, 8), 3.0), 7), torch.full((1, 1, 8, 8, 8), 3.0))


def test_dark_voxels_get_attribution_when_their_darkness_raises_the_margin():
    vol, cube = _volume_with_dark_cube()
    noise = 1e-3 * torch.randn(vol.shape, generator=torch.Generator().manual_seed(2))
    grad = torch.where(cube, torch.full_like(vol, -1.0), noise)  # brightening the cube lowers the margin
    attr = detail_attribution(grad, vol, P)
    assert float((grad * vol).abs()[cube].max()) == 0.0  # |gradient x input| has nothing there
    peak = np.unravel_index(int(torch.argmax(attr)), attr.shape)
    assert bool(cube[peak]), "the attribution's peak lies in the dark cube"
    assert float(attr[cube].mean()) > 50 * float(attr[~cube].mean())


def test_attribution_follows_the_gradients_sign():
    vol, cube = _volume_with_dark_cube()
    grad = torch.where(cube, torch.ones_like(vol), torch.zeros_like(vol))  # brightening the cube raises the margin
    attr = detail_attribution(grad, vol, P)
    assert float(attr[cube].max()) == 0.0  # darkness that lowers the margin is no evidence for the class
    assert (attr >= 0).all()


def test_refine_keeps_each_patchs_mean_and_leaves_unattributed_patches_uniform():
    g = S // P
    rel = torch.rand(g ** 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    attr = torch.zeros(1, 1, S, S, S, dtype=torch.float64)
    attr[..., 20:28, 20:28, 20:28] = 1.0  # only patch (1, 1, 1) has any
    out = refine(rel, attr, P).numpy()
    means = out.reshape(g, P, g, P, g, P).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(means.ravel(), rel.numpy(), rtol=1e-12)
    first = out[:P, :P, :P]
    assert np.allclose(first, rel[0].item())  # patch (0, 0, 0): no attribution, uniform
    inner = out[P: 2 * P, P: 2 * P, P: 2 * P]
    assert inner[4:12, 4:12, 4:12].min() > 0 and inner[0, 0, 0] == 0.0  # patch (1, 1, 1): all on the cube

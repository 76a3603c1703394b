"""Gradient-weighted attention relevance of the class margin on the 7x7x7 patch tokens (torch backend, fp32).

One forward and one backward pass of the fp32 model, every attention layer's probabilities kept:
  LLM: the relevance of the margin over its input positions (llm_rollout.py); the 32 visual tokens' share is the
       relevance of the Q-Former's 32 query outputs (the projection is per token);
  Q-Former: R^{qq} by its self-attention, R^{qi} by its cross-attention onto the image tokens (the cross rule
       carries the ViT's R^{ii}); the LLM's relevance over the queries weights the rows of R^{qi};
  ViT: R^{ii} by its self-attention over cls + patch tokens; the patch columns are the map.
Optional refinement inside each patch: gradient x (input - the input at the token's resolution) of the margin
with respect to the volume (the patch embedding's input), its positive part smoothed over a quarter of a patch,
spreads each patch's relevance over its voxels, the patch's mean kept (`detail_attribution`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model.vit3d import patches
from .llm_rollout import ROLLOUTS
from .recorder import eager_attention, outputs_of, vit_attention
from .rules import cross_step, self_step, weighted
from .target import answers_loglik, margin_torch


@dataclass
class Relevance:
    patches: np.ndarray  # [g, g, g] >= 0, in the model input's (D, H, W) patch order
    voxels: np.ndarray | None  # [S, S, S] refined map on the model-input grid (None unless refined)
    llm_inputs: np.ndarray  # [T + Q] relevance over the LLM's input positions: prompt, then visual tokens
    n_prompt: int  # T
    margin: float
    loglik: np.ndarray  # [3]
    volume_grad: torch.Tensor | None = None  # [1,1,S,S,S] d margin / d volume (kept on request)


@contextmanager
def frozen(model):
    """No parameter gradients (only activations are differentiated): restores requires_grad afterwards."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def qformer_rollout(layers, q_self, q_cross, r_vit: torch.Tensor, n_query: int) -> torch.Tensor:
    """-> R^{qi} [Q, 1 + P]: the queries' relevance over the ViT's input tokens."""
    r_qq = torch.eye(n_query, device=r_vit.device)
    r_qi = torch.zeros(n_query, r_vit.shape[0], device=r_vit.device)
    selfs, crosses = q_self.pairs(), q_cross.pairs()
    for layer in layers:
        a_bar = weighted(*next(selfs))
        r_qi, r_qq = self_step(r_qi, a_bar), self_step(r_qq, a_bar)
        if layer.has_cross_attention:
            r_qi = cross_step(r_qi, r_qq, weighted(*next(crosses)), r_vit)
    return r_qi


def box_mean(t: torch.Tensor, window: int) -> torch.Tensor:
    """[1,1,S,S,S] moving average over a cube of `window` (odd) voxels, separable; near the edges the mean of the
    voxels that exist."""
    for ks in ((window, 1, 1), (1, window, 1), (1, 1, window)):
        t = F.avg_pool3d(t, ks, stride=1, padding=tuple(k // 2 for k in ks), count_include_pad=False)
    return t


def default_windows(p: int) -> tuple[int, int]:
    """The refinement's (background, smooth) windows for patches of `p` voxels: a patch-wide mean, a quarter-patch
    average (33 and 9 at the published model's 32)."""
    return p + 1, p // 4 + 1


def detail_attribution(grad: torch.Tensor, volume: torch.Tensor, p: int, background: int | None = None,
                       smooth: int | None = None) -> torch.Tensor:
    """First-order attribution of the margin to each voxel's departure from the volume seen at the token's
    resolution (its mean over a patch-wide window): grad x (volume - that mean), the positive part (the voxels
    whose departure raises the margin) of its average over a quarter-patch window, [1,1,S,S,S] >= 0.

    Plain |gradient x input| is zero where the input is zero, so it never marks dark voxels: enlarged ventricles,
    i.e. dark CSF, the change a dementia diagnosis leans on, would get none of their patch's relevance. Against
    the local mean a voxel darker than its surroundings has a negative difference, and where brightening it lowers
    the margin (negative gradient) the product is positive. The smoothing window sums the per-voxel products,
    whose spatial pattern within a patch is otherwise the patch embedding's kernel. The windows (`background` and
    `smooth`, default_windows unless given) were chosen on a tuning cohort separate from the one
    the checks report (`medblip-bench explain-checks --window`)."""
    default_background, default_smooth = default_windows(p)
    detail = grad * (volume - box_mean(volume, background or default_background))
    return box_mean(detail, smooth or default_smooth).clamp(min=0)


def refine(patch_rel: torch.Tensor, attribution: torch.Tensor, p: int) -> torch.Tensor:
    """patch relevance [P] and a voxel attribution >= 0 [1,1,S,S,S] (detail_attribution) -> [S,S,S], each patch's
    mean equal to its relevance (a patch with no attribution keeps its relevance uniform)."""
    s = attribution.shape[-1]
    g = s // p
    w = patches(attribution, p)[0]  # [P, p^3]
    sums = w.sum(dim=1, keepdim=True)
    w = torch.where(sums > 0, w / sums.clamp(min=1e-30), torch.full_like(w, 1.0 / w.shape[1])) * w.shape[1]
    vox = (w * patch_rel[:, None]).reshape(g, g, g, p, p, p).permute(0, 3, 1, 4, 2, 5).reshape(g * p, g * p, g * p)
    out = torch.zeros(s, s, s, dtype=vox.dtype, device=vox.device)
    out[: g * p, : g * p, : g * p] = vox
    return out


def explain_relevance(model, tasks, volume: torch.Tensor, patient_text: str, target: int,
                      refine_voxels: bool = True, keep_grad: bool = False) -> Relevance:
    """model: a fp32 MedBlip (model/medblip.py); tasks: model/tasks.Tasks; volume [1,1,S,S,S] (the model input).
    keep_grad: the margin's gradient with respect to the volume comes back too (to refine with other windows)."""
    device = model.proj.weight.device
    vit, qf = model.visual_encoder, model.qformer.qformer
    layers = list(qf.encoder.layer)
    rollout = ROLLOUTS[model.cfg.variant]()
    prompt = tasks.prompt_ids(patient_text)
    cands = tasks.answer_ids
    vol = volume.to(device, torch.float32).detach().clone().requires_grad_(True)
    self_mods = [layer.attention.attention for layer in layers]
    cross_mods = [layer.crossattention.attention for layer in layers if layer.has_cross_attention]
    with frozen(model), torch.enable_grad(), vit_attention(vit) as vit_rec, eager_attention(qf.config), \
            outputs_of(self_mods, 1) as q_self, outputs_of(cross_mods, 1) as q_cross:
        visual = model.proj(model.qformer(model.image_embeds(vol)))
        logits = rollout.forward(model.llm, prompt, visual, cands)
        ll = answers_loglik(logits, cands)
        margin = margin_torch(ll, target)
        margin.backward()
    with torch.no_grad():
        n_inputs = len(prompt) + visual.shape[1]
        llm_rel = rollout.relevance(cands, n_inputs)
        r_vit = torch.eye(vit_rec[0].shape[-1], device=device)
        for a, g in vit_rec.pairs():
            r_vit = self_step(r_vit, weighted(a, g))
        r_qi = qformer_rollout(layers, q_self, q_cross, r_vit, visual.shape[1])
        image = llm_rel[len(prompt):] @ r_qi  # [1 + P]
        patch_rel = image[1:].clamp(min=0)
        grid = round(patch_rel.numel() ** (1 / 3))
        voxels = None
        if refine_voxels:
            p = vit.cfg.patch
            voxels = refine(patch_rel, detail_attribution(vol.grad, vol.detach(), p), p).cpu().numpy()
    return Relevance(patch_rel.reshape(grid, grid, grid).cpu().numpy().astype(np.float64), voxels,
                     llm_rel.cpu().numpy().astype(np.float64), len(prompt), float(margin.detach()),
                     ll.detach().cpu().numpy().astype(np.float64), vol.grad.detach() if keep_grad else None)

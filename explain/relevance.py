"""Gradient-weighted attention relevance of the class margin on the 7x7x7 patch tokens (torch backend, fp32).

One forward and one backward pass of the fp32 model, every attention layer's probabilities kept:
  LLM: the relevance of the margin over its input positions (llm_rollout.py); the 32 visual tokens' share is the
       relevance of the Q-Former's 32 query outputs (the projection is per token);
  Q-Former: R^{qq} by its self-attention, R^{qi} by its cross-attention onto the image tokens (the cross rule
       carries the ViT's R^{ii}); the LLM's relevance over the queries weights the rows of R^{qi};
  ViT: R^{ii} by its self-attention over cls + patch tokens; the patch columns are the map.
Optional refinement inside each patch: |gradient x input| of the margin with respect to the volume (the patch
embedding's input) spreads each patch's relevance over its voxels, the patch's mean kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

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


def refine(patch_rel: torch.Tensor, grad_x_input: torch.Tensor, p: int) -> torch.Tensor:
    """patch relevance [P] and |grad x input| [1,1,S,S,S] -> [S,S,S], each patch's mean equal to its relevance
    (a patch with no gradient x input keeps its relevance uniform)."""
    s = grad_x_input.shape[-1]
    g = s // p
    w = patches(grad_x_input, p)[0]  # [P, p^3]
    sums = w.sum(dim=1, keepdim=True)
    w = torch.where(sums > 0, w / sums.clamp(min=1e-30), torch.full_like(w, 1.0 / w.shape[1])) * w.shape[1]
    vox = (w * patch_rel[:, None]).reshape(g, g, g, p, p, p).permute(0, 3, 1, 4, 2, 5).reshape(g * p, g * p, g * p)
    out = torch.zeros(s, s, s, dtype=vox.dtype, device=vox.device)
    out[: g * p, : g * p, : g * p] = vox
    return out


def explain_relevance(model, tasks, volume: torch.Tensor, patient_text: str, target: int,
                      refine_voxels: bool = True) -> Relevance:
    """model: a fp32 MedBlip (model/medblip.py); tasks: model/tasks.Tasks; volume [1,1,S,S,S] (the model input)."""
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
            voxels = refine(patch_rel, (vol.grad * vol).abs(), vit.cfg.patch).cpu().numpy()
    return Relevance(patch_rel.reshape(grid, grid, grid).cpu().numpy().astype(np.float64), voxels,
                     llm_rel.cpu().numpy().astype(np.float64), len(prompt), float(margin.detach()),
                     ll.detach().cpu().numpy().astype(np.float64))

"""MedBLIP for inference: volume -> visual tokens -> LLM."""

from __future__ import annotations

import torch
from torch import nn

from .config import MedBlipConfig
from .llm import family
from .qformer import QueryTransformer
from .vit3d import VisionTransformer3d


class MedBlip(nn.Module):
    """The whole model. `visual_tokens` is the image half; `llm` is the Hugging Face LLM."""

    def __init__(self, cfg: MedBlipConfig):
        super().__init__()
        self.cfg = cfg
        self.family = family(cfg.variant)
        self.visual_encoder = VisionTransformer3d(cfg.vision)
        self.ln_vision = nn.LayerNorm(cfg.vision.width)  # eps 1e-5, always run in fp32
        self.qformer = QueryTransformer(cfg.qformer, cfg.vision.width)
        self.proj = nn.Linear(cfg.qformer.hidden, self.family.hidden_size(cfg.llm))
        self.llm = self.family.build(cfg.llm)

    @property
    def d_llm(self) -> int:
        return self.proj.out_features

    def image_embeds(self, volume: torch.Tensor) -> torch.Tensor:
        """volume [B,1,S,S,S] -> image_embeds [B, 1+P, Cv] (ln_vision output, fp32)."""
        x = self.visual_encoder(volume.to(self.proj.weight.dtype))
        return nn.functional.layer_norm(
            x.float(), self.ln_vision.normalized_shape, self.ln_vision.weight.float(),
            self.ln_vision.bias.float(), self.ln_vision.eps,
        )

    def visual_tokens(self, volume: torch.Tensor) -> torch.Tensor:
        """volume [B,1,S,S,S] float -> visual tokens [B, num_query, d_llm] in the model's dtype."""
        emb = self.image_embeds(volume).to(self.proj.weight.dtype)
        return self.proj(self.qformer(emb))

    def embed_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B,T] int64 -> embeddings [B,T,d_llm]."""
        return self.family.embed_tokens(self.llm)(ids)

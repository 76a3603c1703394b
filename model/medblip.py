"""MedBLIP for inference: volume -> visual tokens (ImageEncoder) -> LLM (MedBlip)."""

from __future__ import annotations

import torch
from torch import nn

from .config import MedBlipConfig
from .llm import family
from .qformer import QueryTransformer
from .vit3d import VisionTransformer3d


class ImageEncoder(nn.Module):
    """The image half: 3D ViT -> ln_vision -> Q-Former -> projection. forward = visual tokens."""

    def __init__(self, cfg: MedBlipConfig):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = VisionTransformer3d(cfg.vision)
        self.ln_vision = nn.LayerNorm(cfg.vision.width)  # eps 1e-5, always run in fp32
        self.qformer = QueryTransformer(cfg.qformer, cfg.vision.width)
        self.proj = nn.Linear(cfg.qformer.hidden, family(cfg.variant).hidden_size(cfg.llm))

    @property
    def d_llm(self) -> int:
        return self.proj.out_features

    def image_embeds(self, volume: torch.Tensor) -> torch.Tensor:
        """volume [B,1,S,S,S] -> image_embeds [B, 1+P, Cv] (ln_vision output, fp32)."""
        x = self.visual_encoder(volume.to(self.visual_encoder.pos_embed_3d.dtype))
        return nn.functional.layer_norm(
            x.float(), self.ln_vision.normalized_shape, self.ln_vision.weight.float(),
            self.ln_vision.bias.float(), self.ln_vision.eps,
        )

    def visual_tokens(self, volume: torch.Tensor) -> torch.Tensor:
        """volume [B,1,S,S,S] float -> visual tokens [B, num_query, d_llm] in the projection's dtype."""
        emb = self.image_embeds(volume).to(self.proj.weight.dtype)
        return self.proj(self.qformer(emb))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.visual_tokens(volume)


class MedBlip(ImageEncoder):
    """The whole model: ImageEncoder plus `llm`, the Hugging Face LLM."""

    def __init__(self, cfg: MedBlipConfig):
        super().__init__(cfg)
        self.family = family(cfg.variant)
        self.llm = self.family.build(cfg.llm)

    def embed_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B,T] int64 -> embeddings [B,T,d_llm]."""
        return self.family.embed_tokens(self.llm)(ids)

    def to_precision(self, dtype: torch.dtype) -> "MedBlip":
        """Cast in place from fp32: the image half to `dtype`, the LLM by its family's rule (fp32 spots kept)."""
        if dtype != torch.float32:
            for mod in (self.visual_encoder, self.ln_vision, self.qformer, self.proj):
                mod.to(dtype)
            self.family.to_half(self.llm, dtype)
        return self


def image_encoder_of(model: MedBlip, vit_dtype: torch.dtype | None = None) -> ImageEncoder:
    """A standalone ImageEncoder sharing (or, with `vit_dtype`, copying) `model`'s image weights.

    fp16 export: the ViT runs in `vit_dtype`; ln_vision, the Q-Former and the projection stay fp32, as
    transformers keeps BLIP-2's Q-Former in fp32.
    """
    with torch.device("meta"):
        enc = ImageEncoder(model.cfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}
    if vit_dtype is not None:
        sd = {k: v.to(vit_dtype) if k.startswith("visual_encoder.") else v.clone() for k, v in sd.items()}
    enc.load_state_dict(sd, assign=True, strict=True)
    return enc.eval()

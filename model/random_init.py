"""Random-weight MedBLIP written exactly as the training code saves it, plus an LLM folder with a trained tokenizer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint import to_training_key
from .config import MedBlipConfig
from .medblip import MedBlip
from .tokenizer_build import TRAINERS

CONTRASTIVE_DIM = 256  # the training code's embed_dim for vision_proj / text_proj / qa_proj


def write_llm_folder(cfg: MedBlipConfig, llm_dir: Path) -> MedBlipConfig:
    """Tokenizer + config.json (FLAN-T5 / BioMedLM style) in `llm_dir`; fills a `None` vocab size from the tokenizer."""
    tok = TRAINERS[cfg.variant](llm_dir)
    llm = dict(cfg.llm)
    if llm.get("vocab_size") is None:
        llm["vocab_size"] = len(tok)
    (llm_dir / "config.json").write_text(json.dumps(llm, indent=2))
    return replace(cfg, llm=llm)


@torch.no_grad()
def random_model(cfg: MedBlipConfig, seed: int = 0) -> MedBlip:
    """MedBlip with random weights (fp32); learned embeddings get small normal values, not zeros."""
    torch.manual_seed(seed)
    model = MedBlip(cfg)
    for p in (model.visual_encoder.cls_token, model.visual_encoder.pos_embed_3d, model.qformer.query_tokens):
        nn.init.normal_(p, std=0.02)
    for blk in model.visual_encoder.blocks:
        nn.init.normal_(blk.attn.q_bias, std=0.02)
        nn.init.normal_(blk.attn.v_bias, std=0.02)
    # Logits of unit scale (a real model's order), so class probabilities are not all 0/1.
    head = model.llm.get_output_embeddings().weight
    nn.init.normal_(head, std=head.shape[1] ** -0.5)
    return model.eval()


def _storage_dtype(key: str, fam) -> torch.dtype:
    """Dtypes as the training code leaves them: LLM bf16/fp16, ViT Linear layers fp16, the rest fp32."""
    if key.startswith(fam.llm_prefix):
        return fam.storage_dtype
    if key.startswith("visual_encoder.blocks.") and any(s in key for s in (".qkv.", ".proj.", ".fc1.", ".fc2.")):
        return torch.float16
    return torch.float32


def training_state_dict(model: MedBlip) -> dict[str, torch.Tensor]:
    """MedBlip -> the state dict `torch.save(model.state_dict())` writes in the training code."""
    fam, cfg = model.family, model.cfg
    sd = {}
    for k, v in model.state_dict().items():
        tk = to_training_key(k, fam)
        sd[tk] = v.detach().to(_storage_dtype(tk, fam)).clone()
    g = torch.Generator().manual_seed(1)
    h, inter = cfg.qformer.hidden, cfg.qformer.intermediate
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    for i in range(cfg.qformer.layers):  # the text-path FFN: trained, unused by the queries
        p = f"Qformer.bert.encoder.layer.{i}."
        sd[p + "intermediate.dense.weight"] = torch.randn(inter, h, generator=g) * 0.02
        sd[p + "intermediate.dense.bias"] = torch.zeros(inter)
        sd[p + "output.dense.weight"] = torch.randn(h, inter, generator=g) * 0.02
        sd[p + "output.dense.bias"] = torch.zeros(h)
        sd[p + "output.LayerNorm.weight"] = torch.ones(h)
        sd[p + "output.LayerNorm.bias"] = torch.zeros(h)
    for name in ("vision_proj", "text_proj", "qa_proj"):
        sd[name + ".weight"] = torch.randn(CONTRASTIVE_DIM, h, generator=g) * 0.02
        sd[name + ".bias"] = torch.zeros(CONTRASTIVE_DIM)
    sd["temp"] = torch.tensor(0.07)
    if cfg.variant == "gpt2":
        sd.update(_gpt2_legacy_buffers(cfg.llm, fam))
    return sd


def _gpt2_legacy_buffers(llm: dict, fam) -> dict[str, torch.Tensor]:
    """GPT-2's old causal-mask buffers, which BioMedLM checkpoints still carry."""
    n = llm["n_positions"]
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
    out = {}
    for i in range(llm["n_layer"]):
        out[f"{fam.llm_prefix}transformer.h.{i}.attn.bias"] = mask
        out[f"{fam.llm_prefix}transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def write_random_checkpoint(cfg: MedBlipConfig, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `checkpoint.pth` (training layout) and `llm/` into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    llm_dir = out_dir / "llm"
    cfg = write_llm_folder(cfg, llm_dir)
    ckpt = out_dir / "checkpoint.pth"
    torch.save(training_state_dict(random_model(cfg, seed)), ckpt)
    return ckpt, llm_dir

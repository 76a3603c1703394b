"""Random-weight MedBLIP written exactly as the training code saves it, plus an LLM folder with a trained tokenizer.

The checkpoint is written one block at a time, in the dtypes the training code stores, so a paper-size
preset (~8 GB as stored, ~16 GB in fp32) never exists in memory whole: torch.save writes the file's
layout with empty storages (`skip_data`), the file is mapped shared, and each block is initialised
(the modules' own init: PyTorch defaults, transformers' `_init_weights`), cast and copied into its
place, then dropped. Each block draws from its own seed, so the values do not depend on the order.
"""

from __future__ import annotations

import json
import mmap
import zlib
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint import to_training_key
from .config import MedBlipConfig
from .medblip import MedBlip
from .stored import release, units
from .tokenizer_build import TRAINERS

CONTRASTIVE_DIM = 256  # the training code's embed_dim for vision_proj / text_proj / qa_proj
SMALL_STD = 0.02  # learned embeddings and EVA's q/v biases: small normal values, not zeros


def write_llm_folder(cfg: MedBlipConfig, llm_dir: Path) -> MedBlipConfig:
    """Tokenizer + config.json (FLAN-T5 / BioMedLM style) in `llm_dir`; fills a `None` vocab size from the tokenizer."""
    tok = TRAINERS[cfg.variant](llm_dir)
    llm = dict(cfg.llm)
    if llm.get("vocab_size") is None:
        llm["vocab_size"] = len(tok)
    (llm_dir / "config.json").write_text(json.dumps(llm, indent=2))
    return replace(cfg, llm=llm)


def storage_dtype(key: str, fam) -> torch.dtype:
    """Dtypes as the training code leaves them: LLM bf16/fp16, ViT Linear layers fp16, the rest fp32."""
    if key.startswith(fam.llm_prefix):
        return fam.storage_dtype
    if key.startswith("visual_encoder.blocks.") and any(s in key for s in (".qkv.", ".proj.", ".fc1.", ".fc2.")):
        return torch.float16
    return torch.float32


# -- initialising one block at a time -----------------------------------------------------

class _Init:
    """Random values for `model` (built on the meta device), one unit (model.stored.units) at a time."""

    def __init__(self, model: MedBlip, seed: int):
        self.model, self.seed = model, seed
        self.hf = [model.llm, model.qformer.qformer]  # transformers models: their own _init_weights
        small = [model.visual_encoder.cls_token, model.visual_encoder.pos_embed_3d, model.qformer.query_tokens]
        small += [p for blk in model.visual_encoder.blocks for p in (blk.attn.q_bias, blk.attn.v_bias)]
        head = model.llm.get_output_embeddings().weight
        # logits of unit scale (a real model's order), so class probabilities are not all 0/1
        self.override = {id(p): SMALL_STD for p in small} | {id(head): head.shape[1] ** -0.5}
        self.names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), []).append(name)

    def blocks(self):
        """Yield ({module key: fp32 tensor}) per unit, every key of a tied weight included; afterwards the
        unit is back on the meta device."""
        done: set[int] = set()
        for name, unit, whole in units(self.model):
            owners = _post_order(unit) if whole else [unit]
            todo = [(m, k, p) for m in owners for k, p in m._parameters.items()
                    if p is not None and id(p) not in done]
            if not todo:
                continue
            torch.manual_seed(zlib.crc32(f"{self.seed}/{name}".encode()))
            made = {}
            for m, k, p in todo:
                m._parameters[k] = made.setdefault(id(p), nn.Parameter(torch.empty(p.shape), requires_grad=False))
            self._init(owners, {id(new): old_id for old_id, new in made.items()})
            yield {key: new.data for old_id, new in made.items() for key in self.names[old_id]}
            for m, k, p in todo:
                m._parameters[k] = p  # back to the meta parameter: the values are written, memory freed
                done.add(id(p))

    @torch.no_grad()
    def _init(self, owners: list[nn.Module], original: dict[int, int]) -> None:
        for hf in self.hf:  # transformers' rules cover every weight of its models
            inside = {id(m) for m in hf.modules()}
            for m in owners:
                if id(m) in inside:
                    hf._init_weights(m)
            hf._init_weights(hf)  # model-level rules (T5: shared and lm_head); a no-op on weights still on meta
        hf_modules = {id(m) for hf in self.hf for m in hf.modules()}
        for m in owners:  # MedBLIP's own modules: PyTorch's defaults
            if id(m) not in hf_modules and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        for m in owners:
            for p in m._parameters.values():
                std = None if p is None else self.override.get(original.get(id(p)))
                if std is not None:
                    nn.init.normal_(p, std=std)


def _post_order(module: nn.Module) -> list[nn.Module]:
    """Children before their parent, as nn.Module.apply visits them: a parent's init rule (T5Attention's
    per-projection stds) must win over the generic one its Linear children get."""
    return [m for child in module.children() for m in _post_order(child)] + [module]


@torch.no_grad()
def random_model(cfg: MedBlipConfig, seed: int = 0) -> MedBlip:
    """MedBlip with the random weights `write_random_checkpoint` writes, in fp32 and in memory."""
    with torch.device("meta"):
        model = MedBlip(cfg)
    sd = {}
    for block in _Init(model, seed).blocks():
        sd.update(block)
    model.load_state_dict(sd, assign=True, strict=True)
    from .checkpoint import retie

    retie(model)
    return model.eval()


# -- the training code's checkpoint layout ------------------------------------------------

def _extra_keys(cfg: MedBlipConfig, fam) -> dict[str, torch.Tensor]:
    """Keys the training checkpoint holds that inference does not use: the Q-Former's text-path FFN, the
    contrastive heads, the temperature, position ids and GPT-2's legacy mask buffers."""
    g = torch.Generator().manual_seed(1)
    h, inter = cfg.qformer.hidden, cfg.qformer.intermediate
    sd = {"Qformer.bert.embeddings.position_ids": torch.arange(512).unsqueeze(0)}
    for i in range(cfg.qformer.layers):
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
        n = cfg.llm["n_positions"]
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        for i in range(cfg.llm["n_layer"]):
            sd[f"{fam.llm_prefix}transformer.h.{i}.attn.bias"] = mask
            sd[f"{fam.llm_prefix}transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def _skeleton(model: MedBlip, extra: dict[str, torch.Tensor], path: Path) -> None:
    """torch.save the layout (keys, shapes, stored dtypes; tied weights sharing one storage) without data."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.serialization import skip_data
    from torch.utils.serialization import config

    fam = model.family
    shared: dict[int, torch.Tensor] = {}
    with FakeTensorMode():
        sd = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            key = to_training_key(name, fam)
            if id(p) not in shared:
                shared[id(p)] = torch.empty(p.shape, dtype=storage_dtype(key, fam))
            sd[key] = shared[id(p)]
        sd.update({k: torch.empty(v.shape, dtype=v.dtype) for k, v in extra.items()})
    crc = config.save.compute_crc32
    config.save.compute_crc32 = False  # storages are filled after the archive is written
    try:
        with skip_data(materialize_fake_tensors=True):
            torch.save(sd, path)
    finally:
        config.save.compute_crc32 = crc


def write_random_checkpoint(cfg: MedBlipConfig, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `checkpoint.pth` (training layout, stored dtypes) and `llm/` into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    llm_dir = out_dir / "llm"
    cfg = write_llm_folder(cfg, llm_dir)
    ckpt = out_dir / "checkpoint.pth"
    with torch.device("meta"):
        model = MedBlip(cfg)
    extra = _extra_keys(cfg, model.family)
    _skeleton(model, extra, ckpt)
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):  # writes go to the file
        sd = torch.load(ckpt, mmap=True, weights_only=True)
    for block in _Init(model, seed).blocks():
        written = [sd[to_training_key(name, model.family)] for name in block]
        for dst, t in zip(written, block.values()):
            dst.copy_(t)
        release(written)
    for key, t in extra.items():
        sd[key].copy_(t)
    del sd
    return ckpt, llm_dir

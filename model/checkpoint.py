"""Load the training code's checkpoint: read safely, read the sizes off the tensors, account for every key."""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import MedBlipConfig, QFormerConfig, VisionConfig
from .llm import FAMILIES, LlmFamily, family
from .medblip import MedBlip
from .qformer import LAVIS_PREFIX, hf_to_lavis, lavis_to_hf
from .stored import read_safetensors

# Trained only for the contrastive losses; never used to answer.
_CONTRASTIVE = re.compile(r"^(vision_proj|text_proj|qa_proj)\.(weight|bias)$|^temp$")


@dataclass
class LoadReport:
    """What loading did with each checkpoint key."""

    variant: str
    loaded: int = 0
    unused: list[str] = field(default_factory=list)  # allowed: contrastive heads, Q-Former text path, buffers
    llm_weights_from: str = "checkpoint"
    dtypes: dict = field(default_factory=dict)  # module key -> dtype as stored in the checkpoint

    def as_dict(self) -> dict:
        return {"variant": self.variant, "loaded_keys": self.loaded, "unused_keys": self.unused,
                "llm_weights_from": self.llm_weights_from}


# -- reading files ------------------------------------------------------------

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A `torch.save(state_dict)` file (optionally {"model": ...}) or safetensors -> {key: tensor}; never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.name}: checkpoint not found", code="checkpoint_not_found")
    if path.suffix == ".safetensors":
        try:
            sd = read_safetensors(path)
        except Exception as e:  # a bad header or offsets past the end: not a safetensors file
            raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})", code="corrupt_checkpoint")
    else:
        sd = _torch_load(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path.name}: not a state dict of tensors", code="corrupt_checkpoint")
    return sd


def _torch_load(path: Path):
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path.name}: refused, the file would run code when unpickled (weights_only=True)",
                code="unsafe_checkpoint")
        raise CheckpointError(f"{path.name}: corrupt checkpoint ({_first_line(e)})", code="corrupt_checkpoint")
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: truncated or corrupt checkpoint ({_first_line(e)})",
                              code="corrupt_checkpoint")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def read_llm_config(llm_dir: str | Path) -> dict:
    """The LLM folder's config.json as a plain dict."""
    p = Path(llm_dir) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"--llm {llm_dir}: no config.json (a Hugging Face model folder is expected)",
                              code="llm_folder")
    return json.loads(p.read_text())


def read_llm_weights(llm_dir: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a Hugging Face folder: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    d = Path(llm_dir)
    index = d / "model.safetensors.index.json"
    files = ([d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
             if index.is_file() else [p for p in (d / "model.safetensors", d / "pytorch_model.bin") if p.is_file()][:1])
    if not files:
        raise CheckpointError(f"the checkpoint holds no LLM weights and --llm {d} has none either",
                              code="missing_llm_weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_state_dict(f))
    return sd


# -- key layout ---------------------------------------------------------------

def detect_family(sd: dict[str, torch.Tensor]) -> LlmFamily:
    found = [f for f in FAMILIES.values() if f.proj_prefix + "weight" in sd]
    if len(found) != 1:
        raise CheckpointError("cannot tell the variant: expected exactly one of "
                              + ", ".join(f.proj_prefix + "weight" for f in FAMILIES.values()), code="bad_checkpoint")
    return found[0]


def to_module_key(key: str, fam: LlmFamily) -> str | None:
    """Training-code key -> MedBlip module key; None for keys unused at inference; KeyError if unknown."""
    if key.startswith(("visual_encoder.", "ln_vision.")):
        return key
    if key == "query_tokens":
        return "qformer.query_tokens"
    if key.startswith(LAVIS_PREFIX):
        mapped = lavis_to_hf(key[len(LAVIS_PREFIX):])
        return None if mapped is None else "qformer.qformer." + mapped
    if key.startswith(fam.proj_prefix):
        return "proj." + key[len(fam.proj_prefix):]
    if key.startswith(fam.llm_prefix):
        rest = key[len(fam.llm_prefix):]
        return None if fam.is_buffer_key(rest) else "llm." + rest
    if _CONTRASTIVE.match(key):
        return None
    raise KeyError(key)


def to_training_key(module_key: str, fam: LlmFamily) -> str:
    """MedBlip module key -> the training code's key (inverse of `to_module_key`)."""
    if module_key == "qformer.query_tokens":
        return "query_tokens"
    if module_key.startswith("qformer.qformer."):
        return LAVIS_PREFIX + hf_to_lavis(module_key[len("qformer.qformer."):])
    if module_key.startswith("proj."):
        return fam.proj_prefix + module_key[len("proj."):]
    if module_key.startswith("llm."):
        return fam.llm_prefix + module_key[len("llm."):]
    return module_key


# -- sizes --------------------------------------------------------------------

def _indices(sd, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` over the keys (layer indices)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(rx.match, sd) if m})


def _count(sd, pattern: str) -> int:
    return len(_indices(sd, pattern))


def infer_config(sd: dict[str, torch.Tensor], llm_cfg: dict) -> MedBlipConfig:
    """Depth, widths, query count and variant read off the tensors; the LLM config from its folder."""
    fam = detect_family(sd)
    try:
        conv = sd["visual_encoder.patch_embed_3d.proj.weight"]  # [C, 1, p, p, p]
        n_tokens = sd["visual_encoder.pos_embed_3d"].shape[1]
        vision = VisionConfig(
            width=conv.shape[0], depth=_count(sd, r"^visual_encoder\.blocks\.(\d+)\."),
            mlp_dim=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0], patch=conv.shape[2],
            image_size=round((n_tokens - 1) ** (1 / 3)) * conv.shape[2])
        q = sd["query_tokens"]  # [1, Q, H]
        layers = _count(sd, r"^Qformer\.bert\.encoder\.layer\.(\d+)\.")
        cross = _indices(sd, r"^Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.")
        qformer = QFormerConfig(
            hidden=q.shape[2], layers=layers, num_query=q.shape[1],
            intermediate=sd["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
            cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else max(layers, 1))
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"checkpoint lacks a MedBLIP key needed to read its sizes: {e}", code="missing_keys")
    if vision.width % vision.head_dim or qformer.hidden % qformer.head_dim:
        raise CheckpointError(f"widths {vision.width}/{qformer.hidden} are not multiples of the head widths "
                              f"{vision.head_dim}/{qformer.head_dim}", code="bad_checkpoint")
    llm_type = llm_cfg.get("model_type")
    if llm_type != fam.name:
        raise CheckpointError(f"checkpoint is the {fam.name} variant but the --llm config is {llm_type!r}",
                              code="wrong_variant")
    d_llm = sd[fam.proj_prefix + "weight"].shape[0]
    if fam.hidden_size(llm_cfg) != d_llm:
        raise CheckpointError(f"projection outputs {d_llm} but the LLM config's hidden size is "
                              f"{fam.hidden_size(llm_cfg)}", code="wrong_variant")
    return MedBlipConfig(fam.name, vision, qformer, dict(llm_cfg))


# -- loading ------------------------------------------------------------------

def load_medblip(sd: dict[str, torch.Tensor], llm_cfg: dict, llm_weights: dict | None = None,
                 dtype: torch.dtype | None = torch.float32) -> tuple[MedBlip, LoadReport]:
    """Build MedBlip from a training-layout state dict; every key loaded or reported unused, none missing.

    dtype None: every tensor kept as stored (and as mapped: nothing is copied); compute in fp32 with
    model.stored.fp32_compute."""
    cfg = infer_config(sd, llm_cfg)
    fam = family(cfg.variant)
    report = LoadReport(cfg.variant)
    if not any(k.startswith(fam.llm_prefix) for k in sd):
        if llm_weights is None:
            raise CheckpointError("the checkpoint holds no LLM weights; give --llm a folder with them",
                                  code="missing_llm_weights")
        sd = {**sd, **{fam.llm_prefix + k: v for k, v in llm_weights.items()}}
        report.llm_weights_from = "llm folder"

    mapped, unknown = {}, []
    for key, t in sd.items():
        try:
            mk = to_module_key(key, fam)
        except KeyError:
            unknown.append(key)
            continue
        if mk is None:
            report.unused.append(key)
        else:
            mapped[mk] = t
    if unknown:
        raise CheckpointError(f"{len(unknown)} unexpected keys (not MedBLIP {fam.name}): "
                              + ", ".join(sorted(unknown)[:8]), code="unexpected_keys")

    with torch.device("meta"):
        model = MedBlip(cfg)
    expected = model.state_dict().keys()
    aliases = {"llm." + a: "llm." + s for a, s in fam.aliases(cfg.llm).items()}
    missing = [k for k in expected if k not in mapped and aliases.get(k) not in mapped]
    if missing:  # named as the checkpoint names them, not by our module's (HF) names
        raise CheckpointError(f"{len(missing)} missing keys: "
                              + ", ".join(to_training_key(k, fam) for k in missing[:8]), code="missing_keys")
    for alias, src in aliases.items():
        mapped.setdefault(alias, mapped[src])

    bad = [f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}" for k, v in model.state_dict().items()
           if tuple(mapped[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError("shape mismatch: " + "; ".join(bad[:4]), code="shape_mismatch")

    model.load_state_dict({k: mapped[k] if dtype is None else mapped[k].to(dtype) for k in expected}, assign=True,
                          strict=True)
    retie(model)
    report.loaded = len(mapped)
    report.dtypes = {k: v.dtype for k, v in mapped.items()}
    report.unused.sort()
    return model.eval(), report


def retie(model: MedBlip) -> None:
    """`assign=True` replaced tied parameters one by one; make aliases share one tensor again."""
    for alias, src in model.family.aliases(model.cfg.llm).items():
        owner, _, name = alias.rpartition(".")
        src_owner, _, src_name = src.rpartition(".")
        setattr(model.llm.get_submodule(owner), name, getattr(model.llm.get_submodule(src_owner), src_name))


def load_checkpoint(path: str | Path, llm_dir: str | Path, dtype: torch.dtype | None = torch.float32):
    """--checkpoint PATH --llm DIR -> (MedBlip, LoadReport); dtype None keeps the stored dtypes, memory-mapped."""
    sd = read_state_dict(path)
    llm_cfg = read_llm_config(llm_dir)
    fam = detect_family(sd)
    weights = None if any(k.startswith(fam.llm_prefix) for k in sd) else read_llm_weights(llm_dir)
    return load_medblip(sd, llm_cfg, weights, dtype)

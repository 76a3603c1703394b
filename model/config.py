"""Model sizes: one dataclass per part, one dict of named presets (tests, CPU benchmarks, the paper)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Head counts cannot be read off a checkpoint's shapes; these head widths can
# (EVA ViT-g: 1408 = 16 x 88; BERT-base Q-Former: 768 = 12 x 64). Every preset
# keeps them, so `heads = width // head_dim` holds for real and random models.
VIT_HEAD_DIM = 88
QFORMER_HEAD_DIM = 64


@dataclass(frozen=True)
class VisionConfig:
    """3D-stem EVA ViT: Conv3d patchify, pre-norm blocks, no final norm (ln_vision is separate)."""

    width: int = 1408
    depth: int = 39
    mlp_dim: int = 6144
    patch: int = 32
    image_size: int = 224
    head_dim: int = VIT_HEAD_DIM

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 3


@dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2 Q-Former, queries-only inference path."""

    hidden: int = 768
    layers: int = 12
    intermediate: int = 3072
    num_query: int = 32
    cross_attention_frequency: int = 2
    head_dim: int = QFORMER_HEAD_DIM

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim


@dataclass(frozen=True)
class MedBlipConfig:
    """A whole MedBLIP: vision + Q-Former + the LLM family (`t5` or `gpt2`) and its HF config."""

    variant: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: dict = field(default_factory=dict)  # Hugging Face config.json fields

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MedBlipConfig":
        return cls(
            variant=d["variant"],
            vision=VisionConfig(**d["vision"]),
            qformer=QFormerConfig(**d["qformer"]),
            llm=dict(d["llm"]),
        )


def _t5(d_model, d_ff, layers, heads, vocab=32128, d_kv=64):
    # FLAN-T5 layout: gated GELU FFN, untied LM head; MedBLIP's exact-GELU
    # override is applied when the model is built, not stored here.
    return {
        "model_type": "t5", "d_model": d_model, "d_ff": d_ff, "d_kv": d_kv,
        "num_layers": layers, "num_decoder_layers": layers, "num_heads": heads,
        "vocab_size": vocab, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.0, "decoder_start_token_id": 0, "pad_token_id": 0,
        "eos_token_id": 1,
    }


def _gpt2(n_embd, layers, heads, vocab=28896, n_positions=1024):
    return {
        "model_type": "gpt2", "n_embd": n_embd, "n_layer": layers, "n_head": heads,
        "vocab_size": vocab, "n_positions": n_positions, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": True,
        # BioMedLM's config divides each layer's attention scores by (layer index + 1) as well
        "scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": True, "reorder_and_upcast_attn": False,
    }


_TINY_V = VisionConfig(width=176, depth=2, mlp_dim=352)
_TINY_Q = QFormerConfig(hidden=128, layers=2, intermediate=256, num_query=8)
_SMALL_V = VisionConfig(width=352, depth=4, mlp_dim=1408)
_SMALL_Q = QFormerConfig(hidden=384, layers=4, intermediate=1536, num_query=32)

# vocab_size None: the size of the tokenizer trained offline for the preset.
PRESETS: dict[str, MedBlipConfig] = {
    "tiny": MedBlipConfig("t5", _TINY_V, _TINY_Q, _t5(64, 128, 2, 2, vocab=None, d_kv=32)),
    "tiny-biomedlm": MedBlipConfig("gpt2", _TINY_V, _TINY_Q, _gpt2(64, 2, 2, vocab=None, n_positions=256)),
    "small": MedBlipConfig("t5", _SMALL_V, _SMALL_Q, _t5(768, 2048, 8, 12)),
    "small-biomedlm": MedBlipConfig("gpt2", _SMALL_V, _SMALL_Q, _gpt2(768, 8, 12)),
    "paper-t5": MedBlipConfig("t5", VisionConfig(), QFormerConfig(), _t5(2048, 5120, 24, 32)),
    "paper-biomedlm": MedBlipConfig("gpt2", VisionConfig(), QFormerConfig(), _gpt2(2560, 32, 20)),
}


def preset(name: str) -> MedBlipConfig:
    try:
        return PRESETS[name]
    except KeyError:
        from ..errors import MedblipError

        raise MedblipError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}", code="bad_preset")

"""LLM families: what differs between FLAN-T5 and GPT-2/BioMedLM, each in one small class.

A family knows its checkpoint prefixes, how to build the Hugging Face model
from a config.json dict, how the training code tokenizes prompts and answers,
and which of its checkpoint keys are not weights. Nothing else branches on the
variant: `family(name)` is the one place a family is chosen.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .tokenizer import TextTokenizer, read_bpe_vocab, read_tokenizer_json


# Attention as the published code computes it (transformers 4.33's eager matmul-softmax-matmul): with it the
# fp32 first-step logits equal the published code's bit for bit (tests/test_official_parity.py); the fused
# SDPA kernel differs in the last bits, enough to move a 16-token answer's log-likelihood by 5e-4.
EAGER = "eager"


class LlmFamily:
    """Interface; see T5Family and Gpt2Family."""

    name: str
    llm_prefix: str  # checkpoint prefix of the LLM weights
    proj_prefix: str  # checkpoint prefix of the Q-Former -> LLM projection
    storage_dtype: torch.dtype  # how the training code stores the frozen LLM
    max_new_tokens: int  # the published code's generation limit
    is_encoder_decoder: bool

    def build(self, cfg: dict) -> nn.Module:
        raise NotImplementedError

    def hidden_size(self, cfg: dict) -> int:
        raise NotImplementedError

    def aliases(self, cfg: dict) -> dict[str, str]:
        """Module keys that share storage with another key (tied weights): alias -> source."""
        return {}

    def is_buffer_key(self, key: str) -> bool:
        """Checkpoint keys under the LLM prefix that are not weights (legacy buffers)."""
        return False

    def read_tokenizer(self, folder) -> TextTokenizer:
        """The LLM folder's tokenizer as the published code ran it (model/tokenizer.py)."""
        raise NotImplementedError

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        """Prompt ids as the published `generate` tokenizes them."""
        return tokenizer.encode(text)

    def answer_ids(self, tokenizer, text: str) -> list[int]:
        """Answer ids as the published training forward tokenizes its targets."""
        return tokenizer.encode(text)

    def embed_tokens(self, model: nn.Module) -> nn.Embedding:
        return model.get_input_embeddings()

    def to_half(self, model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
        """The LLM in fp16/bf16, with the family's overflow-prone weights kept fp32."""
        return model.to(dtype)


class T5Family(LlmFamily):
    name = "t5"
    llm_prefix = "t5_model."
    proj_prefix = "t5_proj."
    storage_dtype = torch.bfloat16
    generate_under_autocast = False  # on a GPU the published code runs generate on the bf16 weights, no autocast
    max_new_tokens = 60
    is_encoder_decoder = True

    def build(self, cfg: dict) -> nn.Module:
        from transformers import T5Config, T5ForConditionalGeneration

        conf = T5Config(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
        conf.dense_act_fn = "gelu"  # MedBLIP's override: exact GELU, not FLAN-T5's gelu_new
        conf._attn_implementation = EAGER
        tied = cfg.get("tie_word_embeddings", True)
        # transformers 5 always ties lm_head to the shared embedding when built from a
        # config; FLAN-T5's head is separate, and only a tied head scales the decoder output.
        conf.scale_decoder_outputs = bool(tied)
        model = T5ForConditionalGeneration(conf)
        if not tied:
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        return model.eval()

    def hidden_size(self, cfg: dict) -> int:
        return cfg["d_model"]

    def aliases(self, cfg: dict) -> dict[str, str]:
        out = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
        if cfg.get("tie_word_embeddings", True):
            out["lm_head.weight"] = "shared.weight"
        return out

    def to_half(self, model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
        for name, p in model.named_parameters():
            if ".DenseReluDense.wo." not in name:  # FLAN-T5 overflows fp16 in the FFN output projection
                p.data = p.data.to(dtype)
        return model

    def read_tokenizer(self, folder) -> TextTokenizer:
        # T5TokenizerFast: appends </s> to prompts and answers alike
        return read_tokenizer_json(folder, ("</s>", "<unk>", "<pad>"))


class Gpt2Family(LlmFamily):
    name = "gpt2"
    llm_prefix = "lm_model."
    proj_prefix = "proj."
    storage_dtype = torch.float16
    generate_under_autocast = True  # on a GPU: generate and scoring both under fp16 autocast
    max_new_tokens = 19  # transformers' default max_length=20, the published code sets none
    is_encoder_decoder = False
    max_prompt_tokens = 100  # the BioMedLM code's max_txt_len

    _BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")

    def build(self, cfg: dict) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        conf = GPT2Config(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
        conf._attn_implementation = EAGER
        return GPT2LMHeadModel(conf).eval()

    def hidden_size(self, cfg: dict) -> int:
        return cfg["n_embd"]

    def aliases(self, cfg: dict) -> dict[str, str]:
        return {"lm_head.weight": "transformer.wte.weight"} if cfg.get("tie_word_embeddings", True) else {}

    def is_buffer_key(self, key: str) -> bool:
        return bool(self._BUFFER.match(key))

    def read_tokenizer(self, folder) -> TextTokenizer:
        return read_bpe_vocab(folder)  # the slow GPT2Tokenizer: appends nothing

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        return tokenizer.encode(text)[: self.max_prompt_tokens]  # truncation=True, max_length=100 (right side)


FAMILIES: dict[str, LlmFamily] = {f.name: f for f in (T5Family(), Gpt2Family())}


def family(name: str) -> LlmFamily:
    return FAMILIES[name]

"""The plain PyTorch pipeline as the training code runs it: eager, the ViT in its training forms, `generate`, one
full pass per answer; fp32, or (`gpu_precisions`) the dtypes and autocast the published code uses on a GPU.

This is the baseline every benchmark row is a ratio to, and (in fp32) the oracle for
parity tests. It is deliberately not optimised.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from .dtypes import dtype_name
from .prompts import ANSWERS, DIAGNOSIS_QUESTION, LABELS, build_prompt
from .scoring import diagnosis, sequence_logprob
from .vit3d import training_forms


# what the published code runs on a GPU (modeling_medblip_t5.py, eva_vit.convert_weights_to_fp16)
def gpu_precision_names(family) -> dict:
    llm = dtype_name(family.storage_dtype)
    return {"vision": "fp16 Linear weights under fp16 autocast; Conv3d, LayerNorms, Q-Former, projection fp32",
            "llm": f"{llm} weights, {llm} autocast for scoring" + (" and generate" if family.generate_under_autocast
                                                                  else "; generate without autocast")}


def to_gpu_precisions(model):
    """Cast a fp32 MedBlip in place to the dtypes the published code trains and evaluates in on a GPU: the ViT's
    Linear layers to fp16 (its fp16 conversion skips the Conv3d patch embedding, the LayerNorms, the cls token
    and the position embedding), every LLM parameter to the family's published dtype (T5 bf16, BioMedLM fp16);
    ln_vision, the Q-Former and the projection stay fp32."""
    for m in model.visual_encoder.modules():
        if isinstance(m, nn.Linear):
            m.half()
    for p in model.llm.parameters():
        p.data = p.data.to(model.family.storage_dtype)
    return model


class ReferencePipeline:
    """MedBlip + tokenizer -> diagnose(volume) the way the published code would.

    gpu_precisions: as it runs on a GPU (`to_gpu_precisions`: the ViT under fp16 autocast; the LLM's scoring
    passes under autocast in its published dtype, `generate` too for BioMedLM); otherwise all fp32, no autocast.
    """

    def __init__(self, model, tokenizer, gpu_precisions: bool = False):
        self.model, self.tokenizer, self.family = model, tokenizer, model.family
        self.gpu_precisions = gpu_precisions
        if gpu_precisions:
            to_gpu_precisions(model)
        self.precision = gpu_precision_names(model.family) if gpu_precisions else {"vision": "fp32", "llm": "fp32"}

    def _autocast(self, dtype: torch.dtype):
        if not self.gpu_precisions:
            return nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=dtype)

    def _embeds(self, visual: torch.Tensor, patient_text: str, question: str) -> torch.Tensor:
        ids = torch.tensor([self.family.prompt_ids(self.tokenizer, build_prompt(patient_text, question))],
                           device=visual.device)
        return torch.cat([self.model.embed_prompt(ids), visual], dim=1)  # [1, T+Q, d]: prompt first

    @torch.no_grad()
    def generate(self, visual: torch.Tensor, patient_text: str = "", question: str = DIAGNOSIS_QUESTION):
        """-> (answer token ids without EOS, first-step logits [V]) from transformers' greedy `generate`."""
        emb = self._embeds(visual, patient_text, question)
        mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
        under = self._autocast(self.family.storage_dtype) if self.family.generate_under_autocast else nullcontext()
        with under:
            out = self.model.llm.generate(inputs_embeds=emb, attention_mask=mask, do_sample=False, num_beams=1,
                                          max_new_tokens=self.family.max_new_tokens, output_logits=True,
                                          return_dict_in_generate=True)
        ids = out.sequences[0].tolist()
        if self.family.is_encoder_decoder:
            ids = ids[1:]  # drop the decoder start token
        eos = self.model.llm.config.eos_token_id
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return ids, out.logits[0][0].float()

    def answer_logits(self, visual: torch.Tensor, patient_text: str, answer: str) -> torch.Tensor:
        """Logits predicting each token of `answer` given scan and prompt [L, V]: one full forward pass for
        this answer alone, as the training forward computes it (differentiable in `visual` outside no_grad)."""
        emb = self._embeds(visual, patient_text, DIAGNOSIS_QUESTION)
        target = torch.tensor([self.family.answer_ids(self.tokenizer, answer)], device=visual.device)
        with self._autocast(self.family.storage_dtype):
            if self.family.is_encoder_decoder:
                return self.model.llm(inputs_embeds=emb, labels=target).logits[0].float()  # [L, V]
            full = torch.cat([emb, self.model.embed_prompt(target)], dim=1)
            return self.model.llm(inputs_embeds=full).logits[0, emb.shape[1] - 1: -1].float()  # predicts each token

    @torch.no_grad()
    def answer_loglik(self, visual: torch.Tensor, patient_text: str, answer: str) -> float:
        """Sum log p(answer | scan, prompt)."""
        ids = self.family.answer_ids(self.tokenizer, answer)
        return float(sequence_logprob(self.answer_logits(visual, patient_text, answer), ids))

    @torch.no_grad()
    def visual_tokens(self, volume: torch.Tensor) -> torch.Tensor:
        """volume [B,1,S,S,S] -> visual tokens, the ViT in the training code's forms (Conv3d, eager attention)."""
        with training_forms(self.model.visual_encoder):
            with self._autocast(torch.float16):
                emb = self.model.image_embeds(volume)  # fp32 out: ln_vision runs in fp32 under autocast too
            return self.model.proj(self.model.qformer(emb.float()))  # outside autocast, fp32

    @torch.no_grad()
    def diagnose(self, volume: torch.Tensor, patient_text: str = "") -> dict:
        """volume [1,1,S,S,S] -> generated answer + per-answer log-likelihoods and probabilities."""
        visual = self.visual_tokens(volume)
        ids, _ = self.generate(visual, patient_text)
        ll = [self.answer_loglik(visual, patient_text, ANSWERS[k]) for k in LABELS]
        return {**diagnosis(ll), "generated": self.tokenizer.decode(ids).strip()}

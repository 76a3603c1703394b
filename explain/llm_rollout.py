"""The LLM's relevance over its input positions [prompt ; visual tokens] for the class margin, one class per
family: the three answers scored in one batched, differentiable pass with every attention layer's
probabilities kept, then the attention rules (rules.py) rolled from the answer tokens back to the inputs."""

from __future__ import annotations

import torch

from ..model.scoring import decoder_inputs, pad_candidates
from .recorder import outputs_of
from .rules import cross_step, self_step, weighted


class LlmRollout:
    """forward() runs the scoring pass and keeps the attention; relevance() turns it into [n_inputs] after backward."""

    def forward(self, llm, prompt_ids: list[int], visual: torch.Tensor, candidates: list[list[int]]) -> torch.Tensor:
        """visual [1, Q, d] (in the autograd graph) -> logits [3, L, V] predicting each candidate's tokens."""
        raise NotImplementedError

    def relevance(self, candidates: list[list[int]], n_inputs: int) -> torch.Tensor:
        raise NotImplementedError


def _ids(ids, device) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long, device=device)


class T5Rollout(LlmRollout):
    """Encoder once over [prompt ; visual]; the decoder scores the three answers as one batch against it. The
    encoder's self-attention gives R^{ee}; per answer, the decoder's self- and cross-attention give R^{te}, whose
    rows over the answer's tokens are summed."""

    def forward(self, llm, prompt_ids, visual, candidates):
        emb = torch.cat([llm.shared(_ids([prompt_ids], visual.device)), visual.to(llm.shared.weight.dtype)], dim=1)
        with outputs_of([b.layer[0].SelfAttention for b in llm.encoder.block], 2) as self.enc:
            enc = llm.encoder(inputs_embeds=emb).last_hidden_state
        labels, _ = pad_candidates(candidates, pad=0)
        dec_in = _ids(decoder_inputs(labels, llm.config.decoder_start_token_id), visual.device)
        with outputs_of([b.layer[0].SelfAttention for b in llm.decoder.block], 2) as self.dec, \
                outputs_of([b.layer[1].EncDecAttention for b in llm.decoder.block], 2) as self.cross:
            return llm(encoder_outputs=(enc.expand(len(candidates), -1, -1),), decoder_input_ids=dec_in).logits

    def relevance(self, candidates, n_inputs):
        r_ee = torch.eye(n_inputs, device=self.enc[0].device)
        for a, g in self.enc.pairs():
            r_ee = self_step(r_ee, weighted(a, g))
        total = torch.zeros(n_inputs, device=r_ee.device)
        for i, cand in enumerate(candidates):
            length = self.dec[0].shape[-1]
            r_tt = torch.eye(length, device=r_ee.device)
            r_te = torch.zeros(length, n_inputs, device=r_ee.device)
            for (sa, sg), (ca, cg) in zip(self.dec.pairs(i), self.cross.pairs(i)):
                a_bar = weighted(sa, sg)
                r_te, r_tt = self_step(r_te, a_bar), self_step(r_tt, a_bar)
                r_te = cross_step(r_te, r_tt, weighted(ca, cg), r_ee)
            total += r_te[: len(cand)].sum(dim=0)
        return total


class Gpt2Rollout(LlmRollout):
    """[prompt ; visual ; answer] per answer, one causal pass as a batch; the self-attention rule over all positions,
    the rows that predict the answer's tokens summed over the input columns."""

    def forward(self, llm, prompt_ids, visual, candidates):
        wte = llm.transformer.wte
        emb = torch.cat([wte(_ids([prompt_ids], visual.device)), visual.to(wte.weight.dtype)], dim=1)  # [1, n, d]
        ids, _ = pad_candidates(candidates, pad=0)
        n, length = emb.shape[1], ids.shape[1]
        full = torch.cat([emb.expand(len(candidates), -1, -1), wte(_ids(ids, visual.device))], dim=1)
        pos = torch.arange(n + length, device=visual.device)[None].expand(len(candidates), -1)
        self.n = n
        with outputs_of([b.attn for b in llm.transformer.h], 1) as self.attn:
            logits = llm(inputs_embeds=full, position_ids=pos).logits
        return logits[:, n - 1: n - 1 + length]  # token j is predicted by the position before it

    def relevance(self, candidates, n_inputs):
        total = None
        for i, cand in enumerate(candidates):
            size = self.attn[0].shape[-1]
            rel = torch.eye(size, device=self.attn[0].device)
            for a, g in self.attn.pairs(i):
                rel = self_step(rel, weighted(a, g))
            part = rel[self.n - 1: self.n - 1 + len(cand), :n_inputs].sum(dim=0)
            total = part if total is None else total + part
        return total


ROLLOUTS = {"t5": T5Rollout, "gpt2": Gpt2Rollout}

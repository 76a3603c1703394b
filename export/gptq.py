"""GPTQ-style 4-bit weights: each matmul's blocks quantized one input channel at a time, the rounding error of
each channel spread over the channels not yet quantized so that the matmul's output on calibration activations,
not its weights, stays closest to fp32 (Frantar et al., "GPTQ", 2022; here on the fp32 model's activations,
each matmul independently, the grid and layout MatMulNBits reads: symmetric, one scale per block, set from the
block's extreme when the block is reached).

Calibration: the fp32 LLM's prefill and answer scoring of the evaluation prompts on visual tokens of other
volumes than the evaluation set's (eval_volumes with CALIBRATION_SEED), so the tolerance is then measured on
inputs the fit did not see. Per linear layer, sum x x^T of its inputs over every calibration token (forward
pre-hooks), keyed like smoothing's maxima (smooth.fingerprint), so q, k and v packed into one matmul share the
first one's. Tried where a 4-bit graph misses its tolerance fully quantized (tolerant.py), and only where those
K x K sums fit MAX_HESSIAN_BYTES.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.evalset import eval_volumes
from ..model.stored import fp32_compute, release_module
from .quantize import BlockQuant, block_extremes, blocks_of, pack_ints, signed_range
from .smooth import _column_and_width, fingerprint, fold_layer_inputs

CALIBRATION_SEED = 4321  # the evaluation volumes use eval_volumes' default seed
CALIBRATION_VOLUMES = 1  # calibration volumes per evaluation volume
MAX_HESSIAN_BYTES = 1 << 30
DAMP = 0.1  # added to the diagonal, times its mean: keeps the inverse finite for channels rarely active


def hessian_bytes(model) -> int:
    """Bytes of the float64 K x K sums of every linear layer of model.llm."""
    return sum(8 * c[1] ** 2 for c in map(_column_and_width, model.llm.modules()) if c is not None)


def calibration_visual(model, n: int) -> torch.Tensor:
    """[n,Q,d] fp32 visual tokens of n volumes made like the evaluation set's, from another seed."""
    with torch.inference_mode(), fp32_compute(model):
        volumes = eval_volumes(n, model.cfg.vision.image_size, seed=CALIBRATION_SEED)
        visual = torch.cat([model.visual_tokens(volumes[i:i + 1]) for i in range(n)]).float()
    release_module(model)
    return visual


def hessians(model, run) -> dict[bytes, np.ndarray]:
    """Per linear layer of model.llm, sum x x^T [K, K] float64 of its inputs while `run()` runs it, keyed by the
    layer's fingerprint."""
    def fold(prev, x):
        x = x.double()
        return x.T @ x if prev is None else prev + x.T @ x
    return {k: v.numpy() for k, v in fold_layer_inputs(model, run, fold).items()}


def gptq_ints(weight: np.ndarray, h: np.ndarray, block: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [K, N], h [K, K] (sum x x^T) -> (signed integers [N, K/block, block], scales [N, K/block]): channel
    by channel, each channel's rounding error, scaled by the inverse Hessian's Cholesky factor, subtracted from the
    channels after it."""
    k = weight.shape[0]
    w = blocks_of(weight, block).reshape(weight.shape[1], -1).astype(np.float64)  # [N, K padded]
    kp = w.shape[1]
    hp = np.eye(kp) * max(float(np.mean(np.diag(h))), 1e-12)  # padding channels: independent, never active
    hp[:k, :k] = h
    hp[np.diag_indices(kp)] += DAMP * np.mean(np.diag(hp))
    u = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper: row i holds channel i's effect on the later channels
    lo, hi = signed_range(bits)
    q = np.zeros_like(w)
    scales = np.zeros((w.shape[0], kp // block))
    for i in range(kp):
        if i % block == 0:  # the block's scale from its weights as updated so far (MatMulNBits: extreme on -2^(b-1))
            extreme = block_extremes(w[:, i:i + block])
            s = scales[:, i // block] = np.where(extreme == 0, 1.0, extreme / lo)
        q[:, i] = np.clip(np.rint(w[:, i] / s), lo, hi)
        err = (w[:, i] - q[:, i] * s) / u[i, i]
        w[:, i + 1:] -= np.outer(err, u[i, i + 1:])
    return q.reshape(w.shape[0], -1, block), scales


@dataclass(frozen=True, eq=False)
class GptqBlockQuant(BlockQuant):
    """BlockQuant whose integers come from gptq_ints for the matmuls with calibration sums (plain otherwise)."""

    sums: dict = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        return super().describe() + ", GPTQ on calibration activations"

    def pack(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = self.sums.get(fingerprint(weight[:, 0]))
        if h is None or h.shape[0] != weight.shape[0]:
            return super().pack(weight)
        q, scales = gptq_ints(weight, h, self.block, self.bits)
        return pack_ints(q, self.bits), scales.astype(np.float32)

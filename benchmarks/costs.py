"""FLOPs and bytes per stage, counted from the manifest's model sizes, and each stage's floor on this machine.

A floor is max(compute floor, memory floor): FLOPs over the measured matmul ceiling at
the stage's precision, and bytes that must cross the memory bus (weights once, at their
stored precision, plus the inputs and KV cache) over the measured bandwidth. Activations
are assumed to stay in cache, so a floor is a lower bound, never an estimate of the time.
"""

from __future__ import annotations

from ..export.quantize import QUANTIZERS
from ..model.config import MedBlipConfig
from .limits import compute_peak

BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}


def weight_bytes(precision: str, stage: str) -> float:
    """Bytes per weight as the stage reads it: int8/int4 as the export stores them for that kind of graph
    (the decode step's gemv format, or the gemm format of the other LLM graphs; see export/quantize.py)."""
    if precision in QUANTIZERS:
        return QUANTIZERS[precision].for_graph(stage == "decode_step").bytes_per_weight
    return BYTES_PER_WEIGHT.get(precision, 4.0)
ACT_BYTES = 4  # activations, KV cache and logits stay fp32 in every backend here


def vision_cost(cfg: MedBlipConfig, d_llm: int, batch: int = 1) -> dict:
    """Conv3d stem + ViT blocks + ln_vision + Q-Former (queries path) + projection, for `batch` volumes."""
    v, q = cfg.vision, cfg.qformer
    n = v.num_patches + 1  # tokens incl. cls
    c, m = v.width, v.mlp_dim
    stem = 2 * v.num_patches * c * v.patch**3
    block = 2 * n * (4 * c * c + 2 * c * m) + 4 * n * n * c  # qkv+proj, mlp, QK^T and AV
    h, nq, inter = q.hidden, q.num_query, q.intermediate
    qf = 0
    for layer in range(q.layers):
        qf += 2 * nq * 4 * h * h + 4 * nq * nq * h + 2 * nq * 2 * h * inter  # self-attn, FFN (query path)
        if layer % q.cross_attention_frequency == 0:  # BLIP-2: cross-attention every `frequency` layers
            qf += 2 * nq * 2 * h * h + 2 * n * 2 * c * h + 4 * nq * n * h  # q/out proj, K/V of image tokens, attn
    proj = 2 * nq * h * d_llm
    cross_layers = len(range(0, q.layers, q.cross_attention_frequency))
    params = (c * v.patch**3 + n * c + v.depth * (4 * c * c + 2 * c * m) +  # stem, pos_embed, blocks
              q.layers * (4 * h * h + 2 * h * inter) + cross_layers * (2 * h * h + 2 * c * h) + nq * h +
              h * d_llm)
    return {"flops": batch * (stem + v.depth * block + qf + proj), "weights": params,
            "input_bytes": batch * v.image_size**3 * 4,  # the float32 volume is read once
            "parts_flops": {"stem": stem, "vit_blocks": v.depth * block, "qformer": qf, "proj": proj}}


class _T5:
    def __init__(self, llm: dict):
        self.d, self.v = llm["d_model"], llm["vocab_size"]
        self.inner = llm["num_heads"] * llm["d_kv"]
        self.l_enc, self.l_dec = llm["num_layers"], llm.get("num_decoder_layers") or llm["num_layers"]
        ffn = 3 if "gated" in llm.get("feed_forward_proj", "relu") else 2
        self.ffn = ffn * self.d * llm["d_ff"]
        self.enc_layer = 4 * self.d * self.inner + self.ffn
        self.cross_kv = 2 * self.d * self.inner  # computed once per scan from the encoder output
        self.dec_layer = 8 * self.d * self.inner + self.ffn
        self.head = self.d * self.v

    def params(self) -> int:
        """Matmul weights + shared embedding (LayerNorms and relative-position tables left out)."""
        return self.l_enc * self.enc_layer + self.l_dec * self.dec_layer + self.head + self.d * self.v

    def prefill(self, src: int) -> tuple[float, float, float]:
        """(flops, weights read, kv bytes): encoder over [prompt; visual], cross K/V, first decoder step."""
        dec_step = self.l_dec * (self.dec_layer - self.cross_kv) + self.head
        flops = (2 * self.l_enc * self.enc_layer * src + 4 * self.l_enc * src * src * self.inner +
                 2 * self.l_dec * self.cross_kv * src + 2 * dec_step + 4 * self.l_dec * src * self.inner)
        weights = self.l_enc * self.enc_layer + self.l_dec * self.dec_layer + self.head
        return flops, weights, 2 * self.l_dec * src * self.inner * ACT_BYTES

    def step(self, src: int, past: int) -> tuple[float, float, float]:
        """One decoder token: self-attn over `past`, cross-attn over the cached encoder K/V."""
        w = self.l_dec * (self.dec_layer - self.cross_kv) + self.head
        ctx = past + src
        return 2 * w + 4 * self.l_dec * ctx * self.inner, w, 2 * self.l_dec * ctx * self.inner * ACT_BYTES

    def score(self, src: int, n: int, length: int) -> tuple[float, float, float]:
        """n candidates of `length` tokens through the decoder against the cached cross K/V."""
        w = self.l_dec * (self.dec_layer - self.cross_kv) + self.head
        toks = n * length
        return (2 * w * toks + 4 * self.l_dec * toks * (src + length) * self.inner, w,
                2 * self.l_dec * n * src * self.inner * ACT_BYTES)


class _Gpt2:
    def __init__(self, llm: dict):
        self.d, self.v, self.layers = llm["n_embd"], llm["vocab_size"], llm["n_layer"]
        self.positions = llm.get("n_positions", 1024)
        self.layer = 12 * self.d * self.d  # qkv 3d^2 + proj d^2 + MLP 8d^2
        self.head = self.d * self.v  # tied to the token embedding

    def params(self) -> int:
        """Matmul weights + token and position embeddings (biases and LayerNorms left out)."""
        return self.layers * self.layer + self.head + self.positions * self.d

    def prefill(self, src: int) -> tuple[float, float, float]:
        w = self.layers * self.layer
        flops = 2 * w * src + 4 * self.layers * src * src * self.d + 2 * self.head  # head on the last token only
        return flops, w + self.head, 2 * self.layers * src * self.d * ACT_BYTES

    def step(self, src: int, past: int) -> tuple[float, float, float]:
        w = self.layers * self.layer + self.head
        ctx = src + past
        return 2 * w + 4 * self.layers * ctx * self.d, w, 2 * self.layers * ctx * self.d * ACT_BYTES

    def score(self, src: int, n: int, length: int) -> tuple[float, float, float]:
        w = self.layers * self.layer + self.head
        toks = n * length
        return (2 * w * toks + 4 * self.layers * toks * (src + length) * self.d, w,
                2 * self.layers * n * src * self.d * ACT_BYTES)


LLM_COSTS = {"t5": _T5, "gpt2": _Gpt2}


def stage_costs(cfg: MedBlipConfig, d_llm: int, prompt_len: int, candidates: list[int], decode_past: int) -> dict:
    """{stage: {flops, weights, extra_bytes, precision_role}} for vision, prefill, decode_step, score.

    prompt_len: prompt tokens (visual tokens are added here); candidates: token count of each
    answer; decode_past: mean tokens already generated during the timed decode steps.
    """
    llm = LLM_COSTS[cfg.variant](cfg.llm)
    src = prompt_len + cfg.qformer.num_query
    vis = vision_cost(cfg, d_llm)
    out = {"vision": {"flops": vis["flops"], "weights": vis["weights"], "extra_bytes": vis["input_bytes"],
                      "role": "vision", "parts_flops": vis["parts_flops"]}}
    for stage, (flops, weights, extra) in (("prefill", llm.prefill(src)), ("decode_step", llm.step(src, decode_past)),
                                           ("score", llm.score(src, len(candidates), max(candidates)))):
        out[stage] = {"flops": flops, "weights": weights, "extra_bytes": extra, "role": "llm"}
    out["llm_params_counted"] = llm.params()
    out["tokens"] = {"prompt": prompt_len, "visual": cfg.qformer.num_query, "encoder_or_prefix": src,
                     "candidates": candidates, "decode_past_mean": decode_past}
    return out


def stage_floor(cost: dict, precision: str, limits: dict, stage: str) -> dict:
    """One stage's floor in ms at `precision` (weights' bytes and compute rate), and which bound sets it."""
    peak, peak_key = compute_peak(limits, precision)
    bw = limits["memory"]["bytes_per_s"]
    nbytes = cost["weights"] * weight_bytes(precision, stage) + cost["extra_bytes"]
    compute_ms, memory_ms = 1e3 * cost["flops"] / peak, 1e3 * nbytes / bw
    return {"flops": float(cost["flops"]), "bytes": float(nbytes), "compute_floor_ms": round(compute_ms, 4),
            "memory_floor_ms": round(memory_ms, 4), "floor_ms": round(max(compute_ms, memory_ms), 4),
            "bound": "compute" if compute_ms >= memory_ms else "memory", "compute_ceiling": peak_key}


BEATEN = {"memory": "its weights came from a cache that the bandwidth probe's 512 MiB stream does not fit in",
          "compute": "it ran on a faster kernel than the matmul the ceiling was measured with"}


def row_floors(costs: dict, precision: dict, limits: dict, measured_ms: dict) -> dict:
    """{stage: floor dict + measured_ms + ratio} for vision, prefill, decode_step, score and classify.

    A floor is a lower bound only if its ceiling is the one the stage ran against. A stage measured below
    its floor shows that it was not (weights in a shared L3, a kernel other than the probe's): its ratio is
    then None and `beats_floor` says so, instead of a ratio below 1 that would read as "faster than the
    hardware allows"."""
    out = {}
    for stage in ("vision", "prefill", "decode_step", "score"):
        f = stage_floor(costs[stage], precision[costs[stage]["role"]], limits, stage)
        out[stage] = f
    cls = {k: out["prefill"][k] + out["score"][k] for k in ("flops", "bytes", "compute_floor_ms", "memory_floor_ms")}
    cls["floor_ms"] = out["prefill"]["floor_ms"] + out["score"]["floor_ms"]
    cls["bound"] = "sum of prefill and score"
    out["classify"] = cls
    for stage, f in out.items():
        m = measured_ms.get(stage)
        f["measured_ms"] = m
        f["ratio"] = round(m / f["floor_ms"], 2) if m and f["floor_ms"] > 0 else None
        if f["ratio"] is not None and m < f["floor_ms"]:
            bound = out["prefill"]["bound"] if stage == "classify" else f["bound"]
            f["ratio"] = None
            f["beats_floor"] = (f"measured {m:.3g} ms, below the {f['floor_ms']:.3g} ms floor: not the ceiling this "
                                f"stage ran on ({BEATEN[bound]})")
    return out

"""One benchmark row: time each stage of one scan, warm-up excluded, clock read only after the device is idle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.prompts import ANSWERS, LABELS
from ..preprocess import load_volume, to_model_input
from .timing import PeakMemory, Samples, now


# What each timing includes, written into results.json and report.md.
STAGE_NOTES = {
    "load": "NIfTI read from disk + gunzip + voxel decode/scaling (the training loader's numbers); the page cache "
            "is warm after the warm-up iteration",
    "preprocess": "min-max normalise, trilinear resize to S^3, centre zero-pad -> float32 [1,1,S,S,S] on the host "
                  "(reference on CUDA: plus the host->device copy of the volume, which the backends count in vision)",
    "vision": "3D ViT + ln_vision + Q-Former + projection for one volume; includes host->device copy of the volume "
              "and device->host copy of the visual tokens (torch on CUDA, ORT, TensorRT), and numpy<->torch "
              "conversion for ORT",
    "prefill": "LLM verb prefill: prompt + visual tokens through the encoder (T5) or the prefix (GPT-2), first "
               "decoder step, next-token logits on the host: time to first token minus load/preprocess/vision",
    "score": "LLM verb score: the three answers as one batch against the prefilled state, log-likelihoods on the "
             "host (reference: three full forward passes, one per answer)",
    "decode_step": "one greedy token with the KV cache, logits back on the host (reference: transformers generate "
                   "time / tokens generated, encoder pass included)",
    "classify": "Pipeline.classify: prefill + score + softmax (reference: generate + three full passes, as "
                "ReferencePipeline.diagnose)",
    "ttft": "time to first token from the file on disk: load + SHA-256 + preprocess + vision + prefill",
    "end_to_end": "file on disk -> diagnosis: prepare (load, SHA-256, preprocess) + vision + classify under one "
                  "clock (reference: load + preprocess + ReferencePipeline.diagnose's steps)",
    "throughput": "vision on a batch of B copies of the scan, then classify per scan; load/preprocess excluded "
                  "(medblip-infer does them ahead in reader threads)",
    "ratio_to_reference": "row end-to-end p50 / reference end-to-end p50, same run (below 1 = faster); "
                          "speedup_vs_reference is its inverse",
    "model_load_s": "one cold open: bundle verification (SHA-256 of every file), weights, ONNX Runtime sessions",
}


@dataclass
class Plan:
    """How long each row runs: timed iterations, untimed warm-up, decode steps per iteration, vision batches."""

    iters: int
    warmup: int
    decode_steps: int
    batches: list[int]
    device: str


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1e3


def _decode(llm, state, steps: int, device: str, s: Samples) -> None:
    """`steps` greedy tokens from a prefilled state; EOS does not stop it, so every row times the same work."""
    logits = state.next_logits
    for _ in range(steps):
        tok = int(logits.argmax())
        t0 = now(device)
        logits = llm.step(state, tok)
        s.add("decode_step", _ms(t0, now(device)))


def _pipeline_iteration(pipe, scan: Path, prompt: list[int], plan: Plan, s: Samples) -> torch.Tensor:
    """One scan: prepare, vision, classify under one clock (end to end); then prefill, score, decode alone."""
    dev, llm = plan.device, pipe.llm
    t0 = now(dev)
    prepared = pipe.prepare(scan)  # load (NIfTI read + gunzip + decode), SHA-256, preprocess
    t1 = now(dev)
    visual = pipe.visual_tokens(prepared.volume)  # [1, Q, d_llm], back on the host
    t2 = now(dev)
    pipe.classify(visual)
    t3 = now(dev)
    state = llm.prefill(prompt, visual)
    t4 = now(dev)
    llm.score(state, pipe.tasks.answer_ids)  # reads the prefilled state, does not extend it
    t5 = now(dev)
    _decode(llm, state, plan.decode_steps, dev, s)
    for name, ms in (("load", prepared.timings_ms["load"]), ("preprocess", prepared.timings_ms["preprocess"]),
                     ("vision", _ms(t1, t2)), ("classify", _ms(t2, t3)), ("end_to_end", _ms(t0, t3)),
                     ("prefill", _ms(t3, t4)), ("score", _ms(t4, t5)), ("ttft", _ms(t0, t2) + _ms(t3, t4))):
        s.add(name, ms)
    return prepared.volume


def _throughput(pipe, volume: torch.Tensor, batch: int, plan: Plan) -> dict:
    """Vision on `batch` copies of the scan at once, then classify per scan (the LLM is not batched across scans)."""
    dev, s = plan.device, Samples()
    vols = volume.expand(batch, -1, -1, -1, -1).contiguous()  # [B,1,S,S,S]
    for it in range(plan.warmup + plan.iters):
        t0 = now(dev)
        visual = pipe.visual_tokens(vols)
        t1 = now(dev)
        for i in range(batch):
            pipe.classify(visual[i:i + 1])
        t2 = now(dev)
        if it >= plan.warmup:
            s.add("vision_batch", _ms(t0, t1))
            s.add("batch", _ms(t0, t2))
    return _rates(batch, s.data["vision_batch"], s.data["batch"])


def _rates(batch: int, vision_ms: list[float], total_ms: list[float]) -> dict:
    vis, tot = float(np.median(vision_ms)), float(np.median(total_ms))
    return {"batch": batch, "scans_per_s": round(batch * 1e3 / tot, 4),
            "vision_scans_per_s": round(batch * 1e3 / vis, 4),
            "batch_ms_p50": round(tot, 3), "vision_batch_ms_p50": round(vis, 3), "n": len(total_ms)}


def measure_pipeline(open_pipe, scan: Path, plan: Plan) -> tuple[dict, object]:
    """open_pipe() -> Pipeline. -> ({model_load_s, stages_ms, throughput, memory, ...}, the open pipeline)."""
    with PeakMemory(plan.device) as mem, torch.inference_mode():
        t0 = now(plan.device)
        pipe = open_pipe()  # bundle verification (SHA-256 of every file), weights, ORT sessions
        load_s = _ms(t0, now(plan.device)) / 1e3
        prompt = pipe.tasks.prompt_ids("")
        s = Samples()
        for it in range(plan.warmup + plan.iters):
            target = s if it >= plan.warmup else Samples()
            volume = _pipeline_iteration(pipe, scan, prompt, plan, target)
        throughput = []
        for b in plan.batches:
            if b == 1:  # batch 1 is the end-to-end loop's vision + classify, already timed
                throughput.append(_rates(1, s.data["vision"], [v + c for v, c in zip(s.data["vision"],
                                                                                     s.data["classify"])]))
            else:
                throughput.append(_throughput(pipe, volume, b, plan))
        info = {"chosen": pipe.chosen, "precision": pipe.precision, "huge_pages": pipe.huge_pages.as_json()}
    return {"model_load_s": round(load_s, 3), "stages_ms": s.summary(), "throughput": throughput,
            "memory": mem.result, "decode_steps": plan.decode_steps, **info}, pipe


class _Reference:
    """ReferencePipeline.diagnose split into its steps so each can be clocked (same calls, same order)."""

    def __init__(self, ref, size: int, device: str):
        self.ref, self.size, self.device = ref, size, device

    @torch.no_grad()
    def iteration(self, scan: Path, s: Samples, check: bool = False) -> dict:
        dev, ref = self.device, self.ref
        t0 = now(dev)
        loaded = load_volume(scan)  # the training loader's read: NIfTI read + gunzip + decode
        t1 = now(dev)
        volume = to_model_input(loaded.array, self.size).to(dev)  # host->device copy included on CUDA
        t2 = now(dev)
        visual = ref.visual_tokens(volume)
        t3 = now(dev)
        ids, _ = ref.generate(visual, "")
        t4 = now(dev)
        ll = np.array([ref.answer_loglik(visual, "", ANSWERS[k]) for k in LABELS])
        t5 = now(dev)
        # generate stops at EOS (not in ids) or at its limit: count the token that ended it
        tokens = len(ids) + (1 if len(ids) < ref.family.max_new_tokens else 0)
        for name, ms in (("load", _ms(t0, t1)), ("preprocess", _ms(t1, t2)), ("vision", _ms(t2, t3)),
                         ("generate", _ms(t3, t4)), ("score", _ms(t4, t5)), ("classify", _ms(t3, t5)),
                         ("end_to_end", _ms(t0, t5)), ("decode_step", _ms(t3, t4) / tokens)):
            s.add(name, ms)
        s.add("generated_tokens", tokens)
        if check:  # the split must compute what diagnose() computes, or the baseline is not the reference
            want = ref.diagnose(volume)
            got = dict(zip(LABELS, map(float, ll)))
            return {"matches_diagnose": bool(all(abs(got[k] - want["log_likelihoods"][k]) < 1e-4 for k in LABELS))}
        return {}


def measure_reference(open_ref, scan: Path, size: int, plan: Plan) -> tuple[dict, object]:
    """open_ref() -> ReferencePipeline. The baseline row (fp32 eager, transformers generate, 3 full passes), ref."""
    with PeakMemory(plan.device) as mem:
        t0 = now(plan.device)
        ref = open_ref()
        load_s = _ms(t0, now(plan.device)) / 1e3
        runner, s, check = _Reference(ref, size, plan.device), Samples(), {}
        for it in range(plan.warmup + plan.iters):
            target = s if it >= plan.warmup else Samples()
            check = runner.iteration(scan, target, check=(it == 0)) or check
    stages = s.summary()
    tokens = stages.pop("generated_tokens")
    once = _rates(1, s.data["vision"], s.data["classify"]) | {"note": "no batching: one scan at a time"}
    return {"model_load_s": round(load_s, 3), "stages_ms": stages, "generated_tokens": tokens,
            "throughput": [once], "memory": mem.result, **check}, ref

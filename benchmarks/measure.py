"""One benchmark row: time each stage of one scan, warm-up excluded, on the shared clock (read only after the
device is idle)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.prompts import ANSWERS, LABELS
from ..model.scoring import greedy
from ..preprocess import load_volume, to_model_input
from .timing import Clock, PeakMemory, Samples

# What each timing includes, written into results.json and report.md.
STAGE_NOTES = {
    "load": "NIfTI read from disk + gunzip + voxel decode/scaling (the training loader's numbers); the page cache "
            "is warm after the warm-up iteration",
    "preprocess": "min-max normalise, trilinear resize to S^3, centre zero-pad -> float32 [1,1,S,S,S] on the host",
    "vision": "3D ViT + ln_vision + Q-Former + projection for one volume; includes host->device copy of the volume "
              "(the reference too) and device->host copy of the visual tokens (torch on CUDA, ORT, TensorRT), and "
              "numpy<->torch conversion for ORT",
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
    "decode_step_eager": "--compare-decode on CUDA: one greedy token with the eager LLM and transformers' dynamic "
                         "cache over the same weights, beside the CUDA-graph decoder the factory chose (decode_step)",
}
# --scan eval: the timed input is a volume already preprocessed, not a file
EVAL_INPUT_NOTE = ("the export's first evaluation volume, already preprocessed: load and preprocess are not timed; "
                   "end_to_end and ttft start at the volume on the host")


@dataclass
class Plan:
    """What each row runs on and for how long: timed iterations, untimed warm-up, decode steps per iteration,
    vision batches, the device, the scan (a NIfTI path timed from disk; None: the first evaluation volume,
    already preprocessed) and whether to time the eager decoder beside a CUDA-graph one."""

    iters: int
    warmup: int
    decode_steps: int
    batches: list[int]
    device: str
    scan: str | None = None
    compare_decode: bool = False


@dataclass
class Measured:
    """One row's figures, handed back from its process: what ran (backends, precision), timings per stage,
    throughput per batch, memory; the reference adds its generated tokens and the check of its split."""

    precision: dict
    backend: dict
    model_load_s: float
    stages_ms: dict
    throughput: list[dict]
    memory: dict
    decode_steps: int | None = None
    huge_pages: dict | None = None
    generated_tokens: dict | None = None
    matches_diagnose: bool | None = None

    def figures(self) -> dict:
        """The measured fields of the row in results.json (those not measured left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None and k not in ("precision", "backend")}


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1e3


def _decode(llm, state, steps: int, clock: Clock, s: Samples, stage: str = "decode_step") -> None:
    """`steps` greedy tokens from a prefilled state (model/scoring.greedy; EOS does not stop it, so every row
    times the same work), each step clocked alone."""

    def step(token: int):
        t0 = clock.now()
        logits = llm.step(state, token)
        s.add(stage, clock.ms_since(t0))
        return logits

    greedy(state.next_logits, step, steps + 1)


def _eager_decoder(pipe):
    """The eager LLM with transformers' dynamic cache over the weights of the CUDA-graph decoder the factory chose,
    or None when the row decodes otherwise (--compare-decode times the two side by side)."""
    from ..runtime.llm_static_t5 import CudaGraphT5Llm
    from ..runtime.llm_torch import TORCH_LLMS

    return TORCH_LLMS["t5"](pipe.llm.t5, pipe.llm.precision) if isinstance(pipe.llm, CudaGraphT5Llm) else None


def _pipeline_iteration(pipe, volume: torch.Tensor | None, prompt: list[int], plan: Plan, clock: Clock,
                        s: Samples) -> torch.Tensor:
    """One scan: prepare (plan.scan only), vision, classify under one clock (end to end); then prefill, score
    and decode alone. -> the volume."""
    llm = pipe.llm
    t0 = clock.now()
    if plan.scan is not None:
        prepared = pipe.prepare(plan.scan)  # load (NIfTI read + gunzip + decode), SHA-256, preprocess
        volume = prepared.volume
        for name in ("load", "preprocess"):
            s.add(name, prepared.timings_ms[name])
    t1 = clock.now()
    visual = pipe.visual_tokens(volume)  # [1, Q, d_llm], back on the host
    t2 = clock.now()
    pipe.classify(visual)
    t3 = clock.now()
    state = llm.prefill(prompt, visual)
    t4 = clock.now()
    llm.score(state, pipe.tasks.answer_ids)  # reads the prefilled state, does not extend it
    t5 = clock.now()
    _decode(llm, state, plan.decode_steps, clock, s)
    for name, ms in (("vision", _ms(t1, t2)), ("classify", _ms(t2, t3)), ("end_to_end", _ms(t0, t3)),
                     ("prefill", _ms(t3, t4)), ("score", _ms(t4, t5)), ("ttft", _ms(t0, t2) + _ms(t3, t4))):
        s.add(name, ms)
    return volume


def _eager_decode(pipe, volume: torch.Tensor, prompt: list[int], plan: Plan, clock: Clock, s: Samples) -> None:
    """--compare-decode: the same greedy steps with the eager dynamic-cache decoder (stage decode_step_eager)."""
    eager = _eager_decoder(pipe)
    if eager is None:
        return
    visual = pipe.visual_tokens(volume)
    for it in range(plan.warmup + plan.iters):
        _decode(eager, eager.prefill(prompt, visual), plan.decode_steps, clock,
                s if it >= plan.warmup else Samples(), "decode_step_eager")


def _throughput(pipe, volume: torch.Tensor, batch: int, plan: Plan, clock: Clock) -> dict:
    """Vision on `batch` copies of the scan at once, then classify per scan (the LLM is not batched across scans)."""
    s = Samples()
    vols = volume.expand(batch, -1, -1, -1, -1).contiguous()  # [B,1,S,S,S]
    for it in range(plan.warmup + plan.iters):
        t0 = clock.now()
        visual = pipe.visual_tokens(vols)
        t1 = clock.now()
        for i in range(batch):
            pipe.classify(visual[i:i + 1])
        t2 = clock.now()
        if it >= plan.warmup:
            s.add("vision_batch", _ms(t0, t1))
            s.add("batch", _ms(t0, t2))
    return _rates(batch, s.data["vision_batch"], s.data["batch"])


def _rates(batch: int, vision_ms: list[float], total_ms: list[float]) -> dict:
    vis, tot = float(np.median(vision_ms)), float(np.median(total_ms))
    return {"batch": batch, "scans_per_s": round(batch * 1e3 / tot, 4),
            "vision_scans_per_s": round(batch * 1e3 / vis, 4),
            "batch_ms_p50": round(tot, 3), "vision_batch_ms_p50": round(vis, 3), "n": len(total_ms)}


def measure_pipeline(open_pipe, plan: Plan, volume: torch.Tensor | None = None) -> tuple[Measured, object]:
    """open_pipe() -> Pipeline; `volume` [1,1,S,S,S]: the input when plan.scan is None. -> (the row's figures,
    the open pipeline)."""
    clock = Clock(plan.device)
    with PeakMemory(plan.device) as mem, torch.inference_mode():
        t0 = clock.now()
        pipe = open_pipe()  # bundle verification (SHA-256 of every file), weights, ORT sessions
        load_s = clock.ms_since(t0) / 1e3
        prompt = pipe.tasks.prompt_ids("")
        s = Samples()
        for it in range(plan.warmup + plan.iters):
            target = s if it >= plan.warmup else Samples()
            volume = _pipeline_iteration(pipe, volume, prompt, plan, clock, target)
        if plan.compare_decode:
            _eager_decode(pipe, volume, prompt, plan, clock, s)
        throughput = []
        for b in plan.batches:
            if b == 1:  # batch 1 is the end-to-end loop's vision + classify, already timed
                throughput.append(_rates(1, s.data["vision"], [v + c for v, c in zip(s.data["vision"],
                                                                                     s.data["classify"])]))
            else:
                throughput.append(_throughput(pipe, volume, b, plan, clock))
    return Measured(pipe.precision, pipe.chosen, round(load_s, 3), s.summary(), throughput, mem.result,
                    decode_steps=plan.decode_steps, huge_pages=pipe.huge_pages.as_json()), pipe


class _Reference:
    """ReferencePipeline.diagnose split into its steps so each can be clocked (same calls, same order)."""

    def __init__(self, ref, size: int, clock: Clock):
        self.ref, self.size, self.clock = ref, size, clock

    def _volume(self, scan: str | None, volume: torch.Tensor | None, s: Samples) -> torch.Tensor:
        """The training loader's read (NIfTI read + gunzip + decode) and preprocessing of `scan` on the host,
        timed; or the given volume, not timed. Not on the device yet."""
        if scan is None:
            return volume
        t0 = self.clock.now()
        loaded = load_volume(Path(scan))
        t1 = self.clock.now()
        volume = to_model_input(loaded.array, self.size)
        s.add("load", _ms(t0, t1))
        s.add("preprocess", self.clock.ms_since(t1))
        return volume

    @torch.no_grad()
    def iteration(self, scan: str | None, given: torch.Tensor | None, s: Samples, check: bool = False) -> dict:
        ref, clock = self.ref, self.clock
        t0 = clock.now()
        host = self._volume(scan, given, s)
        t2 = clock.now()
        volume = host.to(clock.device)  # the host->device copy counts in vision, as in the backends
        visual = ref.visual_tokens(volume)
        t3 = clock.now()
        ids, _ = ref.generate(visual, "")
        t4 = clock.now()
        ll = np.array([ref.answer_loglik(visual, "", ANSWERS[k]) for k in LABELS])
        t5 = clock.now()
        # generate stops at EOS (not in ids) or at its limit: count the token that ended it
        tokens = len(ids) + (1 if len(ids) < ref.family.max_new_tokens else 0)
        for name, ms in (("vision", _ms(t2, t3)), ("generate", _ms(t3, t4)), ("score", _ms(t4, t5)),
                         ("classify", _ms(t3, t5)), ("end_to_end", _ms(t0, t5)), ("decode_step", _ms(t3, t4) / tokens)):
            s.add(name, ms)
        s.add("generated_tokens", tokens)
        if check:  # the split must compute what diagnose() computes, or the baseline is not the reference
            want = ref.diagnose(volume)
            got = dict(zip(LABELS, map(float, ll)))
            return {"matches_diagnose": bool(all(abs(got[k] - want["log_likelihoods"][k]) < 1e-4 for k in LABELS))}
        return {}


REFERENCE_BACKEND = {"vision": "torch", "llm": "torch (transformers generate)"}


def measure_reference(open_ref, size: int, plan: Plan, volume: torch.Tensor | None = None) -> tuple[Measured, object]:
    """open_ref() -> ReferencePipeline. The baseline row (the published code's path: eager, transformers
    generate, 3 full passes), and the reference; `volume`: the input when plan.scan is None."""
    clock = Clock(plan.device)
    with PeakMemory(plan.device) as mem:
        t0 = clock.now()
        ref = open_ref()
        load_s = clock.ms_since(t0) / 1e3
        runner, s, check = _Reference(ref, size, clock), Samples(), {}
        for it in range(plan.warmup + plan.iters):
            target = s if it >= plan.warmup else Samples()
            check = runner.iteration(plan.scan, volume, target, check=(it == 0)) or check
    stages = s.summary()
    tokens = stages.pop("generated_tokens")
    once = _rates(1, s.data["vision"], s.data["classify"]) | {"note": "no batching: one scan at a time"}
    return Measured(ref.precision, REFERENCE_BACKEND, round(load_s, 3), stages, [once], mem.result,
                    generated_tokens=tokens, matches_diagnose=check.get("matches_diagnose")), ref

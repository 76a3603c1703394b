"""GPU benchmark of the paper-size T5 MedBLIP with the torch CUDA backend; installs nothing, runs in < 8 minutes.

    python -m medblip_edge.benchmarks.gpu_paper_t5 --out DIR      (on a GPU machine)

Rows: the fp32 eager reference as the training code runs it (transformers `generate`, one pass per answer;
TF32 off), then fp16 and bf16 with the runtime's batched scoring, and decode ms/token with the dynamic
Hugging Face cache vs the static cache replayed as a CUDA graph. Volumes are the export's evaluation volumes
already preprocessed (preprocessing is a CPU stage, measured by medblip-bench on CPUs).
Every timing synchronises the device before reading the clock; vision timings include the host->device copy.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..model.evalset import PATIENT_TEXTS, eval_volumes
from ..model.config import preset
from ..model.dtypes import DTYPES
from ..model.llm import family
from ..model.prompts import LABELS
from ..model.random_init import random_model, write_llm_folder
from ..runtime.llm_static_t5 import CudaGraphT5Llm
from ..runtime.llm_torch import TORCH_LLMS
from ..model.reference import ReferencePipeline
from ..model.tasks import Tasks



def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters: int, warmup: int = 1) -> tuple[list[float], object]:
    """Run fn warmup+iters times; returns (ms per timed call, last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return times, out


def p50(xs):
    return float(np.percentile(xs, 50))


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="paper-t5")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log = []

    def say(msg):
        line = f"[{time.perf_counter() - t_start:6.1f}s] {msg}"
        log.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_llm_folder(preset(args.preset), Path(tmp))
        tok = family(cfg.variant).read_tokenizer(tmp)
    with torch.device(dev):
        model = random_model(cfg).eval()
    say(f"built {args.preset} with random weights on {dev}")
    fam = model.family
    tasks = Tasks(fam, tok, fam.max_new_tokens)
    batches = [int(b) for b in args.batches.split(",")]
    n_eval = max(batches)
    vols = eval_volumes(n_eval)  # CPU, [n,1,224,224,224]
    cases = [(i % n_eval, PATIENT_TEXTS[i % len(PATIENT_TEXTS)]) for i in range(4)]

    rows, quality = [], {}
    # -- the reference: fp32 eager, generate + one pass per answer -------------------------------------
    ref = ReferencePipeline(model, tok)
    t_ref, r = timed(lambda: ref.diagnose(vols[:1].to(dev), cases[0][1]), args.iters)
    ref_vis = model.visual_tokens(vols[:4].to(dev))
    ref_rows = [tasks.diagnose(TORCH_LLMS["t5"](model.llm), ref_vis[i:i + 1], t) for i, t in cases]
    ref_probs = np.array([[x["probabilities"][k] for k in LABELS] for x in ref_rows])
    ref_labels = [x["label"] for x in ref_rows]
    t_vis_ref = {b: p50(timed(lambda b=b: model.visual_tokens(vols[:b].to(dev)), args.iters)[0]) for b in batches}
    rows.append({"row": "reference fp32 eager (generate + 3 passes)", "precision": "fp32", "batch": 1,
                 "end_to_end_ms": p50(t_ref), "vision_ms": t_vis_ref[1], "ratio_to_reference": 1.0,
                 "label_agreement": 1.0, "max_prob_diff": 0.0})
    say(f"reference: {p50(t_ref):.1f} ms/scan end to end (vision {t_vis_ref[1]:.1f} ms)")

    # -- fp32 / fp16 / bf16 runtime paths ---------------------------------------------------------------
    decode = {}
    for prec in ["fp32", "fp16", "bf16"]:
        m = model if prec == "fp32" else copy.deepcopy(model).to_precision(DTYPES[prec])
        dyn = TORCH_LLMS["t5"](m.llm, prec)
        graph = CudaGraphT5Llm(m.llm, prec, max_len=fam.max_new_tokens + 2)
        vis = m.visual_tokens(vols[:4].to(dev)).float()
        res = [tasks.diagnose(graph, vis[i:i + 1], t) for i, t in cases]
        probs = np.array([[x["probabilities"][k] for k in LABELS] for x in res])
        agree = float(np.mean([x["label"] == y for x, y in zip(res, ref_labels)]))
        maxdiff = float(np.abs(probs - ref_probs).max())
        same_tokens = tasks.ask_ids(dyn, vis[:1], cases[0][1]) == tasks.ask_ids(graph, vis[:1], cases[0][1])
        for b in batches:
            def e2e(b=b):
                v = m.visual_tokens(vols[:b].to(dev))
                return [tasks.diagnose(graph, v[i:i + 1], cases[i % 4][1]) for i in range(b)]
            t_e2e = p50(timed(e2e, args.iters)[0])
            t_vis = p50(timed(lambda b=b: m.visual_tokens(vols[:b].to(dev)), args.iters)[0])
            rows.append({"row": f"torch {prec} (batched scoring)", "precision": prec, "batch": b,
                         "end_to_end_ms": t_e2e / b, "vision_ms": t_vis / b, "scans_per_s": 1000 * b / t_e2e,
                         "ratio_to_reference": p50(t_ref) / (t_e2e / b), "label_agreement": agree,
                         "max_prob_diff": maxdiff})
        for name, llm in (("dynamic HF cache", dyn), ("static cache + CUDA graph", graph)):
            state = llm.prefill(tasks.prompt_ids(cases[0][1]), vis[:1])
            n = fam.max_new_tokens

            def run_decode(llm=llm, state=state):
                tok_id = 3
                for _ in range(n):
                    llm.step(state, tok_id)
            if isinstance(llm, CudaGraphT5Llm):
                def run_decode(llm=llm):  # noqa: F811 - fresh positions each run (static cache length)
                    st = llm.prefill(tasks.prompt_ids(cases[0][1]), vis[:1])
                    for _ in range(n - 1):
                        llm.step(st, 3)
            ms = p50(timed(run_decode, args.iters)[0]) / n
            decode[f"{prec} {name}"] = ms
        say(f"{prec}: agreement {agree:.2f}, max prob diff {maxdiff:.2e}, greedy tokens same {same_tokens}, "
            f"decode {decode[f'{prec} dynamic HF cache']:.2f} -> {decode[f'{prec} static cache + CUDA graph']:.2f} "
            "ms/token")
        quality[prec] = {"label_agreement": agree, "max_prob_diff": maxdiff, "greedy_same_as_dynamic": same_tokens}
        if m is not model:
            del m
        torch.cuda.empty_cache() if dev == "cuda" else None

    machine = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else None, "torch": torch.__version__,
               "cuda": torch.version.cuda, "python": platform.python_version(),
               "date": datetime.date.today().isoformat(),
               "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None}
    params = {k: sum(p.numel() for p in mod.parameters()) for k, mod in
              (("vision", model.visual_encoder), ("qformer", model.qformer), ("llm", model.llm))}
    results = {"machine": machine, "preset": args.preset, "parameters": params, "rows": rows,
               "decode_ms_per_token": decode, "quality": quality, "log": log,
               "includes": "vision: host->device copy of the volume + ViT + Q-Former + projection; "
                           "end_to_end: vision + prompt prefill + scoring the 3 answers (reference: + generate)"}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# {args.preset} on {machine['gpu']} ({machine['date']}, torch {machine['torch']})", "",
             "| row | batch | end-to-end ms/scan | vision ms/scan | x reference | label agreement | max prob diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['batch']} | {r['end_to_end_ms']:.1f} | {r['vision_ms']:.1f} | "
                     f"{r['ratio_to_reference']:.2f} | {r['label_agreement']:.2f} | {r['max_prob_diff']:.1e} |")
    lines += ["", "| decode path | ms/token |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in decode.items()]
    lines += ["", f"Timings: {results['includes']}. Random weights; TF32 off for fp32."]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""`medblip-export`: checkpoint (or preset) -> a verified bundle folder.

Order: load the checkpoint through the one loading path (memory-mapped, in its stored dtypes), compute
the fp32 PyTorch reference on the evaluation set (block by block upcast), then make each artifact and
compare it with that reference before it is registered in the manifest. Nothing holds the model in fp32:
a paper-size export stays within a few GB of the checkpoint's own size. Each step's time and peak
RSS, and each artifact's, are in the manifest (`export`, `artifacts.*.resources`).

Fault injection: with MEDBLIP_EXPORT_PAUSE_AFTER=<artifact> (torch, tokenizer, evaluation, vision_onnx,
llm_onnx, vision_trt), once that artifact is written and registered in the partial folder the export prints
`medblip-export: paused after <artifact> in <partial folder>` to stderr and sleeps until it is killed, so a
test can kill it at a known point (tests/test_export_bundle.py).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..bundle.format import TOKENIZER, TORCH
from ..bundle.writer import BundleWriter
from ..errors import MedblipError, disk_full
from ..model.checkpoint import load_checkpoint
from ..model.config import preset as get_preset
from ..model.llm import family
from ..model.prompts import ANSWERS, DIAGNOSIS_QUESTION, PROMPT_TEMPLATE
from ..model.random_init import write_random_checkpoint
from ..model.stored import release_module
from ..model.weights import load_weights, save_weights
from ..preprocess import PreprocessSpec
from .context import ExportContext, ExportOptions
from .progress import Progress, summary_table
from .reference_eval import EvalBudget, ReferenceEval
from .resources import Meter

LLM_QUANTS = ("none", "int8", "int4", "fp16")
PAUSE_ENV = "MEDBLIP_EXPORT_PAUSE_AFTER"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "onnx", "onnxruntime", "tensorrt", "nibabel"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # optional packages: absent is a fact worth recording
            out[mod] = None
    return out


def _pause_if_asked(writer: BundleWriter) -> None:
    """Block here, for good, once the artifact named in $MEDBLIP_EXPORT_PAUSE_AFTER is registered (see above)."""
    name = os.environ.get(PAUSE_ENV)
    if name and name in writer.artifacts:
        print(f"medblip-export: paused after {name} in {writer.tmp}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


def export_bundle(opts: ExportOptions, quiet: bool = False) -> dict:
    """Run the export; returns the manifest written. Nothing is left at `opts.out` on failure (a full disk
    included: `disk_full`, naming the folder the bundle was being written in)."""
    try:
        return _export_bundle(opts, quiet)
    except OSError as e:
        full = disk_full(e, writing=f"{opts.out} (the partial bundle is removed)")
        if full is None:
            raise
        raise full from e


def _export_bundle(opts: ExportOptions, quiet: bool) -> dict:
    if (opts.preset is None) == (opts.checkpoint is None):
        raise MedblipError("give either --preset NAME or --checkpoint PATH --llm DIR", code="usage")
    if opts.checkpoint is not None and opts.llm_dir is None:
        raise MedblipError("--checkpoint needs --llm DIR (the LLM's Hugging Face folder: config + tokenizer)",
                           code="usage")
    from ..qc.conform import ConformSpec

    conform = ConformSpec.parse(opts.conform)  # a bad spec fails before any work
    from .steps import plan_steps

    steps = plan_steps(opts)
    progress = Progress(total=(opts.preset is not None) + 3 + len(steps), quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="medblip-export-") as work, BundleWriter(opts.out) as writer:
        random_weights = opts.preset is not None
        ckpt, llm_dir = opts.checkpoint, opts.llm_dir
        if random_weights:
            with progress.step(f"writing random {opts.preset} weights in the training checkpoint layout"):
                ckpt, llm_dir = write_random_checkpoint(get_preset(opts.preset), Path(work), opts.seed)
        with progress.step(f"loading {Path(ckpt).name} (memory-mapped, stored dtypes)"):
            model, report = load_checkpoint(ckpt, llm_dir, dtype=None)
            progress.note(f"{report.loaded} keys loaded, {len(report.unused)} unused at inference "
                          f"(contrastive heads, Q-Former text path, buffers)")
        fam = family(model.cfg.variant)
        tokenizer = fam.read_tokenizer(llm_dir)
        with progress.step("PyTorch weights (stored dtypes) and tokenizer"), Meter() as meter:
            save_weights(model, writer.path("torch/weights.safetensors"))
            tokenizer.save(writer.path("tokenizer/x").parent)
        writer.add(TORCH, "torch/weights.safetensors", kind="torch-weights", precision="as stored",
                   parity={"reference": True}, resources=meter.result)
        if random_weights:  # the same tensors are in the bundle now: map those, and free the disk the preset used
            model = load_weights(model.cfg, writer.path("torch/weights.safetensors"), dtype=None)
            Path(ckpt).unlink()
        writer.add(TOKENIZER, "tokenizer/tokenizer.json", kind="tokenizer", runs_with="tokenizers",
                   clean_up_tokenization_spaces=tokenizer.clean_up_spaces)
        _pause_if_asked(writer)
        budget = EvalBudget.for_model(model, opts.eval_cases, opts.near_ties)
        with progress.step(f"fp32 reference on the evaluation set ({budget.cases} cases + {budget.near_ties} near "
                           f"ties, {budget.continuation_cases} x {budget.continuation_tokens}-token continuation)"):
            ref = ReferenceEval.run(model, tokenizer, budget)
            release_module(model)
        if len(ref.near_tie_visual):  # LLM inputs of the near-tie cases, for the benchmark's quality rows
            np.save(writer.path("evaluation/near_ties.npy"), ref.near_tie_visual.numpy())
            writer.add("evaluation", "evaluation/near_ties.npy", kind="evaluation-inputs",
                       shape=list(ref.near_tie_visual.shape))
            _pause_if_asked(writer)
        ctx = ExportContext(model, ref, writer, opts, Path(work))
        notes = []
        for step in steps:
            with progress.step(step.title):
                done = step.run(ctx)
                for art in done.artifacts:  # checked by the step: registered with its figures
                    writer.add(art.name, art.main, art.extra, **art.meta)
                _pause_if_asked(writer)
                if done.note:
                    notes.append(done.note)
                    progress.note(done.note)
        manifest = {
            "random_weights": random_weights,
            "model": {"variant": model.cfg.variant, "config": model.cfg.as_dict(),
                      "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in
                                     (("vision", model.visual_encoder), ("qformer", model.qformer),
                                      ("llm", model.llm))},
                      "source": {"checkpoint": "random (preset " + opts.preset + ")" if random_weights
                                 else Path(ckpt).name, **report.as_dict()}},
            "preprocess": PreprocessSpec(size=model.cfg.vision.image_size).as_dict(),
            **({"conform": str(conform)} if conform.active else {}),
            "prompt": {"template": PROMPT_TEMPLATE, "question": DIAGNOSIS_QUESTION, "answers": ANSWERS},
            "generation": {"strategy": "greedy", "max_new_tokens": fam.max_new_tokens},
            "max_batch": opts.max_batch,
            "evaluation": ref.as_manifest(),
            "export": {"steps": progress.records, "peak_rss_mib": max(r["peak_rss_mib"] for r in progress.records),
                       "seconds": round(sum(r["seconds"] for r in progress.records), 1)},
            "versions": versions(),
            "notes": notes,
        }
        manifest = writer.commit(manifest)
    if not quiet:
        import sys

        print(summary_table(manifest["artifacts"]), file=sys.stderr)
    return manifest

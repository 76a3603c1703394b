"""Same answers as the published MedBLIP code: fixtures written by that code itself, in its own environment.

tests/official/make_fixtures.py ran the published `MedBLIPModel_t5` and `MedBLIPModel_biomedlm` (github
Qybc/MedBLIP + LAVIS, transformers 4.33.2, tokenizers 0.13.3, fp32 on CPU) at tiny random-weight sizes on
nilearn's MNI152 T1 template, and saved the checkpoint exactly as its trainer saves it, the LLM folder, and
what it computed. Nothing here shares a tokenizer, a model class or a loader with that run: our loader reads
its checkpoint, our tokenizer its folder, our preprocessing the scan, and every fp32 path must give its
prompt ids and greedy tokens exactly and its logits and log-likelihoods within 1e-4.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from medblip_edge.model.scoring import log_softmax
from medblip_edge.export.run import ExportOptions, export_bundle
from medblip_edge.model.checkpoint import load_checkpoint
from medblip_edge.model.llm import family
from medblip_edge.model.prompts import ANSWERS, LABELS, build_prompt
from medblip_edge.preprocess import load_volume, to_model_input
from medblip_edge.runtime.llm_torch import TORCH_LLMS
from medblip_edge.runtime.pipeline import Pipeline
from medblip_edge.model.tasks import Tasks

FIXTURES = Path(__file__).parent / "fixtures" / "official"
VARIANTS = ("t5", "biomedlm")
TOL = 1e-4  # absolute, plus RTOL of the value: fp32 rounding through two independent implementations
RTOL = 1e-5
IMAGE_EMBEDS_STRIDE = 7  # the fixture keeps every 7th ln_vision output token


def _fixture(variant: str) -> tuple[Path, dict]:
    d = FIXTURES / variant
    return d, json.loads((d / "outputs.json").read_text())


@pytest.fixture(scope="module")
def volume(mni_path) -> torch.Tensor:
    """The MNI scan through our preprocessing: [1,1,224,224,224] float32."""
    return to_model_input(load_volume(mni_path).array, 224)


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(variant: str):
        if variant not in cache:
            d, _ = _fixture(variant)
            model, report = load_checkpoint(d / "checkpoint.pth", d / "llm")
            cache[variant] = (model, family(model.cfg.variant).read_tokenizer(d / "llm"), report)
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def ort_bundles(tmp_path_factory):
    """variant -> an fp32 bundle exported from the published checkpoint (ONNX graphs checked at export)."""
    cache = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            d, _ = _fixture(variant)
            out = tmp_path_factory.mktemp(f"official-{variant}") / "bundle"
            export_bundle(ExportOptions(out=out, checkpoint=d / "checkpoint.pth", llm_dir=d / "llm"), quiet=True)
            cache[variant] = out
        return cache[variant]

    return get


def test_fixtures_come_from_the_published_code_in_its_own_environment():
    for variant in VARIANTS:
        d, fx = _fixture(variant)
        assert fx["versions"]["transformers"] == "4.33.2" and fx["versions"]["tokenizers"].startswith("0.13")
        assert len(fx["sources"]["medblip_commit"]) == 40 and len(fx["sources"]["lavis_commit"]) == 40
        sd = torch.load(d / "checkpoint.pth", weights_only=True)  # the trainer's own torch.save(state_dict)
        dtypes = {v.dtype for v in sd.values()}
        assert {torch.float32, torch.float16, torch.int64} <= dtypes
        assert (torch.bfloat16 if variant == "t5" else torch.float16) in dtypes


def test_scan_preprocesses_to_the_published_loaders_volume(mni_path, volume):
    for variant in VARIANTS:
        _, fx = _fixture(variant)
        assert hashlib.sha256(mni_path.read_bytes()).hexdigest() == fx["scan"]["sha256"]
        assert list(volume.shape) == fx["volume"]["shape"]
        assert hashlib.sha256(volume.contiguous().numpy().tobytes()).hexdigest() == fx["volume"]["sha256"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_half_matches_published(variant, loaded, volume):
    d, _ = _fixture(variant)
    model, _, report = loaded(variant)
    assert report.llm_weights_from == "checkpoint"
    with torch.inference_mode():
        embeds = model.image_embeds(volume)[:, ::IMAGE_EMBEDS_STRIDE]
        visual = model.visual_tokens(volume)
    want_e, want_v = np.load(d / "image_embeds.npy"), np.load(d / "visual_tokens.npy")
    assert embeds.shape == want_e.shape and visual.shape == want_v.shape
    assert np.abs(embeds.numpy() - want_e).max() < TOL
    assert np.abs(visual.numpy() - want_v).max() < TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_and_answer_ids_are_the_published_ones(variant, loaded):
    _, fx = _fixture(variant)
    model, tok, _ = loaded(variant)
    tasks = Tasks(model.family, tok, model.family.max_new_tokens)
    for case in fx["cases"]:
        assert build_prompt(case["patient_text"]) == case["prompt"]
        assert tasks.prompt_ids(case["patient_text"]) == case["prompt_ids"]
    for k, i in zip(LABELS, tasks.answer_ids):
        assert fx["answers"][k]["text"] == ANSWERS[k] and i == fx["answers"][k]["ids"]
    if variant == "t5":  # the trailing space of "Answer: " is its own token before </s>, as transformers 4.x gave
        assert all(c["prompt_ids"][-2:] == [tok.tok.token_to_id("▁"), 1] for c in fx["cases"])
    else:  # BioMedLM's prompts are cut at 100 tokens; the long case is longer than that
        assert len(fx["cases"][-1]["prompt_ids"]) == 100 < len(tok.encode(fx["cases"][-1]["prompt"]))


def _close(got, want) -> bool:
    return bool(np.allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=RTOL, atol=TOL))


def _llm_checks(llm, tasks: Tasks, visual, fx: dict) -> None:
    """One backend against the published outputs: first-step logits, each answer token's log-probability and
    their sums, greedy tokens (the whole answer, 60 tokens for T5)."""
    for case in fx["cases"]:
        text = case["patient_text"]
        state = llm.prefill(tasks.prompt_ids(text), visual)
        first = np.asarray(state.next_logits.cpu() if hasattr(state.next_logits, "cpu") else state.next_logits)
        assert _close(first, case["first_step_logits"])
        logp = log_softmax(llm.candidate_logits(state, tasks.answer_ids))
        for k, (label, ids) in enumerate(zip(LABELS, tasks.answer_ids)):
            assert _close(logp[k, np.arange(len(ids)), ids], case["answer_token_logprobs"][label]), label
        assert _close(llm.score(state, tasks.answer_ids), [case["answer_loglik"][k] for k in LABELS])
        assert tasks.ask_ids(llm, visual, text) == case["generated_ids"]
        assert tasks.ask(llm, visual, text) == case["generated_text"].strip()


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_fp32_gives_the_published_answers(variant, loaded):
    d, fx = _fixture(variant)
    model, tok, _ = loaded(variant)
    tasks = Tasks(model.family, tok, model.family.max_new_tokens)
    visual = torch.from_numpy(np.load(d / "visual_tokens.npy"))
    _llm_checks(TORCH_LLMS[model.cfg.variant](model.llm, "fp32"), tasks, visual, fx)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ort_fp32_gives_the_published_answers(variant, ort_bundles, volume):
    _, fx = _fixture(variant)
    pipe = Pipeline.from_bundle(ort_bundles(variant), backend="ort")
    assert pipe.chosen == {"vision": "ort", "llm": "ort"}
    visual = pipe.visual_tokens(volume)
    d, _ = _fixture(variant)
    assert np.abs(visual.numpy() - np.load(d / "visual_tokens.npy")).max() < TOL
    _llm_checks(pipe.llm, pipe.tasks, visual, fx)


def test_one_token_off_in_the_prompt_is_caught(loaded):
    """The check can fail: dropping the trailing-space token (what transformers 5's T5Tokenizer does) moves the
    first-step logits far past the tolerance."""
    d, fx = _fixture("t5")
    model, tok, _ = loaded("t5")
    llm = TORCH_LLMS["t5"](model.llm, "fp32")
    visual = torch.from_numpy(np.load(d / "visual_tokens.npy"))
    case = fx["cases"][1]
    ids = case["prompt_ids"]
    shorter = ids[:-2] + ids[-1:]
    moved = np.abs(llm.prefill(shorter, visual).next_logits.numpy() - np.array(case["first_step_logits"])).max()
    assert moved > 100 * TOL


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_cli_answers_the_diagnosis_question_as_published(backend, ort_bundles, mni_path, infer_cmd):
    """The README's path: medblip-export --checkpoint/--llm, then medblip-infer --question on the MNI scan."""
    for variant in VARIANTS:
        _, fx = _fixture(variant)
        case = fx["cases"][1]
        out = subprocess.run([*infer_cmd, str(mni_path), "--bundle", str(ort_bundles(variant)), "--backend", backend,
                              "--patient-text", case["patient_text"],
                              "--question", "What will this subject be diagnosed with?"],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        row = json.loads(out.stdout.strip().splitlines()[-1])
        assert row["answer"] == case["generated_text"].strip()
        assert _close([row["log_likelihoods"][k] for k in LABELS], [case["answer_loglik"][k] for k in LABELS])

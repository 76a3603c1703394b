"""The runtime: torch and ONNX Runtime backends agree with the fp32 PyTorch reference on real scans."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from bundles import tiny_onnx_bundle
from medblip_edge.errors import BackendUnavailable, MedblipError
from medblip_edge.model.evalset import eval_volumes
from medblip_edge.model.weights import load_weights
from medblip_edge.bundle.reader import Bundle
from medblip_edge.runtime.pipeline import Pipeline
from medblip_edge.model.reference import ReferencePipeline

FP32_PROB_TOL = 1e-4


@pytest.mark.parametrize("preset", ["tiny", "tiny-biomedlm"])
def test_reference_generate_matches_runtime(preset):
    """Greedy tokens and first-step logits of transformers' generate(inputs_embeds=...) equal the runtime's."""
    b = Bundle.open(tiny_onnx_bundle(preset, "none"))
    model = load_weights(b.config, b.path("torch"))
    ref = ReferencePipeline(model, b.tokenizer())
    with torch.no_grad():
        visual = model.visual_tokens(eval_volumes(1))
    ids, first = ref.generate(visual, "The subject is a 70 year old male. ")
    assert len(ids) > 0
    for backend in ("torch", "ort"):
        pipe = Pipeline.from_bundle(b.root, backend=backend)
        state = pipe.llm.prefill(pipe.tasks.prompt_ids("The subject is a 70 year old male. "), visual)
        np.testing.assert_allclose(np.asarray(state.next_logits), first.numpy(), atol=1e-4)
        assert pipe.tasks.ask_ids(pipe.llm, visual, "The subject is a 70 year old male. ") == ids


@pytest.mark.parametrize("preset", ["tiny", "tiny-biomedlm"])
def test_batched_scoring_equals_one_pass_per_answer(preset):
    """classify's single batched pass gives the per-answer log-likelihoods of the reference's separate passes."""
    b = Bundle.open(tiny_onnx_bundle(preset, "none"))
    model = load_weights(b.config, b.path("torch"))
    vol = eval_volumes(1)
    ref = ReferencePipeline(model, b.tokenizer()).diagnose(vol, "MMSE 22. ")
    pipe = Pipeline.from_bundle(b.root, backend="torch")
    got = pipe.classify(pipe.visual_tokens(vol), "MMSE 22. ")
    for k, v in ref["log_likelihoods"].items():
        assert got["log_likelihoods"][k] == pytest.approx(v, abs=1e-3)
    assert got["label"] == ref["label"]


def test_torch_and_ort_agree_on_the_mni_scan(mni_path):
    b = tiny_onnx_bundle("tiny", "none")
    rows = {be: Pipeline.from_bundle(b, backend=be)(mni_path, patient_text="MMSE 25. ") for be in ("torch", "ort")}
    assert rows["torch"]["label"] == rows["ort"]["label"]
    for k in rows["torch"]["probabilities"]:
        assert abs(rows["torch"]["probabilities"][k] - rows["ort"]["probabilities"][k]) < FP32_PROB_TOL
    for row in rows.values():
        assert row["scan"] == mni_path.name and "/" not in row["scan"]
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)
        assert set(row["timings_ms"]) >= {"load", "preprocess", "vision", "llm", "total"}
        assert row["random_weights"] is True and row["label"] in ("AD", "MCI", "NC")


@pytest.mark.slow
def test_quantized_bundle_agrees_within_manifest_figures(mni_path):
    b = Bundle.open(tiny_onnx_bundle("tiny", "int4"))
    recorded = b.artifacts["llm_onnx"]["parity"]
    torch_pipe, ort_pipe = (Pipeline.from_bundle(b.root, backend=be) for be in ("torch", "ort"))
    assert ort_pipe.llm.precision == "int4"
    vis = torch_pipe.visual_tokens(eval_volumes(2))
    for i in range(2):
        a, q = torch_pipe.classify(vis[i:i + 1]), ort_pipe.classify(vis[i:i + 1])
        if recorded["label_agreement"] == 1.0:
            assert a["label"] == q["label"]
        diff = max(abs(a["probabilities"][k] - q["probabilities"][k]) for k in a["probabilities"])
        assert diff <= max(recorded["max_abs_prob_diff"] * 10, 1e-3)


def test_several_questions_reuse_the_visual_tokens(mni_path, monkeypatch):
    """One vision pass per scan: every question's LLM prefill gets that same visual-token tensor."""
    pipe = Pipeline.from_bundle(tiny_onnx_bundle("tiny", "none"), backend="ort")
    vision_runs, prefilled = [], []
    run, prefill = pipe.vision.run, pipe.llm.prefill
    monkeypatch.setattr(pipe.vision, "run", lambda volumes: vision_runs.append(volumes) or run(volumes))
    monkeypatch.setattr(pipe.llm, "prefill", lambda ids, visual: prefilled.append(visual) or prefill(ids, visual))
    prepared = pipe.prepare(mni_path)
    visual = pipe.visual_tokens(prepared.volume)
    questions = ("Is there atrophy?", "What is the sex?", "Is there atrophy?")
    answers = [pipe.ask(visual, question=q, max_new_tokens=5) for q in questions]
    assert len(vision_runs) == 1 and vision_runs[0] is prepared.volume
    assert len(prefilled) == len(questions) and all(v is visual for v in prefilled)
    assert all(isinstance(a, str) for a in answers) and answers[2] == answers[0]


def test_auto_backend_picks_ort_and_says_so():
    pipe = Pipeline.from_bundle(tiny_onnx_bundle("tiny", "none"))
    assert pipe.chosen == {"vision": "ort", "llm": "ort"}


@pytest.mark.slow
def test_huge_pages_change_no_number(mni_path):
    """Weights moved onto 2 MiB pages at load (the default on CPU) give bit-identical rows."""
    b = tiny_onnx_bundle("tiny", "int8")
    on, off = (Pipeline.from_bundle(b, backend="ort", huge_pages=flag) for flag in (True, False))
    assert off.huge_pages.skipped == "turned off" and off.huge_pages.bytes == 0
    assert on.huge_pages.skipped != "turned off"
    rows = [p(mni_path, patient_text="MMSE 25. ", question="Is there atrophy?") for p in (on, off)]
    assert rows[0]["probabilities"] == rows[1]["probabilities"] and rows[0]["answer"] == rows[1]["answer"]
    assert Pipeline.from_bundle(b, backend="ort", device="cpu").huge_pages.skipped != "turned off"


def test_missing_backend_is_a_one_line_error(tiny_bundle):
    with pytest.raises(BackendUnavailable) as e:
        Pipeline.from_bundle(tiny_onnx_bundle("tiny", "none"), backend="trt")
    assert "\n" not in str(e.value) and "TensorRT" in str(e.value)
    with pytest.raises(BackendUnavailable):
        Pipeline.from_bundle(tiny_bundle, backend="ort")  # exported with --no-onnx
    with pytest.raises(MedblipError):
        Pipeline.from_bundle(tiny_bundle, backend="tpu")


@pytest.mark.slow
def test_cli_torch_and_ort_same_labels(mni_path, infer_cmd):
    b = tiny_onnx_bundle("tiny", "none")
    labels = {}
    for be in ("torch", "ort"):
        r = subprocess.run([*infer_cmd, str(mni_path), "--bundle", str(b), "--backend", be],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        row = json.loads(r.stdout.strip().splitlines()[-1])
        labels[be] = row["label"]
        assert row["backend"]["vision"] == be
        assert "pages" in r.stderr.splitlines()[0]  # backend line: what went onto 2 MiB pages, or why not
    assert labels["torch"] == labels["ort"]


@pytest.mark.slow
def test_cli_folder_with_a_corrupt_scan_same_labels_torch_and_ort(tmp_path, mni_path, infer_cmd):
    """A folder of scans, one corrupt: every good scan gets the same label on both backends, the bad one an error."""
    import shutil

    from volumes import real_volume

    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(mni_path, folder / "a_mni.nii.gz")
    shutil.copy(real_volume("anatomical"), folder / "b_anat.nii")
    (folder / "c_broken.nii.gz").write_bytes(mni_path.read_bytes()[:5000])
    b = tiny_onnx_bundle("tiny", "none")
    rows = {}
    for be in ("torch", "ort"):
        r = subprocess.run([*infer_cmd, str(folder), "--bundle", str(b), "--backend", be],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, r.stderr[-2000:]  # one scan failed
        assert "Traceback" not in r.stderr
        rows[be] = {row["scan"]: row for row in map(json.loads, r.stdout.strip().splitlines())}
    assert set(rows["torch"]) == {"a_mni.nii.gz", "b_anat.nii", "c_broken.nii.gz"}
    assert rows["torch"]["c_broken.nii.gz"]["error"]["code"] == rows["ort"]["c_broken.nii.gz"]["error"]["code"]
    for name in ("a_mni.nii.gz", "b_anat.nii"):
        assert rows["torch"][name]["label"] == rows["ort"][name]["label"]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.parametrize("preset", ["tiny", "tiny-biomedlm"])
def test_reference_casts_to_the_published_gpu_dtypes(preset):
    """The ViT's Linear weights fp16, its Conv3d, LayerNorms and position embedding fp32, the Q-Former and the
    projection fp32, the LLM in the family's stored dtype (as modeling_medblip_*.py and eva_vit.py leave them)."""
    b = Bundle.open(tiny_onnx_bundle(preset, "none"))
    model = load_weights(b.config, b.path("torch"))
    gpu = ReferencePipeline(model, b.tokenizer(), gpu_precisions=True)
    vit = model.visual_encoder
    assert vit.blocks[0].attn.qkv.weight.dtype == torch.float16 and vit.blocks[0].mlp.fc2.weight.dtype == torch.float16
    assert vit.patch_embed_3d.proj.weight.dtype == torch.float32 and vit.blocks[0].norm1.weight.dtype == torch.float32
    assert vit.pos_embed_3d.dtype == torch.float32 and model.proj.weight.dtype == torch.float32
    assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}
    assert {p.dtype for p in model.llm.parameters()} == {model.family.storage_dtype}
    assert "fp16 Linear" in gpu.precision["vision"] and gpu.precision["llm"].startswith(
        {torch.bfloat16: "bf16", torch.float16: "fp16"}[model.family.storage_dtype])


@pytest.mark.parametrize("preset,device", [
    # torch's CPU autocast runs T5's bf16 path; its fp16 LayerNorm policy differs from CUDA's. Slow tier (~15 s on
    # 2 cores); the dtypes themselves are checked in the test above
    pytest.param("tiny", "cpu", marks=pytest.mark.slow),
    pytest.param("tiny", "cuda", marks=CUDA), pytest.param("tiny-biomedlm", "cuda", marks=CUDA)])
def test_reference_in_the_published_gpu_dtypes_answers_near_fp32(preset, device):
    """Answers close to the fp32 reference's, and not equal to them (the dtypes and autocast took effect)."""
    b = Bundle.open(tiny_onnx_bundle(preset, "none"))
    vol = eval_volumes(1).to(device)
    fp32 = ReferencePipeline(load_weights(b.config, b.path("torch"), device=device), b.tokenizer())
    gpu = ReferencePipeline(load_weights(b.config, b.path("torch"), device=device), b.tokenizer(), gpu_precisions=True)
    with torch.no_grad():
        v32, v16 = fp32.visual_tokens(vol), gpu.visual_tokens(vol)
    assert v16.dtype == torch.float32 and 0 < (v16 - v32).abs().max().item() < 0.05
    ref, got = fp32.diagnose(vol, "MMSE 22. "), gpu.diagnose(vol, "MMSE 22. ")
    deltas = [abs(got["log_likelihoods"][k] - v) for k, v in ref["log_likelihoods"].items()]
    assert 0 < max(deltas) < 0.5

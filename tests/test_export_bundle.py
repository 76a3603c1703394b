"""medblip-export: every artifact loads in ONNX Runtime and matches the manifest's parity figures when re-checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from bundles import tiny_onnx_bundle
from medblip_edge.errors import BundleError, MedblipError
from medblip_edge.engines.ort_session import ort_session
from medblip_edge.model.fidelity import compare
from medblip_edge.export.reference_eval import EvalBudget, ReferenceEval
from medblip_edge.export.run import ExportOptions, export_bundle
from medblip_edge.model.weights import load_weights
from medblip_edge.bundle.format import SCHEMA_VERSION, sha256_file
from medblip_edge.bundle.reader import Bundle
from medblip_edge.runtime.factory import make_backends

CASES = [("tiny", "none"), ("tiny", "int4"), ("tiny-biomedlm", "int8"), ("tiny-biomedlm", "fp16")]
FAST_CASES = [("tiny", "none")]  # the bundle the runtime tests share; the quantized exports are the slow tier's


@pytest.fixture(scope="session", params=[pytest.param(c, id=f"{c[0]}-{c[1]}", marks=() if c in FAST_CASES else
                                         pytest.mark.slow) for c in CASES])
def bundle(request):
    return Bundle.open(tiny_onnx_bundle(*request.param))


@pytest.fixture(scope="session")
def reference(bundle):
    """A fresh fp32 PyTorch reference, recomputed from the bundle's own weights."""
    model = load_weights(bundle.config, bundle.path("torch"))
    budget = EvalBudget(**bundle.manifest["evaluation"]["budget"])
    near = torch.from_numpy(np.load(bundle.path("evaluation"))) if bundle.has("evaluation") else None
    return ReferenceEval.run(model, bundle.tokenizer(), budget, near_visual=near)


def test_manifest_lists_every_file_with_its_hash(bundle):
    m = bundle.manifest
    assert m["schema_version"] == SCHEMA_VERSION and m["random_weights"] is True
    assert {"torch", "tokenizer", "vision_onnx", "llm_onnx"} <= set(m["artifacts"])
    for art in m["artifacts"].values():
        for rel, digest in art["sha256"].items():
            assert sha256_file(bundle.root / rel) == digest
    assert m["preprocess"]["size"] == 224 and m["prompt"]["answers"]["AD"] == "Dementia"
    assert m["versions"]["onnxruntime"] and m["versions"]["torch"]


def test_vision_graph_io_and_fresh_parity(bundle, reference):
    art = bundle.artifacts["vision_onnx"]
    vol = art["inputs"]["volume"]
    assert vol["dtype"] == "tensor(float)" and vol["shape"][1:] == [1, 224, 224, 224]
    assert isinstance(vol["shape"][0], str), "batch axis must be dynamic"
    sess = ort_session(bundle.path("vision_onnx"))
    fresh = compare(np.concatenate([sess.run(None, {"volume": reference.volumes[i:i + 1].numpy()})[0]
                                    for i in range(len(reference.volumes))]), reference.volume_visual.numpy())
    assert fresh["max_abs_err"] < 1e-3 and fresh["cosine"] > 0.9999
    assert fresh["max_abs_err"] == pytest.approx(art["parity"]["max_abs_err"], abs=1e-5)


def test_llm_graphs_match_manifest(bundle, reference):
    art = bundle.artifacts["llm_onnx"]
    _, llm, chosen = make_backends(bundle, "ort", "cpu", None)
    assert chosen["llm"] == "ort" and llm.precision == art["precision"]
    fresh = reference.compare(llm)
    assert fresh["label_agreement"] == art["parity"]["label_agreement"]
    assert fresh["max_abs_prob_diff"] == pytest.approx(art["parity"]["max_abs_prob_diff"], abs=1e-6)
    if art["precision"] == "fp32":
        assert reference.greedy_match(llm), "fp32 ONNX greedy tokens must equal PyTorch's"
        assert fresh["max_abs_prob_diff"] < 1e-4 and fresh["max_abs_loglik_diff"] < 1e-3
    else:
        fp32 = art["parity"]["fp32_onnx"]
        assert fp32["greedy_tokens_identical"] and fp32["max_abs_prob_diff"] < 1e-4
        assert art["parity"]["bytes_on_disk"] == art["bytes"]
        if art["precision"] == "fp16":
            assert fresh["max_abs_loglik_diff"] < 0.05


@pytest.mark.slow
def test_quantized_llm_is_smaller():
    sizes = {q: Bundle.open(tiny_onnx_bundle("tiny", q)).artifacts["llm_onnx"]["bytes"]
             for q in ("none", "int4")}
    assert sizes["int4"] < sizes["none"] / 2


@pytest.mark.slow
def test_cli_exports_int8_bundle_and_prints_summary(tmp_path):
    out = tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "medblip_edge.cli_export", "--preset", "tiny", "--out", str(out),
                        "--llm-quant", "int8", "--trt"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["random_weights"] is True and "llm_onnx" in summary["artifacts"]
    assert any("--trt skipped" in n for n in summary["notes"]) or "vision_trt" in summary["artifacts"]
    assert "parity vs PyTorch fp32" in r.stderr and "[5/" in r.stderr
    assert "Traceback" not in r.stderr
    m = Bundle.open(out).manifest
    assert m["artifacts"]["llm_onnx"]["precision"] == "int8"
    assert m["artifacts"]["llm_onnx"]["parity"]["label_agreement"] >= 0.75


def _tamper(src: Path, dst: Path):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("how,code", [("modify", "hash_mismatch"), ("delete", "missing_file"),
                                      ("extra", "extra_file"), ("schema", "unknown_schema")])
def test_tampered_bundle_is_refused_naming_the_file(tmp_path, how, code):
    b = _tamper(tiny_onnx_bundle("tiny", "none"), tmp_path / "b")
    target = b / "llm" / "t5_decoder_step.onnx"
    if how == "modify":
        with open(target, "r+b") as f:
            f.seek(100)
            f.write(b"\x00\x01\x02")
    elif how == "delete":
        target.unlink()
    elif how == "extra":
        (b / "llm" / "evil.onnx").write_bytes(b"x")
    else:
        m = json.loads((b / "manifest.json").read_text())
        m["schema_version"] = 99
        (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as e:
        Bundle.open(b)
    assert e.value.code == code
    if how != "schema":
        assert ("evil.onnx" if how == "extra" else "t5_decoder_step.onnx") in str(e.value)
    assert "\n" not in str(e.value)


def test_failed_export_keeps_the_old_bundle(tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(tiny_onnx_bundle("tiny", "none"), out)
    before = sha256_file(out / "manifest.json")
    from medblip_edge.export import steps

    def boom(self, ctx):
        raise MedblipError("simulated failure", code="boom")

    monkeypatch.setattr(steps.LlmOnnxStep, "run", boom)
    with pytest.raises(MedblipError):
        export_bundle(ExportOptions(out=out, preset="tiny"), quiet=True)
    assert sha256_file(out / "manifest.json") == before
    Bundle.open(out)  # still whole and verified
    assert [p.name for p in tmp_path.iterdir()] == ["b"], "no partial folder left behind"


def _export_killed_after(out: Path, artifact: str) -> Path:
    """Run medblip-export into `out`, paused (MEDBLIP_EXPORT_PAUSE_AFTER) once `artifact` is in its partial
    folder, then SIGKILL it there: -> the partial folder it was writing."""
    env = dict(os.environ, MEDBLIP_EXPORT_PAUSE_AFTER=artifact)
    proc = subprocess.Popen([sys.executable, "-m", "medblip_edge.cli_export", "--preset", "tiny", "--out", str(out),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    guard = threading.Timer(600, proc.kill)  # a hang fails the test below instead of blocking the run
    guard.start()
    try:
        paused = next((line for line in proc.stderr if line.startswith(f"medblip-export: paused after {artifact} in ")),
                      None)
        assert paused is not None and proc.poll() is None, f"the export never paused (exit {proc.wait()})"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        guard.cancel()
        proc.kill()
        proc.stderr.close()
    return Path(paused.rstrip("\n").split(" in ", 1)[1])


@pytest.mark.parametrize("previous", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["no-previous-bundle", "over-a-previous-bundle"])
def test_killed_export_leaves_no_half_written_bundle(tmp_path, tiny_bundle, previous):
    """Killed (SIGKILL) while its partial folder holds the PyTorch weights and tokenizer: --out is absent, or
    still the previous bundle byte for byte. The partial folder cannot be removed by a killed process: it stays,
    hidden beside --out, without a manifest, and the next export to --out ignores it (BundleWriter)."""
    import shutil

    out = tmp_path / "b"
    if previous:
        shutil.copytree(tiny_bundle, out)
        before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    partial = _export_killed_after(out, "torch")
    assert partial.parent == tmp_path and partial.name.startswith(".b.partial-")
    assert (partial / "torch" / "weights.safetensors").is_file(), "killed after the weights were written"
    assert not (partial / "manifest.json").exists()
    if previous:
        assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
        Bundle.open(out)  # still whole and verified
    else:
        assert not out.exists(), "a killed export must not leave a bundle at --out"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([partial.name] + (["b"] if previous else []))
    if previous:  # the leftover changes nothing for the next export
        export_bundle(ExportOptions(out=out, preset="tiny", onnx=False), quiet=True)
        Bundle.open(out)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([partial.name, "b"])


def test_usage_errors_are_one_line():
    with pytest.raises(MedblipError) as e:
        export_bundle(ExportOptions(out=Path("x"), preset=None), quiet=True)
    assert e.value.code == "usage"
    with pytest.raises(MedblipError) as e:
        export_bundle(ExportOptions(out=Path("x"), preset="nope"), quiet=True)
    assert "tiny" in str(e.value)


def test_paper_preset_sizes_match_the_paper():
    from medblip_edge.model.config import PRESETS

    t5 = PRESETS["paper-t5"]
    assert (t5.vision.width, t5.vision.depth, t5.vision.mlp_dim, t5.vision.heads) == (1408, 39, 6144, 16)
    assert (t5.qformer.hidden, t5.qformer.layers, t5.qformer.num_query, t5.qformer.heads) == (768, 12, 32, 12)
    assert t5.llm["d_model"] == 2048 and PRESETS["paper-biomedlm"].llm["n_embd"] == 2560
    # a 224^3 volume in 32^3 patches: 343 visual tokens; FLAN-T5-XL and BioMedLM's depths and head counts
    assert (t5.vision.image_size, t5.vision.patch, t5.vision.num_patches) == (224, 32, 343)
    llm = t5.llm
    assert (llm["num_layers"], llm["num_decoder_layers"], llm["num_heads"], llm["d_ff"]) == (24, 24, 32, 5120)
    gpt = PRESETS["paper-biomedlm"]
    assert (gpt.llm["n_layer"], gpt.llm["n_head"]) == (32, 20) and gpt.vision == t5.vision and gpt.qformer == t5.qformer


def test_manifest_records_time_memory_and_bytes_per_artifact(bundle):
    m = bundle.manifest
    for name in ("torch", "vision_onnx", "llm_onnx"):
        art = m["artifacts"][name]
        assert art["bytes"] > 0 and art["resources"]["seconds"] >= 0 and art["resources"]["peak_rss_mib"] > 0
    steps = m["export"]["steps"]
    assert len(steps) >= 5 and m["export"]["peak_rss_mib"] == max(s["peak_rss_mib"] for s in steps)
    budget = m["evaluation"]["budget"]
    assert budget["cases"] + budget["near_ties"] == len(m["evaluation"]["cases"]) and budget["continuation_tokens"] == 60
    llm = m["artifacts"]["llm_onnx"]
    shared = [rel for rel in llm["sha256"] if rel.endswith(".data")]
    assert len(shared) == 1, "the LLM graphs share one weight file"


@pytest.mark.slow
def test_int8_vision_graph_records_its_fidelity(tmp_path):
    """--precision int8: the ViT's matmuls as dynamic INT8, its error on the visual tokens and what it does to
    the answers (the fp32 LLM run on its tokens) in the manifest; the runtime reads the precision from there."""
    import onnx

    from medblip_edge.runtime.pipeline import Pipeline

    out = tmp_path / "b"
    m = export_bundle(ExportOptions(out=out, preset="tiny", precision="int8", max_batch=4), quiet=True)
    vision = m["artifacts"]["vision_onnx"]
    assert vision["precision"] == "int8" and 0.95 <= vision["parity"]["cosine"] < 1
    down = vision["parity"]["downstream"]
    assert 0 <= down["label_agreement"] <= 1 and down["tokens"]["positions"] > 0 and "kl_mean" in down["tokens"]
    graph = onnx.load(str(out / vision["files"]["main"]), load_external_data=False).graph
    depth = m["model"]["config"]["vision"]["depth"]
    assert sum(n.op_type == "DynamicQuantizeMatMul" for n in graph.node) == 1 + 4 * depth  # stem + 4 per block
    pipe = Pipeline.from_bundle(out, backend="ort")
    assert pipe.precision["vision"] == "int8"


def test_near_tie_cases_sit_at_a_decision_edge(bundle):
    """Random weights decide every regular case by 20+ nats; the near-tie cases (visual tokens moved by gradient
    steps, stored in the bundle) move the reference towards flipping: for T5 to within half a nat, so labels can
    move; for the tiny GPT-2 only part of the way (its final LayerNorm bounds the visual tokens' reach)."""
    cases = bundle.manifest["evaluation"]["cases"]
    regular = [c["margin_nats"] for c in cases if "volume" in c]
    near = [c for c in cases if "near_tie" in c]
    assert len(near) == 2 and min(regular) > 5
    assert all(0 < c["steps"] <= 60 and c["margin_nats"] < min(regular) - 5 for c in near)
    if bundle.config.variant == "t5":
        assert all(c["margin_nats"] < 0.5 for c in near)
    cfg = bundle.config
    d_llm = cfg.llm.get("d_model") or cfg.llm.get("n_embd")
    assert np.load(bundle.path("evaluation")).shape == (len(near), cfg.qformer.num_query, d_llm)


@pytest.mark.slow
@pytest.mark.parametrize("preset,quant", [("tiny", "int4"), ("tiny-biomedlm", "int4"), ("tiny-biomedlm", "int8")])
def test_quantized_graphs_leave_no_fp32_weight_matrix_multiply(preset, quant):
    """Every weight a MatMul or Gemm multiplies by is quantized (GPT-2's Conv1D projections once traced to Gemm,
    which the 4-bit quantizer skips, so an INT4 BioMedLM kept them all in fp32)."""
    import onnx

    b = Bundle.open(tiny_onnx_bundle(preset, quant))
    for name in b.artifacts["llm_onnx"]["graphs"]:
        m = onnx.load(str(b.path("llm_onnx", name)), load_external_data=False)
        fp32 = {i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
        plain = [x for n in m.graph.node if n.op_type in ("MatMul", "Gemm") for x in n.input if x in fp32]
        assert not plain, (name, plain[:3])
        assert any(n.op_type in ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger") for n in m.graph.node)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (needs root and a mount-capable machine, as CI is): an export into it fills it up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root on a machine that allows mounts")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_export_onto_a_full_disk_says_so_in_one_line_and_leaves_nothing(small_disk):
    """The disk fills while the PyTorch weights are written: `error [disk_full]` naming the file, exit 2, no
    traceback, and no partial folder left on the full disk."""
    r = subprocess.run([sys.executable, "-m", "medblip_edge.cli_export", "--preset", "tiny", "--out",
                        str(small_disk / "b"), "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error [disk_full]: no space left on the device while writing ") and str(small_disk) in line
    assert list(small_disk.iterdir()) == []


_WRITES = """
import click, sys
from medblip_edge.cli import one_line_errors

@click.command()
@one_line_errors
def main():
    with open(sys.argv[1], "w") as f:
        f.write("x" * 65536)
        f.flush()

main([])
"""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("target,code", [("/dev/full", 2), ("/nonexistent-dir/out.txt", 1)], ids=["full", "other"])
def test_every_command_turns_a_full_disk_into_one_line(target, code):
    """The wrapper every medblip-* command runs in: a write the OS refuses for lack of space (Linux's /dev/full
    always does) ends with `error [disk_full]` and exit 2; any other OSError keeps its traceback (a bug)."""
    r = subprocess.run([sys.executable, "-c", _WRITES, target], capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stderr[-2000:]
    if code == 2:
        assert r.stderr.strip() == "error [disk_full]: no space left on the device: free some space or write to " \
                                   "another disk"
    else:
        assert "Traceback" in r.stderr and "FileNotFoundError" in r.stderr

"""Tolerance-driven quantization (export/tolerant.py, fallback.py, mixed.py, smooth.py) on the checkpoints written by
the published code (tests/fixtures/official): a graph outside its tolerance never ships silently, and the manifest's
kept-matmul list is exactly what the shipped ONNX graphs leave unquantized."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from medblip_edge.errors import MedblipError
from medblip_edge.export.fallback import search
from medblip_edge.export.run import ExportOptions, export_bundle
from medblip_edge.export.tolerance import Tolerance

FIX = Path(__file__).parent / "fixtures" / "official"
QUANT_OPS = {"DynamicQuantizeMatMul", "MatMulNBits"}


def _export(out: Path, family: str, quant: str = "none", **kw) -> dict:
    """The fixture exported with a small evaluation budget (2 cases, no near ties) to keep the test short."""
    return export_bundle(ExportOptions(out=out, checkpoint=FIX / family / "checkpoint.pth", llm_dir=FIX / family / "llm",
                                       llm_quant=quant, eval_cases=2, near_ties=0, **kw), quiet=True)


def _matmuls(folder: Path) -> tuple[set, set]:
    """(names of the matmuls left fp32, names of the quantized ones) in every graph of `folder`, read from the ONNX
    files: a plain MatMul's weight initializer is the matmul's name; a quantized one's is `<name>.q8` / `.q4`."""
    fp32, quant = set(), set()
    for path in folder.glob("*.onnx"):
        g = onnx.load(str(path), load_external_data=False).graph
        inits = {i.name for i in g.initializer}
        for node in g.node:
            if node.op_type == "MatMul" and node.input[1] in inits:
                fp32.add(node.input[1])
            elif node.op_type in QUANT_OPS:
                quant.add(node.input[1].rsplit(".", 1)[0])
    return fp32, quant


def _kl(manifest: dict, art: str = "llm_onnx") -> float:
    p = manifest["artifacts"][art]["parity"]
    return (p["downstream"] if art == "vision_onnx" else p)["tokens"]["kl_mean"]


def test_fallback_keeps_the_fewest_measured_and_the_graph_holds_the_list(tmp_path):
    # the fully quantized graph's KL, measured (no fallback allowed), sets a tolerance it misses
    full = _export(tmp_path / "full", "biomedlm", "int8", max_fp32_share=0.0, allow_out_of_tolerance=True)
    q = full["artifacts"]["llm_onnx"]["quantization"]
    assert q["kept_matmuls"] == [] and _matmuls(tmp_path / "full" / "llm")[0] == set()
    max_kl = _kl(full) / 2
    m = _export(tmp_path / "b", "biomedlm", "int8", max_kl=max_kl, min_top1=0.0, min_labels=0.0, max_fp32_share=0.6,
                smooth=False)
    q = m["artifacts"]["llm_onnx"]["quantization"]
    assert q["met"] and q["kept_matmuls"] and _kl(m) <= max_kl
    # the list is the graph's: kept matmuls are plain fp32 MatMuls, every other one quantized, in every graph
    fp32, quant = _matmuls(tmp_path / "b" / "llm")
    assert fp32 == set(q["kept_matmuls"]) and quant == set(q["quantized_matmuls"])
    assert set(q["kept_matmuls"]) == {k["matmul"] for k in q["kept"]} and all(k["why"] for k in q["kept"])
    # the most sensitive first, and a mix one smaller (measured) missed
    ranks = sorted(k["sensitivity_rank"] for k in q["kept"])
    fitting = [i + 1 for i, r in enumerate(q["sensitivity"]) if r["matmul"] not in q["skipped_too_large"]]
    assert ranks == fitting[:len(ranks)]
    missed = [t for t in q["trials"] if t["kept"] < len(ranks)]
    assert missed and all(t["shortfalls"] for t in missed)
    assert q["cost"]["bytes"] > 0 and "decode_step_ms" in q["cost"]


def test_out_of_tolerance_fails_with_its_code_and_writes_nothing(tmp_path):
    out = tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "medblip_edge.cli_export", "--checkpoint", str(FIX / "t5" / "checkpoint.pth"),
                        "--llm", str(FIX / "t5" / "llm"), "--out", str(out), "--llm-quant", "int4", "--max-kl", "1e-6",
                        "--max-fp32-share", "0", "--no-smooth", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert "error [out_of_tolerance]" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_allow_out_of_tolerance_ships_it_marked(tmp_path):
    m = _export(tmp_path / "b", "biomedlm", "int4", max_kl=1e-9, max_fp32_share=0.0, allow_out_of_tolerance=True)
    q = m["artifacts"]["llm_onnx"]["quantization"]
    assert q["met"] is False and q["shortfalls"] and any("OUTSIDE" in n for n in m["notes"])
    fp32, quant = _matmuls(tmp_path / "b" / "llm")
    assert fp32 == set() and quant == set(q["quantized_matmuls"])


def test_vision_int8_outside_tolerance_is_refused(tmp_path):
    with pytest.raises(MedblipError) as e:  # an unreachable tolerance, no fallback: refused, nothing written
        _export(tmp_path / "no", "biomedlm", precision="int8", max_kl=1e-12, max_fp32_share=0.0)
    assert e.value.code == "out_of_tolerance" and not (tmp_path / "no").exists()


@pytest.mark.slow  # a sensitivity pass over every ViT matmul, each with the fp32 LLM run downstream
def test_vision_int8_fallback_list_matches_its_graph(tmp_path):
    m = _export(tmp_path / "b", "biomedlm", precision="int8", max_kl=1e-12, max_fp32_share=0.5,
                allow_out_of_tolerance=True)
    q = m["artifacts"]["vision_onnx"]["quantization"]
    assert q["kept_matmuls"] and q["met"] is False
    assert q["kept_parameter_share"] <= 0.5
    fp32, quant = _matmuls(tmp_path / "b" / "vision")
    vit = set(q["kept_matmuls"]) | set(q["quantized_matmuls"])  # the Q-Former's matmuls are fp32 by design
    assert fp32 & vit == set(q["kept_matmuls"]) and quant == set(q["quantized_matmuls"])


def test_search_ships_the_smallest_measured_prefix_within_the_cap():
    kl = {"a": 0.05, "b": 0.02, "c": 0.01, "d": 0.004, "e": 0.001}  # each matmul's share of the KL, additive
    sizes = dict.fromkeys(kl, 10)
    seen = []

    def measure(keep):
        seen.append(keep)
        k = sum(v for n, v in kl.items() if n not in keep)
        return {"tokens": {"kl_mean": k, "top1_agreement": 1.0}, "label_agreement": 1.0, "max_abs_loglik_diff": k}

    fb = search(sizes, measure, Tolerance(max_kl=0.02), max_share=1.0)
    assert fb.met and fb.chosen.keep == {"a", "b"}  # 0.015 <= 0.02; keeping only "a" leaves 0.035
    assert [k["matmul"] for k in fb.record["kept"]] == ["a", "b"]
    fb = search(sizes, measure, Tolerance(max_kl=0.001), max_share=0.4)  # needs 4 of 5 kept, 2 allowed
    assert not fb.met and fb.chosen.keep == {"a", "b"} and fb.record["max_kept_within_share"] == 2
    big = {**sizes, "a": 1000}  # the most sensitive does not fit the share: the next ones are kept instead
    fb = search(big, measure, Tolerance(max_kl=0.07), max_share=0.02)
    assert fb.chosen.keep == {"b"} and fb.met and fb.record["skipped_too_large"] == ["a"]
    seen.clear()
    fb = search(sizes, measure, Tolerance(max_kl=1.0), max_share=1.0)
    assert fb.met and not fb.chosen.keep and len(seen) == 1  # met fully quantized: nothing else measured


def test_smoothing_is_an_identity_in_fp32(tmp_path):
    """(x / s) @ (diag(s) W) == x @ W: the smoothed graph differs from the plain one only by its quantization."""
    from medblip_edge.engines.ort_session import ort_session
    from medblip_edge.export.onnx_builder import GraphWriter
    from medblip_edge.export.quantize import FP32
    from medblip_edge.export.smooth import Smoothed, fingerprint

    rng = np.random.default_rng(0)
    w_ = rng.standard_normal((16, 8)).astype(np.float32)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    x[:, 2] *= 50  # an outlier channel
    fmt = Smoothed(FP32, 0.5, {fingerprint(w_[:, 0]): np.abs(x).max(0)})
    assert fmt.scales(w_)[2] > 5 * np.median(fmt.scales(w_))
    outs = []
    for f in (FP32, fmt):
        g = GraphWriter("t")
        g.input("x", "float32", [3, 16])
        g.linear("x", "m", w_, None, f, out="y")
        g.output("y", "float32", [3, 8])
        path = tmp_path / f"{f.describe()[:4]}.onnx"
        g.save(path)
        outs.append(ort_session(path).run(None, {"x": x})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-4)


def test_cli_reports_what_was_kept(tmp_path):
    out = tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "medblip_edge.cli_export", "--checkpoint",
                        str(FIX / "biomedlm" / "checkpoint.pth"), "--llm", str(FIX / "biomedlm" / "llm"), "--out", str(out),
                        "--llm-quant", "int8", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["quantization"]["llm_onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["artifacts"]["llm_onnx"]["quantization"]
    assert summary == {"met": True, "kept_fp32": q["kept_matmuls"]}
    assert _matmuls(out / "llm")[0] == set(q["kept_matmuls"])

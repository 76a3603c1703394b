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
from medblip_edge.export.fallback import search, search_levels
from medblip_edge.export.run import ExportOptions, export_bundle
from medblip_edge.export.tolerance import Tolerance

FIX = Path(__file__).parent / "fixtures" / "official"
QUANT_OPS = {"DynamicQuantizeMatMul", "MatMulNBits"}


def _export(out: Path, family: str, quant: str = "none", **kw) -> dict:
    """The fixture exported with a small evaluation budget (2 cases, no near ties) to keep the test short."""
    return export_bundle(ExportOptions(out=out, checkpoint=FIX / family / "checkpoint.pth", llm_dir=FIX / family / "llm",
                                       llm_quant=quant, eval_cases=2, near_ties=0, **kw), quiet=True)


def _formats(folder: Path) -> dict[str, set]:
    """matmul name -> the weight formats it has across every graph of `folder` ("fp32", "int8", "int4"), read from
    the ONNX files: a plain MatMul's weight initializer is the matmul's name; a quantized one's is `<name>.q8` /
    `.q4`, and its bits are MatMulNBits' attribute (DynamicQuantizeMatMul: 8)."""
    out: dict[str, set] = {}
    for path in folder.glob("*.onnx"):
        g = onnx.load(str(path), load_external_data=False).graph
        inits = {i.name for i in g.initializer}
        for node in g.node:
            if node.op_type == "MatMul" and node.input[1] in inits:
                out.setdefault(node.input[1], set()).add("fp32")
            elif node.op_type in QUANT_OPS:
                bits = next((a.i for a in node.attribute if a.name == "bits"), 8)
                out.setdefault(node.input[1].rsplit(".", 1)[0], set()).add(f"int{bits}")
    return out


def _matmuls(folder: Path) -> tuple[set, set]:
    """(names of the matmuls left fp32, names of the quantized ones, at any bits) in every graph of `folder`."""
    f = _formats(folder)
    return {n for n, k in f.items() if "fp32" in k}, {n for n, k in f.items() if k - {"fp32"}}


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
    m = _export(tmp_path / "b", "biomedlm", "int4", max_kl=1e-9, max_fp32_share=0.0, max_int8_share=0.0,
                allow_out_of_tolerance=True)
    q = m["artifacts"]["llm_onnx"]["quantization"]
    assert q["met"] is False and q["shortfalls"] and any("OUTSIDE" in n for n in m["notes"])
    assert q["raised_matmuls"] == [] and q["kept_matmuls"] == []
    fp32, quant = _matmuls(tmp_path / "b" / "llm")
    assert fp32 == set() and quant == set(q["quantized_matmuls"])
    assert all(f == {"int4"} for f in _formats(tmp_path / "b" / "llm").values())


def test_t5_int4_meets_its_tolerance_by_default_and_the_graph_holds_each_list(tmp_path):
    """The published-code T5 at INT4 with the export's defaults (evaluation budget, tolerance, caps): met, with the
    most sensitive matmuls raised to 8 bits inside the 4-bit graphs, and each list is what the graphs contain."""
    m = export_bundle(ExportOptions(out=tmp_path / "b", checkpoint=FIX / "t5" / "checkpoint.pth",
                                    llm_dir=FIX / "t5" / "llm", llm_quant="int4", smooth=False), quiet=True)
    art = m["artifacts"]["llm_onnx"]
    q, tokens = art["quantization"], art["parity"]["tokens"]
    assert q["met"] and tokens["kl_mean"] <= 0.05 and tokens["top1_agreement"] >= 0.85
    assert q["all_quantized"]["shortfalls"]  # the fully 4-bit graph misses: the search did something
    raised, kept = set(q["raised_matmuls"]), set(q["kept_matmuls"])
    assert raised and not raised & kept and q["steps"][0] == "int8"
    assert raised == {r["matmul"] for r in q["raised"]} and all(r["why"] for r in q["raised"])
    formats = _formats(tmp_path / "b" / "llm")
    assert {n for n, f in formats.items() if f == {"int8"}} == raised
    assert {n for n, f in formats.items() if f == {"fp32"}} == kept
    assert {n for n, f in formats.items() if f == {"int4"}} == set(q["quantized_matmuls"]) != set()
    assert set(formats) == raised | kept | set(q["quantized_matmuls"])
    # the raised ones are the most sensitive (quantized alone, at 4 bits), and one fewer raised missed
    order = [r["matmul"] for r in q["sensitivity"]]
    assert sorted(order.index(n) for n in raised) == list(range(len(raised)))
    assert any(t["kept"] < len(raised) and t["shortfalls"] for t in q["trials"])
    assert q["cost"]["bytes"] > 0 and "decode_step_ms" in q["cost"]
    assert "raised to MatMulNBits 8-bit" in art["weight_formats"]["t5_decoder_step"]
    # GPTQ was tried before the fallback and, doing better than the plain scales fully quantized, chosen
    tried = {t["quantizer"].split(" ")[0]: t for t in q["quantizers_tried"]}
    assert tried["GPTQ"]["chosen"] and tried["GPTQ"]["kl_mean"] < tried["plain"]["kl_mean"]
    assert "GPTQ" in art["weight_formats"]["t5_encoder"]


def test_gptq_fits_the_output_not_the_weights_and_packs_what_matmulnbits_reads(tmp_path):
    """On correlated activations GPTQ's integers give a smaller output error than rounding each weight (and a larger
    weight error); the packed graph computes x @ its dequantized weights."""
    from medblip_edge.export.gptq import GptqBlockQuant, gptq_ints
    from medblip_edge.export.quantize import BlockQuant
    from medblip_edge.export.smooth import fingerprint

    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 8)) @ rng.standard_normal((8, 48))  # rank 8 in 48 channels
    x = (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)
    w_ = rng.standard_normal((48, 5)).astype(np.float32)
    q, s = gptq_ints(w_, x.T.astype(np.float64) @ x, 16, 4)
    gptq = (q * s[..., None]).reshape(5, -1)[:, :48].T
    plain = BlockQuant(4, 16).pack(w_)
    pq = np.stack([plain[0] & 15, plain[0] >> 4], -1).reshape(5, 3, 16).astype(np.float32) - 8
    rtn = (pq * plain[1][..., None]).reshape(5, -1).T
    assert np.linalg.norm(x @ (gptq - w_)) < 0.7 * np.linalg.norm(x @ (rtn - w_))
    assert np.linalg.norm(gptq - w_) > np.linalg.norm(rtn - w_)
    fmt = GptqBlockQuant(4, 16, 0, sums={fingerprint(w_[:, 0]): x.T.astype(np.float64) @ x})
    np.testing.assert_allclose(run_one_linear(tmp_path / "g.onnx", w_, x, fmt), x @ gptq, rtol=1e-3, atol=1e-3)


def test_search_levels_raises_to_8_bits_first_then_keeps_fp32():
    """8-bit errors are a tenth of 4-bit ones here: raising first meets a tolerance 8 bits can; one it cannot is met by
    keeping the most sensitive at fp32, the rest of the raised ones still at 8 bits."""
    kl = {"a": 0.05, "b": 0.02, "c": 0.01, "d": 0.004, "e": 0.001}
    sizes = dict.fromkeys(kl, 10)

    def measure(keep, raised):
        k = sum(v * (0.0 if n in keep else 0.1 if n in raised else 1.0) for n, v in kl.items())
        return {"tokens": {"kl_mean": k, "top1_agreement": 1.0}, "label_agreement": 1.0, "max_abs_loglik_diff": k}

    lv = search_levels(sizes, measure, Tolerance(max_kl=0.025), max_share=0.25, max_raised_share=1.0)
    assert lv.met and lv.raised == {"a", "b"} and not lv.keep and lv.record["steps"] == ["int8"]
    lv = search_levels(sizes, measure, Tolerance(max_kl=0.005), max_share=0.25, max_raised_share=1.0)
    # all five raised leave 0.0085; "a" at fp32 and the rest at 8 bits leave 0.0035
    assert lv.met and lv.keep == {"a"} and lv.raised == {"b", "c", "d", "e"} and lv.record["steps"] == ["int8", "fp32"]
    assert [r["matmul"] for r in lv.record["kept"]] == ["a"] and len(lv.record["raised"]) == 4
    lv = search_levels(sizes, measure, Tolerance(max_kl=0.005), max_share=0.4, max_raised_share=None)
    assert lv.raised == set() and lv.keep == {"a", "b"} and not lv.met  # no 8-bit step: fp32 only, capped at 2
    lv = search_levels(sizes, measure, Tolerance(max_kl=0.005), max_share=1.0, max_raised_share=0.1)
    assert lv.met and lv.raised == set() and lv.keep == {"a", "b", "c"}  # no matmul fits the 8-bit share
    assert lv.record["steps"] == ["fp32"]


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


def run_one_linear(path, w_, x, fmt):
    """x @ w_ through a one-MatMul ONNX graph written with `fmt` and run by ONNX Runtime."""
    from medblip_edge.engines.ort_session import ort_session
    from medblip_edge.export.onnx_builder import GraphWriter

    g = GraphWriter("t")
    g.input("x", "float32", list(x.shape))
    g.linear("x", "m", w_, None, fmt, out="y")
    g.output("y", "float32", [x.shape[0], w_.shape[1]])
    g.save(path)
    return ort_session(path).run(None, {"x": x})[0]


def test_smoothing_is_an_identity_in_fp32(tmp_path):
    """(x / s) @ (diag(s) W) == x @ W: the smoothed graph differs from the plain one only by its quantization."""
    from medblip_edge.export.quantize import FP32
    from medblip_edge.export.smooth import Smoothed, fingerprint

    rng = np.random.default_rng(0)
    w_ = rng.standard_normal((16, 8)).astype(np.float32)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    x[:, 2] *= 50  # an outlier channel
    fmt = Smoothed(FP32, 0.5, {fingerprint(w_[:, 0]): np.abs(x).max(0)})
    assert fmt.scales(w_)[2] > 5 * np.median(fmt.scales(w_))
    outs = [run_one_linear(tmp_path / f"{f.describe()[:4]}.onnx", w_, x, f) for f in (FP32, fmt)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-4)


def test_fitted_scales_are_what_matmulnbits_computes_and_no_worse_than_plain(tmp_path):
    """FittedBlockQuant packs in ONNX Runtime's own layout: the graph computes x @ (its dequantized weights), and
    the fitted scales' weight error is at most the plain ones'."""
    from medblip_edge.export.quantize import BlockQuant, FittedBlockQuant

    rng = np.random.default_rng(1)
    w_ = rng.standard_normal((40, 6)).astype(np.float32)  # K not a multiple of the block: padded
    x = rng.standard_normal((3, 40)).astype(np.float32)

    def dequantized(fmt):
        packed, scales = fmt.pack(w_)
        q = np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:2], -1).astype(np.float32) - 8
        return (q * scales[..., None]).reshape(6, -1)[:, :40].T

    for fmt in (BlockQuant(4, 16, 0), FittedBlockQuant(4, 16, 0)):
        np.testing.assert_allclose(run_one_linear(tmp_path / f"{type(fmt).__name__}.onnx", w_, x, fmt),
                                   x @ dequantized(fmt), rtol=1e-4, atol=1e-4)
    plain, fitted = (np.sum((dequantized(f) - w_) ** 2) for f in (BlockQuant(4, 16), FittedBlockQuant(4, 16)))
    assert fitted < plain  # the fit moved some scale, and only where that lowered the squared error


def test_cli_reports_what_was_kept(tmp_path):
    out = tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "medblip_edge.cli_export", "--checkpoint",
                        str(FIX / "biomedlm" / "checkpoint.pth"), "--llm", str(FIX / "biomedlm" / "llm"), "--out", str(out),
                        "--llm-quant", "int8", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["quantization"]["llm_onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["artifacts"]["llm_onnx"]["quantization"]
    assert summary == {"met": True, "kept_fp32": q["kept_matmuls"]}  # int8: no 8-bit step, no raised_int8
    assert _matmuls(out / "llm")[0] == set(q["kept_matmuls"])

"""medblip-bench smoke test: the quick mode on the tiny preset writes its files, and results.json has its schema.

Speeds are not checked (CI machines differ); the shape of every row is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundles import tiny_onnx_bundle
from commands import console_command

pytest.importorskip("nilearn", reason="the benchmark scan is nilearn's MNI152 template")
pytest.importorskip("matplotlib", reason="the benchmark draws its plots with matplotlib")

PLOTS = ("latency_per_stage.png", "throughput_vs_batch.png", "ratio_to_floor.png")
STAGES = ("load", "preprocess", "vision", "score", "decode_step", "classify", "end_to_end")
FLOORS = ("vision", "prefill", "decode_step", "score", "classify")


def _bench_cmd() -> list[str]:
    return console_command("medblip-bench")


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "quick"
    proc = subprocess.run(_bench_cmd() + ["--preset", "tiny", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def results(bench_out) -> dict:
    return json.loads((bench_out / "results.json").read_text())


@pytest.mark.slow
def test_files_exist(bench_out):
    for name in ("results.json", "report.md") + PLOTS:
        assert (bench_out / name).stat().st_size > 0, name
    for name in PLOTS:
        assert (bench_out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (bench_out / "report.md").read_text()
    for heading in ("## Speed and quality", "## Per stage", "## Throughput vs vision batch", "## Floors",
                    "## What each timing includes"):
        assert heading in report


@pytest.mark.slow
def test_machine_and_limits(results):
    m = results["machine"]
    assert isinstance(m["cpu"]["model"], str) and m["cores"]["logical"] >= 1 and m["ram_gib"] > 0
    assert m["versions"]["torch"] and m["versions"]["onnxruntime"] and m["date"]
    mm = results["limits"]["matmul"]
    assert mm["fp32"]["flops_per_s"] > 0 and mm["fastest"] in mm
    assert all("flops_per_s" in v or "error" in v or "skipped" in v for k, v in mm.items() if k != "fastest")
    for v in mm.values():  # a ceiling left out is left out for being too slow to be one, and says so
        if isinstance(v, dict) and "skipped" in v:
            assert v["probe_flops_per_s"] > 0 and "probe" in v["skipped"]
    mem = results["limits"]["memory"]
    assert mem["bytes_per_s"] > 0 and mem["huge_pages"]
    if "huge_page_rates" in mem:  # measured on 2 MiB pages too: the floor uses the best of both
        assert mem["bytes_per_s"] >= max(mem["huge_page_rates"].values())


@pytest.mark.slow
def test_rows_have_speed_quality_and_floors(results):
    rows = results["rows"]
    assert rows[0]["is_reference"] and rows[0]["name"] == "reference" and rows[0]["ratio_to_reference"] == 1.0
    assert rows[0].get("matches_diagnose") is True
    assert {"torch fp32", "ort int8", "ort int4"} <= {r["name"] for r in rows}
    for r in rows:
        assert isinstance(r["ratio_to_reference"], float) and r["ratio_to_reference"] > 0
        assert isinstance(r["speedup_vs_reference"], float)
        a = r["agreement"]
        assert 0.0 <= a["label_agreement"] <= 1.0 and a["cases"] >= 1
        assert isinstance(a["max_abs_prob_diff"], float) and isinstance(a["max_abs_loglik_diff"], float)
        for st in STAGES:
            s = r["stages_ms"][st]
            assert s["n"] >= 1 and 0 <= s["p50"] <= s["p90"] <= s["p99"], (r["name"], st)
        for st in FLOORS:
            f = r["floors"][st]
            assert f["floor_ms"] > 0 and f["flops"] > 0 and f["bytes"] > 0, (r["name"], st)
            assert f["ratio"] is None or f["ratio"] > 0
        assert r["throughput"] and all(t["batch"] >= 1 and t["scans_per_s"] > 0 for t in r["throughput"])
        assert r["memory"]["rss_peak_mib"] > 0 and r["model_load_s"] > 0  # hashing every file takes time
        if not r["is_reference"]:  # whole 2 MiB pages of memory this process holds; none when the move was skipped
            moved = r["huge_pages"]
            assert moved["huge_page_bytes"] % (2 << 20) == 0, moved
            assert moved["huge_page_bytes"] <= r["memory"]["rss_peak_mib"] * 2**20, moved
            assert moved["skipped"] is None or moved["huge_page_bytes"] == 0, moved
    assert sum(r["model_load_s"] for r in rows) < results["measure_s"]  # the loads are part of the measuring
    for r in rows[1:]:
        assert r["stages_ms"]["prefill"]["n"] >= 1 and r["stages_ms"]["ttft"]["p50"] > 0
    assert rows[1]["agreement"]["max_abs_prob_diff"] == 0.0  # torch fp32 is the quality baseline itself


@pytest.mark.slow
def test_counted_sizes_match_the_manifest(results):
    """The FLOP/byte counts are only as good as the parameter counts behind them."""
    params = results["bundles"][0]["parameters"]
    assert abs(results["costs"]["llm_params_counted"] / params["llm"] - 1) < 0.03
    assert abs(results["costs"]["vision"]["weights"] / (params["vision"] + params["qformer"]) - 1) < 0.03


@pytest.mark.slow
def test_usage_error_is_one_line():
    proc = subprocess.run(_bench_cmd() + ["--out", "unused"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error [usage]") and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_decode_variants_times_every_weight_format(tmp_path):
    """The script behind the weight-format choice: traced vs fused step graphs, each format, one table."""
    out = tmp_path / "variants"
    proc = subprocess.run([sys.executable, "-m", "medblip_edge.benchmarks.decode_variants", "--bundle",
                           str(tiny_onnx_bundle("tiny", "int8")), "--out", str(out), "--rounds", "1", "--per-round", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "decode_variants.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    formats = ("fp32", "int8-dynamic", "int8-block32", "int8-block128", "int4-block32", "int4-block128")
    shipped = {f"fused {res['shipped'][k]} (4 KiB pages)" for k in ("int8", "int4")}
    assert set(rows) == {f"{g} {f}" for g in ("traced", "fused") for f in formats} | shipped
    assert all(r["p50"] > 0 and r["floor_ms"] > 0 and r["n"] == 2 for r in rows.values())
    assert rows["fused fp32"]["nodes"] * 2 < rows["traced fp32"]["nodes"]
    # the shipped int8 row is the column's baseline: 1.0 up to its p50 being rounded to the microsecond first
    base = rows[f"fused {res['shipped']['int8']}"]
    assert base["vs_shipped_int8"] == pytest.approx(1.0, abs=0.005 + 0.001 / base["p50"])
    assert rows["fused int4-block32"]["floor_ms"] < rows["fused int8-block128"]["floor_ms"] < rows["fused fp32"]["floor_ms"]


def test_a_floor_beaten_is_not_reported_as_a_ratio():
    """On a CPU where a stage beats its floor, that floor's ceiling was not the one it ran on (weights from a
    shared L3, another kernel): no ratio below 1, a note instead."""
    from medblip_edge.benchmarks.costs import row_floors, stage_costs
    from medblip_edge.model.config import preset

    cfg = preset("small")
    costs = stage_costs(cfg, 768, 20, [3, 9, 4], 8)
    limits = {"matmul": {"fp32": {"flops_per_s": 1e11}, "int8": {"flops_per_s": 4e11}},
              "memory": {"bytes_per_s": 2e10}}
    fast = {"vision": 1e-3, "prefill": 1e-3, "decode_step": 1e-3, "score": 1e-3, "classify": 2e-3}
    for stage, f in row_floors(costs, {"vision": "fp32", "llm": "int8"}, limits, fast).items():
        assert f["ratio"] is None and "not the ceiling" in f["beats_floor"], stage
    slow = {k: v * 1e9 for k, v in fast.items()}
    assert all(f["ratio"] >= 1 and "beats_floor" not in f
               for f in row_floors(costs, {"vision": "fp32", "llm": "int8"}, limits, slow).values())


def test_torch_precisions_this_cpu_emulates_are_skipped_with_the_reason():
    from medblip_edge.benchmarks.run import BenchOptions, _row_specs

    class B:  # a stand-in for a Bundle: only what _row_specs reads
        root = Path("b")
        artifacts = {"vision_onnx": {}, "llm_onnx": {"precision": "int8"}}

        def has(self, name):
            return name in self.artifacts

    limits = {"matmul": {"fp32": {"flops_per_s": 1e11},
                         "bf16": {"skipped": "a 512x512 probe ran at 0.27 GFLOP/s", "probe_flops_per_s": 2.7e8}}}
    rows, skipped = _row_specs(BenchOptions(bundles=[Path("b")]), [B()], limits)
    assert [r["name"] for r in rows] == ["torch fp32", "ort int8"]
    assert skipped[0]["name"] == "torch bf16" and "emulated" in skipped[0]["reason"]
    limits["matmul"]["bf16"] = {"flops_per_s": 2e12}  # AMX: bf16 is real there, and measured
    rows, _ = _row_specs(BenchOptions(bundles=[Path("b")]), [B()], limits)
    assert "torch bf16" in [r["name"] for r in rows]


@pytest.mark.slow
def test_bundles_of_one_preset_share_identical_files(tmp_path):
    import shutil

    from medblip_edge.benchmarks.bundles import share_identical_files

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_onnx_bundle("tiny", "int8"), a)
    shutil.copytree(tiny_onnx_bundle("tiny", "int4"), b)
    saved = share_identical_files(a, b)
    assert saved >= (a / "torch" / "weights.safetensors").stat().st_size
    assert os.path.samefile(a / "torch" / "weights.safetensors", b / "torch" / "weights.safetensors")
    assert not os.path.samefile(a / "llm" / "llm.data", b / "llm" / "llm.data")
    from medblip_edge.runtime.bundle import Bundle

    Bundle.open(b)  # still verifies


@pytest.mark.slow
def test_export_quality_figures_move_for_int8_and_not_for_fp32(tmp_path):
    """The per-token figures can fail: fp32 graphs agree with the reference to float rounding on every
    position, INT8 weights move log-likelihoods and next-token distributions measurably."""
    from medblip_edge.benchmarks.export_quality import main

    main(["--presets", "tiny", "--formats", "int8", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "quality.json").read_text())
    fp32, int8 = res["rows"]
    assert fp32["format"] == "fp32 (ONNX)" and int8["format"] == "int8"
    assert fp32["top1_answers"] == fp32["top1_continuation"] == 1.0 and fp32["kl_max"] < 1e-6
    assert fp32["positions"] == int8["positions"] > 60  # answers of every case + a 60-token continuation
    assert int8["kl_mean"] > 1e-4 and int8["max_abs_loglik_diff"] > 1e-2
    assert int8["min_margin_nats"] > 0 and int8["label_agreement"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert "| tiny | int8 |" in (tmp_path / "quality.md").read_text()


def test_ceiling_probe_skips_slow_paths_but_always_keeps_fp32():
    """A ceiling the probe says would overrun its budget is skipped with the probe's rate; fp32, which every
    floor may fall back to, is then the probe's own measurement instead (a busy or slow CPU still gets floors)."""
    import torch

    from medblip_edge.benchmarks.limits import PROBE_N, _bounded, _torch_mm

    skipped = _bounded(_torch_mm, 2048, 3, torch.float32, "cpu", budget_s=1e-6)
    assert "flops_per_s" not in skipped and skipped["probe_flops_per_s"] > 0 and "probe" in skipped["skipped"]
    kept = _bounded(_torch_mm, 2048, 3, torch.float32, "cpu", budget_s=1e-6, required=True)
    assert kept["flops_per_s"] > 0 and f"{PROBE_N}x{PROBE_N}" in kept["how"] and "probe" in kept["note"]

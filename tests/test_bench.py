"""medblip-bench: the pipeline suite's quick mode on the tiny preset writes its files and results.json has its
schema; every suite is listed and explains itself; the old command lines name (or run) the new ones; the cheap
suites write results.json with the machine and the command in it.

Speeds are not checked (CI machines differ); the shape of every row is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundles import tiny_onnx_bundle
from commands import console_command

pytest.importorskip("nilearn", reason="the benchmark scan is nilearn's MNI152 template")
pytest.importorskip("matplotlib", reason="the benchmark draws its plots with matplotlib")

PLOTS = ("latency_per_stage.png", "throughput_vs_batch.png", "ratio_to_floor.png")
STAGES = ("load", "preprocess", "vision", "score", "decode_step", "classify", "end_to_end")
FLOORS = ("vision", "prefill", "decode_step", "score", "classify")


def _bench_cmd() -> list[str]:
    return console_command("medblip-bench")


SUITES = ("pipeline", "decode-formats", "vision-forms", "gunzip", "serve-load", "ray-cohort", "export-quality",
          "node-load", "known-answer", "qc",
          "explain", "explain-checks", "quantization")
# old module path -> the suite it forwards to, or None: it names the new command and exits 2
OLD_MODULES = {"decode_variants": "decode-formats", "vision_forms": "vision-forms", "gunzip": "gunzip",
               "serve_load": "serve-load", "cohort_ray": "ray-cohort", "export_quality": "export-quality",
               "gpu_paper_t5": None, "paper_vision_export": None}


def _bench(args: list[str]):
    """medblip-bench in this process -> click's Result (output holds stdout and stderr)."""
    from click.testing import CliRunner

    from medblip_edge.cli import bench_main

    return CliRunner().invoke(bench_main, args)


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "quick"
    proc = subprocess.run(_bench_cmd() + ["pipeline", "--preset", "tiny", "--quick", "--out", str(out)],
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
def test_results_record_the_command(bench_out, results):
    assert results["suite"] == "pipeline"
    assert results["command"] == f"medblip-bench pipeline --preset tiny --quick --out {bench_out}"
    assert results["machine"]["load_average_start"] and "other_processes" in results["machine"]


@pytest.mark.slow
@pytest.mark.parametrize("old_form", [False, True])
def test_usage_error_is_one_line(old_form, tmp_path):
    """`medblip-bench --out X` (no suite: the pipeline benchmark's command line before the suites) is the pipeline
    suite; a usage error is one line either way, and leaves no output folder behind."""
    args = ["--out", str(tmp_path / "unused")]
    proc = subprocess.run(_bench_cmd() + (args if old_form else ["pipeline", *args]), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error [usage]") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "unused").exists()


def test_help_lists_every_suite_with_one_line():
    r = _bench(["--help"])
    assert r.exit_code == 0
    listed = r.output.split("Suites", 1)[1]
    for name in SUITES:
        assert re.search(rf"^  {name} +\S", listed, re.M), name


def test_the_command_line_module_stays_light():
    """cli.py (every console script, and the docs' CLI reference) imports no suite, so no torch, until one is named."""
    code = "import sys, medblip_edge.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize("name", SUITES)
def test_each_suite_explains_its_options(name):
    r = _bench([name, "--help"])
    assert r.exit_code == 0, r.output
    assert f"Usage: medblip-bench {name}" in r.output and "--out" in r.output and len(r.output.splitlines()) > 8


@pytest.mark.parametrize("old", sorted(OLD_MODULES))
def test_old_module_paths_name_the_new_command(old):
    proc = subprocess.run([sys.executable, "-m", f"medblip_edge.benchmarks.{old}", "--help"], capture_output=True,
                          text=True, timeout=120)
    first = proc.stderr.splitlines()[0]
    suite = OLD_MODULES[old]
    if suite is None:  # no longer a tool of its own: the command doing its work, and exit 2
        assert proc.returncode == 2 and re.fullmatch(r"moved: use `medblip-bench \S+ .*`", first), proc.stderr
    else:  # forwarded with its arguments
        assert first == f"moved: use `medblip-bench {suite} --help`", proc.stderr
        assert proc.returncode == 0 and f"Usage: medblip-bench {suite}" in proc.stdout


def _suite_results(out: Path, suite: str) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert res["suite"] == suite and res["command"].startswith(f"medblip-bench {suite} ")
    m = res["machine"]
    assert m["cpu"]["model"] and m["cores"]["usable"] >= 1 and m["versions"]["torch"] and m["date"]
    assert "load_average_end" in m and "other_processes" in m
    report = (out / "report.md").read_text()
    assert f"Command: `{res['command']}`" in report and m["cpu"]["model"] in report
    return res


def test_gunzip_suite_writes_results(tmp_path, mni_path):
    r = _bench(["gunzip", "--scan", str(mni_path), "--iters", "2", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = _suite_results(tmp_path, "gunzip")
    assert res["rows"][0]["decoder"] == "zlib" and all(row["same_bytes_as_zlib"] for row in res["rows"])
    assert all(row["inflate_p50_ms"] > 0 and row["load_volume_p50_ms"] > 0 for row in res["rows"])
    assert "| zlib |" in r.output


def test_vision_forms_suite_writes_results(tmp_path):
    r = _bench(["vision-forms", "--preset", "tiny", "--iters", "1", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = _suite_results(tmp_path, "vision-forms")
    assert res["options"]["preset"] == "tiny" and len(res["rows"]) == 3 and res["rows"][0]["batch"] == 1


def test_default_out_is_the_results_folder(tmp_path, monkeypatch):
    from medblip_edge.benchmarks.suite import default_out

    monkeypatch.chdir(tmp_path)
    first = default_out("gunzip")
    assert first.parent == Path("results") and first.name.startswith("cpu-gunzip-")
    first.mkdir(parents=True)
    assert default_out("gunzip").name == first.name + "-b" and default_out("x", "cuda").name.startswith("gpu-x-")


def _torch_rows_on_eval_volume(tmp_path, *extra) -> dict:
    """The GPU session's pipeline command (one bundle of PyTorch weights, the evaluation volume as input)."""
    out = tmp_path / "torch-eval"
    proc = subprocess.run(_bench_cmd() + ["pipeline", "--preset", "tiny", "--backends", "torch", "--scan", "eval",
                                          "--quick", "--batch", "1,2", *extra, "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["scan"]["name"] == "evaluation volume 0" and "input" in res["timing_notes"]
    assert "torch" in res["bundles"][0]["artifacts"] and not {"vision_onnx", "llm_onnx"} & set(res["bundles"][0]["artifacts"])
    for r in res["rows"]:
        assert "load" not in r["stages_ms"] and r["stages_ms"]["end_to_end"]["p50"] > 0
    return res


@pytest.mark.slow
def test_pipeline_on_the_evaluation_volume_with_torch_rows_only(tmp_path):
    res = _torch_rows_on_eval_volume(tmp_path)
    assert [r["name"] for r in res["rows"]] == ["reference", "torch fp32"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_pipeline_on_cuda_through_the_factory(tmp_path):
    """The GPU rows: the published code's GPU dtypes, torch fp32/fp16/bf16, the eager decoder beside the graph."""
    res = _torch_rows_on_eval_volume(tmp_path, "--device", "cuda", "--compare-decode")
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"reference", "torch fp32", "torch fp16", "torch bf16"}
    assert "autocast" in rows["reference"]["precision"]["vision"] and res["machine"]["gpu"]
    for name in ("torch fp32", "torch fp16", "torch bf16"):
        assert rows[name]["stages_ms"]["decode_step_eager"]["n"] >= 1 and rows[name]["memory"]["gpu_peak_mib"] > 0


def test_compare_decode_needs_cuda(tmp_path):
    r = _bench(["pipeline", "--preset", "tiny", "--compare-decode", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--compare-decode" in r.output and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_decode_formats_times_every_weight_format(tmp_path):
    """The suite behind the weight-format choice: traced vs fused step graphs, each format, one table."""
    out = tmp_path / "variants"
    proc = subprocess.run(_bench_cmd() + ["decode-formats", "--bundle", str(tiny_onnx_bundle("tiny", "int8")),
                                          "--out", str(out), "--rounds", "1", "--per-round", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
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
    from medblip_edge.benchmarks.pipeline import PipelineOptions, plan_of, row_jobs

    class B:  # a stand-in for a Bundle: only what _row_specs reads
        root = Path("b")
        artifacts = {"vision_onnx": {}, "llm_onnx": {"precision": "int8"}}

        def has(self, name):
            return name in self.artifacts

    limits = {"matmul": {"fp32": {"flops_per_s": 1e11},
                         "bf16": {"skipped": "a 512x512 probe ran at 0.27 GFLOP/s", "probe_flops_per_s": 2.7e8}}}
    opts = PipelineOptions(bundles=[Path("b")])
    rows, skipped = row_jobs(opts, [B()], limits, plan_of(opts, None))
    assert [r.name for r in rows] == ["torch fp32", "ort int8"]
    assert skipped[0]["name"] == "torch bf16" and "emulated" in skipped[0]["reason"]
    limits["matmul"]["bf16"] = {"flops_per_s": 2e12}  # AMX: bf16 is real there, and measured
    rows, _ = row_jobs(opts, [B()], limits, plan_of(opts, None))
    assert "torch bf16" in [r.name for r in rows]


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
    from medblip_edge.bundle.reader import Bundle

    Bundle.open(b)  # still verifies


@pytest.mark.slow
def test_export_quality_figures_move_for_int8_and_not_for_fp32(tmp_path):
    """The per-token figures can fail: fp32 graphs agree with the reference to float rounding on every
    position, INT8 weights move log-likelihoods and next-token distributions measurably."""
    r = _bench(["export-quality", "--presets", "tiny", "--formats", "int8", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    fp32, int8 = res["rows"]
    assert fp32["format"] == "fp32 (ONNX)" and int8["format"] == "int8"
    assert fp32["top1_answers"] == fp32["top1_continuation"] == 1.0 and fp32["kl_max"] < 1e-6
    assert fp32["positions"] == int8["positions"] > 60  # answers of every case + a 60-token continuation
    assert int8["kl_mean"] > 1e-4 and int8["max_abs_loglik_diff"] > 1e-2
    assert int8["min_margin_nats"] > 0 and int8["label_agreement"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert "| tiny | int8 |" in (tmp_path / "report.md").read_text()
    vision, = res["vision"]  # the export's own vision check, held to its tolerance
    assert vision["graph"] == "vision_onnx" and vision["precision"] == "fp32" and vision["checked"]
    assert vision["max_abs_err"] <= vision["tolerance"]["max_abs_err"] and vision["cosine"] >= vision["tolerance"]["cosine"]


def test_ceiling_probe_skips_slow_paths_but_always_keeps_fp32():
    """A ceiling the probe says would overrun its budget is skipped with the probe's rate; fp32, which every
    floor may fall back to, is then the probe's own measurement instead (a busy or slow CPU still gets floors)."""
    import torch

    from medblip_edge.benchmarks.limits import PROBE_N, _bounded, _torch_mm

    skipped = _bounded(_torch_mm, 2048, 3, torch.float32, "cpu", budget_s=1e-6)
    assert "flops_per_s" not in skipped and skipped["probe_flops_per_s"] > 0 and "probe" in skipped["skipped"]
    kept = _bounded(_torch_mm, 2048, 3, torch.float32, "cpu", budget_s=1e-6, required=True)
    assert kept["flops_per_s"] > 0 and f"{PROBE_N}x{PROBE_N}" in kept["how"] and "probe" in kept["note"]


@pytest.mark.parametrize("window", ["32,9", "33", "33,x", "0,9"])
def test_explain_checks_refuses_a_bad_refinement_window(window, tmp_path):
    r = _bench(["explain-checks", "--bundle", str(tmp_path), "--cohort", str(tmp_path), "--window", window,
                "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--window" in r.output and not (tmp_path / "x").exists()

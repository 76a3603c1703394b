"""medblip-bench known-answer: refused with one line when the known-answer models are missing; a smoke run on a
few scans writes the summary, the medblip-eval reports and the controls, and the summary agrees with the
metrics.json it was made from. The run skips until tests/fixtures/known_answer exists
(MEDBLIP_KNOWN_ANSWER_FIXTURES names another folder of the same layout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commands import console_command

FIXTURES = Path(os.environ.get("MEDBLIP_KNOWN_ANSWER_FIXTURES") or Path(__file__).parent / "fixtures" / "known_answer")
N = 6


def _bench(args: list[str]):
    from click.testing import CliRunner

    from medblip_edge.cli import bench_main

    return CliRunner().invoke(bench_main, args)


def test_missing_model_is_one_usage_line_and_writes_nothing(tmp_path):
    (tmp_path / "models" / "t5").mkdir(parents=True)
    (tmp_path / "models" / "t5" / "checkpoint.pth").write_bytes(b"")
    r = _bench(["known-answer", "--fixtures", str(tmp_path / "models"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    line, = r.output.strip().splitlines()
    assert line.startswith("error [usage]") and "t5" in line and "missing llm, training.json" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, named", [(["--formats", "int8,int3"], "int3"), (["--variants", "t5,llama"], "llama")])
def test_unknown_format_or_variant_is_refused(args, named, tmp_path):
    r = _bench(["known-answer", *args, "--fixtures", str(tmp_path), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "error [usage]" in r.output and named in r.output, r.output


@pytest.mark.slow
def test_smoke_run_writes_summary_reports_and_controls(tmp_path):
    if not (FIXTURES / "t5" / "checkpoint.pth").is_file():
        pytest.skip(f"no known-answer checkpoint at {FIXTURES / 't5'} yet")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(console_command("medblip-bench") + [
        "known-answer", "--variants", "t5", "--fixtures", str(FIXTURES), "--n", str(N), "--bootstrap", "100",
        "--group-by", "", "--out", str(out)], capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["suite"] == "known-answer" and "--n 6" in res["command"] and res["machine"]["cpu"]["model"]
    assert res["cohort"]["seed"] == 1000 and res["cohort"]["n"] == N
    t5 = res["variants"]["t5"]
    formats = [b["format"] for b in t5["bundles"]]
    # fp16 is evaluated, or its row says why not; never silently missing
    assert formats[:3] == ["fp32", "int8", "int4"] and ("fp16" in formats) != ("fp16" in t5["not_evaluated"])
    for b in t5["bundles"]:
        assert b["evaluated"] == N and b["failed"] == 0 and not b["random_weights"]
        assert 0 <= b["balanced_accuracy"]["value"] <= 1 and 0 <= b["label_agreement"] <= 1
    assert t5["bundles"][0]["verdict"] == "reference" and t5["bundles"][0]["label_agreement"] == 1.0
    assert {b["verdict"] for b in t5["bundles"][1:]} <= {"non-inferior", "not shown non-inferior"}
    assert [c["control"] for c in t5["controls"]] == ["noise images, no patient text", "labels shuffled (fp32 rows)"]
    assert [c["control"] for c in t5["halves"]] == ["image only: held-out scans, patient text emptied",
                                                    "text only: noise images, held-out patient texts"]
    assert all(c["evaluated"] == N for c in t5["halves"])

    # the summary is the metrics.json medblip-eval wrote: same figures, same verdicts, same agreement
    metrics = json.loads((out / "t5" / "metrics.json").read_text())
    assert [b["bundle"] for b in metrics["bundles"]] == formats
    assert metrics["provenance"]["command"].startswith("medblip-eval cohorts/held-out/cohort.csv --bundle bundles/t5/fp32 "
                                                       "--bundle bundles/t5/int8 --bundle bundles/t5/int4")
    assert metrics["provenance"]["command"] == t5["eval_command"]
    summary = (out / "summary.md").read_text()
    for b, row in zip(metrics["bundles"], t5["bundles"]):
        ba = b["rules"]["sum"]["figures"]["balanced_accuracy"]
        assert row["balanced_accuracy"] == {k: ba[k] for k in ("value", "ci_low", "ci_high")}
        cell = f"{ba['value']:.3f} [{ba['ci_low']:.3f}, {ba['ci_high']:.3f}]"
        assert f"| {b['bundle']} | {cell} |" in summary
        if "comparison" in b:
            assert row["verdict"] == b["comparison"]["verdict"]
            assert row["label_agreement"] == b["comparison"]["label_agreement"]
    for kind in ("t5", "t5-noise", "t5-shuffled", "t5-image-only", "t5-text-only"):
        html = (out / kind / "report.html").read_text()
        assert "<img" in html and "data:image/png;base64," in html
    shuffled = json.loads((out / "t5-shuffled" / "metrics.json").read_text())["bundles"][0]
    noise = json.loads((out / "t5-noise" / "metrics.json").read_text())["bundles"][0]
    assert shuffled["evaluated"] == noise["evaluated"] == N
    # the shuffled control reads fp32's rows again: the same predictions, other labels
    rows = [json.loads(x) for x in (out / "t5" / "fp32" / "rows.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (out / "t5-shuffled" / "fp32" / "rows.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [r["label"] for r in again]
    assert sorted(r["true_label"] for r in rows) == sorted(r["true_label"] for r in again)
    assert not list(out.glob("*/*/infer-rows.jsonl"))  # rows.jsonl holds each row with its label


def test_a_format_not_evaluated_gets_a_row_saying_why():
    """fp16 where the export cannot run it on the CPU: a row with the reason, as wide as the figures' rows."""
    from medblip_edge.benchmarks.known_answer import variant_table

    fig = {"value": 0.9, "ci_low": 0.85, "ci_high": 0.95}
    res = {"bundles": [{"format": "fp32", "failed": 0, "balanced_accuracy": fig, "macro_auc": fig, "ece": fig,
                        "label_agreement": 1.0, "delta_balanced_accuracy": None, "verdict": "reference"},
                       {"format": "int8", "failed": 2, "balanced_accuracy": fig, "macro_auc": None, "ece": None,
                        "label_agreement": 0.96, "verdict": "not shown non-inferior",
                        "delta_balanced_accuracy": {"value": -0.01, "ci_low": -0.04, "ci_high": 0.02}}],
           "not_evaluated": {"fp16": "exported, but the export could not run its fp16 LLM graphs on this CPU (x)"}}
    lines = variant_table(res).splitlines()
    assert [line.count("|") for line in lines] == [7] * 5
    assert lines[2] == "| fp32 | 0.900 [0.850, 0.950] | 0.900 [0.850, 0.950] | 0.900 | 1.000 | reference |"
    assert lines[3] == ("| int8 (2 scans failed) | 0.900 [0.850, 0.950] | - | - | 0.960 | not shown non-inferior "
                        "(Δ -0.010 [-0.040, 0.020]) |")
    assert lines[4].startswith("| fp16 | not evaluated: exported, but the export could not run")

"""The Python API example (docs/guides/python-api.md) runs as written; the README's CI command is the one .ci/run executes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
API_PAGE = README.parent / "docs" / "guides" / "python-api.md"


def block(name: str, page: Path = README) -> str:
    m = re.search(rf"<!-- {name}:start -->\s*```\w*\n(.*?)```\s*<!-- {name}:end -->", page.read_text(), re.S)
    assert m, f"{page.relative_to(README.parent)} has no {name} block"
    return m.group(1)


@pytest.mark.slow
def test_api_example_runs(tmp_path, mni_path):
    code = block("api-example", API_PAGE)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = r.stdout.strip().splitlines()[-2:]
    assert "'vision': 'ort'" in first and re.search(r"\b(AD|MCI|NC)\b", first)
    assert re.match(r"(AD|MCI|NC) ", second)
    assert (tmp_path / "demo-bundle" / "manifest.json").is_file()


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "test-command:start" in ci and "pytest" in block("test-command")
    assert block("main-command").count("medblip-export") == 1 and "medblip-infer" in block("main-command")


@pytest.mark.parametrize("cmd", ["medblip-export", "medblip-infer", "medblip-bench"])
def test_help_explains(cmd):
    from click.testing import CliRunner

    from medblip_edge import cli

    fn = {"medblip-export": cli.export_main, "medblip-infer": cli.infer_main, "medblip-bench": cli.bench_main}[cmd]
    r = CliRunner().invoke(fn, ["--help"])
    assert r.exit_code == 0 and "--out" in r.output and len(r.output.splitlines()) > 10

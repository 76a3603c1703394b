"""benchmarks/same_export.sh: the check behind "the paper-size graphs are the ones measured before" exports a
preset with the code at a commit and with the installed code, and compares the files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "same_export.sh"


def _clean_checkout() -> bool:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return False
    r = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == ""


def _worktrees() -> str:
    return subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(not _clean_checkout(), reason="needs a git checkout whose tracked files are as committed (CI's "
                                                 "fresh clone): HEAD and the working tree must be the same code")
def test_head_and_working_tree_export_the_same_bundle(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    worktrees = _worktrees()
    r = subprocess.run(["bash", str(SCRIPT), "HEAD", "tiny", str(tmp_path / "same"), "--llm-quant", "int8"],
                       cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.startswith("same: ")
    old = (tmp_path / "same" / "old.sha256").read_text().splitlines()
    assert old == (tmp_path / "same" / "new.sha256").read_text().splitlines()
    names = {line.split()[1] for line in old}
    assert {name.split("/")[1] for name in names} >= {"llm", "vision", "torch", "tokenizer"}  # every artifact
    assert "./manifest.json" not in names  # it records times, so it never matches
    assert _worktrees() == worktrees, "the temporary worktree of REV is removed"


def test_usage_without_arguments():
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "same_export.sh REV PRESET OUT" in r.stdout

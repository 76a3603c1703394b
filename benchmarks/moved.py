"""The benchmarks' old module paths (`python -m medblip_edge.benchmarks.X ...`): each says which suite of
`medblip-bench` it became, then runs it with the same arguments, or names the new command and exits 2 where
the arguments changed."""

from __future__ import annotations

import os
import shlex
import sys


def _say(command: str) -> None:
    print(f"moved: use `{command}`", file=sys.stderr, flush=True)


def forward(suite: str) -> None:
    """The old arguments mean the same to the suite: say so in one line, then run it in this process's place."""
    args = sys.argv[1:]
    _say(shlex.join(["medblip-bench", suite, *args]))
    os.execv(sys.executable, [sys.executable, "-m", "medblip_edge.cli_bench", suite, *args])


def gone(command: str) -> None:
    """The old tool's arguments do not carry over: name the command that does its work, exit 2."""
    _say(command)
    sys.exit(2)

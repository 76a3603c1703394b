"""How tests call the real console scripts: the installed entry point, or the same function via python -c."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def console_command(name: str) -> list[str]:
    """`medblip-infer` -> the argv prefix that runs it (`infer_main` in medblip_edge.cli when not installed)."""
    script = Path(sys.executable).with_name(name)
    if script.is_file():
        return [str(script)]
    found = shutil.which(name)
    func = name.replace("medblip-", "") + "_main"
    return [found] if found else [sys.executable, "-c", f"from medblip_edge.cli import {func}; {func}()"]

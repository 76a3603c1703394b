"""Fixtures shared by the test modules: a tiny demo bundle (built once per session) and a real volume."""

from __future__ import annotations

from pathlib import Path

import pytest

from commands import console_command
from volumes import real_volume


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A `--preset tiny --no-onnx` bundle (random weights, torch backend only; ~10 s to export)."""
    from medblip_edge.export.run import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("tiny-bundle") / "tiny"
    export_bundle(ExportOptions(out=out, preset="tiny", onnx=False), quiet=True)
    return out


@pytest.fixture(scope="session")
def mni_path() -> Path:
    """The MNI152 T1 template shipped in nilearn's wheel (skips when nilearn is not installed)."""
    path = real_volume("mni_t1")
    if path is None:
        pytest.skip("nilearn's MNI152 T1 template is not installed")
    return path


@pytest.fixture(scope="session")
def infer_cmd() -> list[str]:
    """The real `medblip-infer` command."""
    return console_command("medblip-infer")

"""The documentation: a short README, committed result paths that exist, a nav that lists every page,
generated reference pages that cover the code, and a strict mkdocs build."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"

# a committed result folder or file named in the text: benchmarks/results/... (today) or results/...
RESULT_PATH = re.compile(r"(?<![\w./-])((?:benchmarks/)?results/[A-Za-z0-9_.*/-]*[A-Za-z0-9_*/])")
PLACEHOLDER = re.compile(r"[A-Z]+")  # benchmarks/results/DIR in a command line is not a committed path


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mkdocs_config() -> dict:
    return yaml.safe_load(MKDOCS_YML.read_text(encoding="utf-8"))


def nav_files(nav) -> list[str]:
    out = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out.extend(nav_files(value) if isinstance(value, list) else [value])
    return out


def test_readme_is_short():
    words = len(README.read_text(encoding="utf-8").split())
    assert words <= 1600, f"README.md has {words} words; move detail into docs/"


def test_result_paths_exist():
    found, missing = set(), []
    for page in [README, *pages()]:
        for m in RESULT_PATH.finditer(page.read_text(encoding="utf-8")):
            path = m.group(1).rstrip("/")
            if any(PLACEHOLDER.fullmatch(part) for part in path.split("/")):
                continue
            found.add(path)
            if not (glob.glob(str(ROOT / path)) if "*" in path else (ROOT / path).exists()):
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert len(found) >= 10, f"only {len(found)} result paths found; is the pattern still right?"
    assert not missing, "result paths that are not in the repository:\n" + "\n".join(missing)


def test_nav_lists_every_page():
    listed = nav_files(mkdocs_config()["nav"])
    on_disk = {p.relative_to(DOCS).as_posix() for p in pages()}
    assert len(listed) == len(set(listed)), "a page is listed twice in the nav"
    assert not set(listed) - on_disk, f"nav entries without a file: {sorted(set(listed) - on_disk)}"
    assert not on_disk - set(listed), f"pages missing from the nav: {sorted(on_disk - set(listed))}"


def test_build_is_strict_about_links():
    cfg = mkdocs_config()
    assert cfg["strict"] is True
    v = cfg["validation"]
    assert v["links"]["not_found"] == v["links"]["anchors"] == v["nav"]["not_found"] == "warn"
    assert v["nav"]["omitted_files"] == v["omitted_files"] == "warn"


def test_readme_links_exist():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_generated_cli_reference_covers_every_option():
    """In a fresh interpreter: the hook renders every console script from cli.py, and every benchmark suite, without
    the runtime (torch alone comes with the suites)."""
    code = ("import importlib.util, json, sys\n"
            "import click\n"
            f"spec = importlib.util.spec_from_file_location('h', {str(DOCS / 'hooks.py')!r})\n"
            "h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)\n"
            "md = h.cli_reference()\n"
            "heavy = sorted(m for m in ('onnxruntime', 'transformers', 'ray') if m in sys.modules)\n"
            "opts = {}\n"
            "for name, cmd in h.commands().items():\n"
            "    opts[name] = [o for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts]\n"
            "print(json.dumps({'heavy': heavy, 'md': md, 'opts': opts}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["heavy"] == [], f"the CLI reference imported {out['heavy']}"
    suites = {f"medblip-bench {s}" for s in ("pipeline", "decode-formats", "vision-forms", "gunzip", "serve-load",
                                             "ray-cohort", "export-quality", "node-load", "known-answer", "qc",
                                             "explain", "explain-checks", "quantization")}
    assert set(out["opts"]) == {"medblip-export", "medblip-infer", "medblip-bench", "medblip-serve",
                                "medblip-eval", "medblip-node", "medblip-profile"} | suites
    for name, opts in out["opts"].items():
        assert f"## {name}\n" in out["md"]
        section = out["md"].split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        for opt in opts:
            assert f"`{opt}`" in section, f"{name} {opt} missing from the CLI reference"


def test_generated_error_codes_cover_the_bad_input_table():
    hooks = load_hooks()
    codes = hooks.error_codes()
    table = hooks.bad_inputs_table()
    expected = set(re.findall(r"error `([a-z_]+)`", table))
    assert expected and not expected - set(codes), f"codes in the bad-input table not found: {expected - set(codes)}"
    for code in ("missing_decoder", "too_large", "body_too_large", "unsupported_media_type", "hash_mismatch",
                 "unsafe_checkpoint", "usage", "timeout", "internal_error"):
        assert code in codes, code
    rendered = hooks.error_codes_table()
    assert rendered.count("\n") == len(codes) + 2 and "STATUS_" not in rendered


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs-material is not installed (pip install -e '.[docs]')")
def test_mkdocs_build_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(MKDOCS_YML),
                        "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    cli = (tmp_path / "site" / "reference" / "cli.html").read_text(encoding="utf-8")
    assert "medblip-infer" in cli and "--include-paths" in cli and "generated:cli" not in cli
    codes = (tmp_path / "site" / "reference" / "error-codes.html").read_text(encoding="utf-8")
    assert "corrupt_gzip" in codes and "generated:error-codes" not in codes


# a source file named with its folder: model/scoring.py, runtime/factory.py, tests/test_docs.py, ...
SOURCE_PATH = re.compile(r"(?<![\w./-])((?:model|bundle|engines|preprocess|export|runtime|serve|benchmarks|tests|docs)"
                         r"/[A-Za-z0-9_/]+\.(?:py|sh|md))\b")


def test_source_paths_exist():
    """Hand-written pages name files by path; a module that moves must take its mentions with it."""
    found, missing = set(), []
    for page in [README, *pages()]:
        for m in SOURCE_PATH.finditer(page.read_text(encoding="utf-8")):
            found.add(m.group(1))
            if not (ROOT / m.group(1)).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {m.group(1)}")
    assert len(found) >= 20, f"only {len(found)} source paths found; is the pattern still right?"
    assert not missing, "source paths that are not in the repository:\n" + "\n".join(missing)

"""The bad-input corpus (tests/badinputs.py) through the real `medblip-infer` CLI, in one run, and the docs table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from medblip_edge.qc import CODES as QC_CODES
from badinputs import BY_NAME, CASES, README_END, README_START, build_all, child_preexec, markdown_table

TABLE_PAGE = Path(__file__).resolve().parent.parent / "docs" / "inputs" / "bad-inputs.md"


@pytest.fixture(scope="module")
def corpus(tiny_bundle, infer_cmd, tmp_path_factory):
    """Build every case and run the CLI once over all of them: -> (built, rows by case name, completed process)."""
    built = build_all(tmp_path_factory.mktemp("bad-inputs") / "corpus")
    names = [c.name for c in CASES if isinstance(built[c.name], Path)]
    args = [str(built[n]) for n in names]
    proc = subprocess.run([*infer_cmd, "--bundle", str(tiny_bundle), "--workers", "2", "--timeout", "120", *args],
                          capture_output=True, text=True, timeout=900, preexec_fn=child_preexec())
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == len(names), proc.stderr
    return built, dict(zip(names, rows)), proc


def test_one_run_over_the_corpus(corpus):
    built, rows, proc = corpus
    assert proc.returncode == 1, proc.stderr  # some scans failed, none stopped the run
    assert "Traceback" not in proc.stderr
    assert len(proc.stdout.splitlines()) == len(rows)  # one line per row, even for a name with a newline
    for name, row in rows.items():
        assert row["scan"] == (BY_NAME[name].shown or built[name].name)  # file or folder name only, in input order
    n_failed = sum(not BY_NAME[n].ok for n in rows)
    assert f"{len(rows)} scans: {len(rows) - n_failed} ok, {n_failed} failed" in proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(corpus, case):
    built, rows, _ = corpus
    if not isinstance(built[case.name], Path):
        pytest.skip(built[case.name])
    row = rows[case.name]
    if case.ok:
        assert "error" not in row, row.get("error")
        assert row["label"] in ("AD", "MCI", "NC") and abs(sum(row["probabilities"].values()) - 1) < 1e-6
        reader = [w for w in row["warnings"] if w not in QC_CODES]  # the input checks' codes are tested in test_qc.py
        assert bool(reader) == (case.expect == "ok+warning"), row["warnings"]
    else:
        assert set(row) - {"series"} == {"scan", "scan_sha256", "error"}, row
        assert ("series" in row) == (path_is_walked(built[case.name])), row
        assert row["error"]["code"] == case.expect, row["error"]
        message = row["error"]["message"]
        assert message and "\n" not in message and str(built[case.name].parent) not in message
        path = built[case.name]
        readable = path.is_file() and not path.is_symlink() and case.name != "unreadable"
        assert (row["scan_sha256"] is not None) == (readable if case.hashed is None else case.hashed), row


def path_is_walked(path: Path) -> bool:
    """A folder given on the command line is walked: its series' rows carry the series hash from the start."""
    return path.is_dir() and not path.name.endswith((".nii", ".nii.gz"))


def test_partly_nan_warning_gives_the_count(corpus):
    built, rows, _ = corpus
    if not isinstance(built["partly_nan"], Path):
        pytest.skip(built["partly_nan"])
    assert [w for w in rows["partly_nan"]["warnings"] if w not in QC_CODES] == ["153 non-finite voxels set to 0"]


def test_markdown_table_lists_every_case():
    table = markdown_table()
    assert table.count("\n") == len(CASES) + 2
    for case in CASES:
        assert case.input in table and case.does in table


def test_docs_table_is_current():
    text = TABLE_PAGE.read_text(encoding="utf-8")
    assert README_START in text and README_END in text, f"{TABLE_PAGE.name} lost its {README_START} ... {README_END}"
    section = text.split(README_START, 1)[1].split(README_END, 1)[0]
    assert section.strip() == markdown_table().strip(), \
        "run: python tests/badinputs.py, paste it into docs/inputs/bad-inputs.md between the markers"

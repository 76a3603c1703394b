"""Tokenization as the published code's environment (transformers 4.33) did it, read from the LLM folder's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medblip_edge.errors import BundleError, CheckpointError
from medblip_edge.model.llm import family
from medblip_edge.model.prompts import ANSWERS, build_prompt
from medblip_edge.model.tokenizer import TextTokenizer
from medblip_edge.model.tokenizer_build import corpus, t5_tokenizer_json
from medblip_edge.bundle.format import MANIFEST
from medblip_edge.bundle.reader import Bundle

OFFICIAL = Path(__file__).parent / "fixtures" / "official"

TRICKY = [
    "",
    " ",
    "Answer: ",
    "Answer:  ",  # two trailing spaces: runs of spaces collapse to one
    "  leading spaces and\ttabs\nand newlines ",
    "MMSE 23/30, CDR 0.5; APOE-ε4 carrier. Ünïcödé, 脑, 🧠. ",
    "text with </s> inside and <unk> too",
    "The diagnosis is mild cognitive impairment (MCI).",
]


def _texts() -> list[str]:
    cases = json.loads((OFFICIAL / "t5" / "outputs.json").read_text())["cases"]
    return [c["prompt"] for c in cases] + list(ANSWERS.values()) + corpus(60, seed=3) + TRICKY


def test_t5_tokenizer_json_is_written_as_transformers_4_wrote_it():
    """The presets' tokenizer.json comes from spiece.model by the layout of transformers 4.x's converter:
    over the same spiece.model, it gives the ids of the tokenizer.json transformers 4.33 wrote."""
    published = family("t5").read_tokenizer(OFFICIAL / "t5" / "llm")
    ours = TextTokenizer(t5_tokenizer_json(OFFICIAL / "t5" / "llm" / "spiece.model"))
    for text in _texts():
        assert ours.encode(text) == published.encode(text), text
    assert published.encode("Answer: ")[-2:] == [published.tok.token_to_id("▁"), 1]  # the trailing-space token


def test_gpt2_tokenizer_is_the_slow_tokenizers_bpe():
    """BioMedLM's vocab.json + merges.txt as byte-level BPE: the published slow GPT2Tokenizer's ids (fixture)."""
    tok = family("gpt2").read_tokenizer(OFFICIAL / "biomedlm" / "llm")
    fx = json.loads((OFFICIAL / "biomedlm" / "outputs.json").read_text())
    for case in fx["cases"]:
        assert tok.encode(case["prompt"])[:100] == case["prompt_ids"]
    assert tok.encode("x<|endoftext|>y")[1] == tok.tok.token_to_id("<|endoftext|>")  # special, matched whole
    assert tok.decode(tok.encode("Not demented<|endoftext|>")) == "Not demented"  # skipped when decoding


def test_t5_folder_without_tokenizer_json_is_a_clear_error(tmp_path):
    shutil.copy(OFFICIAL / "t5" / "llm" / "spiece.model", tmp_path / "spiece.model")
    with pytest.raises(CheckpointError) as ei:
        family("t5").read_tokenizer(tmp_path)
    assert ei.value.code == "missing_tokenizer"
    assert "tokenizer.json" in str(ei.value) and "transformers 4.33" in str(ei.value)


def test_gpt2_folder_without_vocab_is_a_clear_error(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError) as ei:
        family("gpt2").read_tokenizer(tmp_path)
    assert ei.value.code == "missing_tokenizer" and "merges.txt" in str(ei.value)


def test_unreadable_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError) as ei:
        family("t5").read_tokenizer(tmp_path)
    assert ei.value.code == "bad_tokenizer"


def test_decode_cleans_up_spaces_as_transformers_4():
    tok = family("t5").read_tokenizer(OFFICIAL / "t5" / "llm")
    ids = tok.encode("is it atrophy ? no , it is .")
    assert tok.tok.token_to_id("<unk>") not in ids  # every character is in the tiny vocabulary
    assert tok.decode(ids) == "is it atrophy? no, it is."
    assert TextTokenizer(tok.tok, clean_up_spaces=False).decode(ids) == "is it atrophy ? no , it is ."


def test_bundle_ships_one_tokenizer_json_that_tokenizes_as_the_folder(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    files = [Path(f).name for f in b.artifacts["tokenizer"]["sha256"]]
    assert files == ["tokenizer.json"]
    assert b.artifacts["tokenizer"]["runs_with"] == "tokenizers"
    tok, fam = b.tokenizer(), family(b.config.variant)
    prompt = fam.prompt_ids(tok, build_prompt("The subject is a 70 year old male. "))
    assert prompt[-2:] == [tok.tok.token_to_id("▁"), tok.tok.token_to_id("</s>")]


def test_bundle_of_an_older_schema_says_export_again(tiny_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    m = json.loads((old / MANIFEST).read_text())
    m["schema_version"] = 1
    (old / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError) as ei:
        Bundle.open(old)
    assert ei.value.code == "unknown_schema" and "export the bundle again" in str(ei.value)

"""Text <-> token ids exactly as the published MedBLIP code tokenized: one tokenizer.json run by `tokenizers`.

The published code ran on transformers 4.33 (LAVIS pins it), whose fast tokenizers are the `tokenizers`
library running the folder's tokenizer.json; its BioMedLM variant used the slow GPT-2 tokenizer, which is
the same byte-level BPE over vocab.json + merges.txt. transformers 5 rebuilds T5's tokenizer with a
whitespace-splitting pre-tokenizer that drops the prompt's trailing space (`... Answer: ` -> no `▁` token
before `</s>`), so every prompt comes out one token shorter than those the model was trained on. This
module therefore never goes through transformers' tokenizer classes: the families read the folder's
files (model/llm.py), and the bundle ships one tokenizer.json that this class runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

TOKENIZER_JSON = "tokenizer.json"

# transformers 4.x's `clean_up_tokenization` (on by default there): spaces before punctuation and
# English contractions removed from decoded text.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the one decoding setting transformers kept outside tokenizer.json."""

    def __init__(self, tok, clean_up_spaces: bool = True):
        self.tok, self.clean_up_spaces = tok, clean_up_spaces

    @classmethod
    def load(cls, path: str | Path, clean_up_spaces: bool = True) -> "TextTokenizer":
        """A tokenizer.json file (or a folder holding one)."""
        from tokenizers import Tokenizer

        path = Path(path)
        path = path / TOKENIZER_JSON if path.is_dir() else path
        try:
            return cls(Tokenizer.from_file(str(path)), clean_up_spaces)
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise CheckpointError(f"{path.name}: not a readable tokenizer.json ({str(e).splitlines()[0][:160]})",
                                  code="bad_tokenizer")

    def encode(self, text: str) -> list[int]:
        """text -> ids, with the tokenizer's post-processing (T5 appends `</s>`; GPT-2 adds nothing)."""
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        """ids -> text, special tokens skipped, as transformers 4.x's `decode(skip_special_tokens=True)`."""
        text = self.tok.decode(list(ids), skip_special_tokens=True)
        if self.clean_up_spaces:
            for a, b in _CLEAN_UP:
                text = text.replace(a, b)
        return text

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json into the folder `path`; returns the file."""
        out = Path(path) / TOKENIZER_JSON
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out))
        return out


def clean_up_setting(folder: Path) -> bool:
    """The folder's `clean_up_tokenization_spaces` (tokenizer_config.json); transformers 4.x defaulted to True."""
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            return bool(json.loads(cfg.read_text()).get("clean_up_tokenization_spaces", True))
        except json.JSONDecodeError:
            raise CheckpointError(f"{cfg}: not valid JSON", code="bad_tokenizer")
    return True


def read_tokenizer_json(folder: str | Path, default_specials: tuple[str, ...] = ()) -> TextTokenizer:
    """A fast-tokenizer folder (FLAN-T5's): its tokenizer.json, with the special tokens transformers 4.x
    registered on loading (the class's defaults and those the folder's configs name), which decoding skips."""
    folder = Path(folder)
    if not (folder / TOKENIZER_JSON).is_file():
        raise CheckpointError(
            f"--llm {folder}: no tokenizer.json. The published code tokenized with transformers 4.x's fast "
            "tokenizer, which runs tokenizer.json (FLAN-T5's hub folder has one). Write it with transformers "
            "4.33 (`T5TokenizerFast.from_pretrained(DIR).save_pretrained(DIR)`); transformers 5 writes a "
            "different one that drops the prompt's trailing space.", code="missing_tokenizer")
    out = TextTokenizer.load(folder, clean_up_setting(folder))
    _mark_special(out.tok, folder, default_specials)
    return out


def read_bpe_vocab(folder: str | Path, default_specials: tuple[str, ...] = ("<|endoftext|>",)) -> TextTokenizer:
    """A GPT-2 folder's vocab.json + merges.txt as the slow GPT2Tokenizer reads them: byte-level BPE, no
    prefix space, the vocabulary's special tokens (`<|endoftext|>`, ...) matched whole in the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder = Path(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise CheckpointError(f"--llm {folder}: no vocab.json + merges.txt (the GPT-2 tokenizer files "
                              "BioMedLM's published code reads)", code="missing_tokenizer")
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _mark_special(tok, folder, default_specials)
    return TextTokenizer(tok, clean_up_setting(folder))


def _mark_special(tok, folder: Path, defaults: tuple[str, ...]) -> None:
    """Register as special (matched whole in text, skipped when decoding) the tokenizer class's default
    special tokens and those the folder's special_tokens_map.json / tokenizer_config.json name, when the
    vocabulary has them: what transformers 4.x did when it loaded a tokenizer."""
    from tokenizers import AddedToken

    known = tok.get_vocab()
    names = [t for t in dict.fromkeys([*defaults, *_named_specials(folder)]) if t in known]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])


def _named_specials(folder: Path) -> list[str]:
    names = []
    for f in ("special_tokens_map.json", "tokenizer_config.json"):
        p = folder / f
        if not p.is_file():
            continue
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{p}: not valid JSON", code="bad_tokenizer")
        values = [d.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        values += d.get("additional_special_tokens") or []
        for v in values:
            v = v.get("content") if isinstance(v, dict) else v  # AddedToken dicts or plain strings
            if isinstance(v, str):
                names.append(v)
    return names

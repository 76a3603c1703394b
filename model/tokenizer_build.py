"""Train small tokenizers offline, in the same on-disk formats as FLAN-T5 (SentencePiece) and GPT-2 (byte-level BPE)."""

from __future__ import annotations

import io
import random
from pathlib import Path

from .prompts import ANSWERS, DIAGNOSIS_QUESTION, build_prompt


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Patient-text-like sentences, prompts and the answer strings (no real patient data)."""
    rng = random.Random(seed)
    words = ("the subject is a year old male female with mmse cdr score of education years apoe4 carrier "
             "non carrier memory complaint hippocampal atrophy mild moderate no history of stroke "
             "hypertension diabetes right handed left scan acquired at 3T 1.5T baseline follow up").split()
    out = list(ANSWERS.values()) * 20
    for _ in range(n):
        text = f"The subject is a {rng.randint(55, 95)} year old {rng.choice(['male', 'female'])}. " \
               f"MMSE {rng.randint(10, 30)}, CDR {rng.choice(['0', '0.5', '1', '2'])}. " \
               + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + ". "
        out.append(build_prompt(text, DIAGNOSIS_QUESTION))
    return out


def train_t5_tokenizer(out_dir: Path, vocab_size: int = 256) -> "object":
    """A real spiece.model (unigram; <pad>=0, </s>=1, <unk>=2) loaded as a transformers T5Tokenizer and saved."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    (out_dir / "spiece.model").write_bytes(buf.getvalue())
    tok = T5Tokenizer.from_pretrained(str(out_dir), extra_ids=0)
    tok.save_pretrained(str(out_dir))
    return tok


def train_gpt2_tokenizer(out_dir: Path, vocab_size: int = 384) -> "object":
    """A byte-level BPE (vocab.json + merges.txt, <|endoftext|>=0) loaded as a transformers GPT2Tokenizer and saved."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(out_dir))
    tok = GPT2Tokenizer.from_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return tok


TRAINERS = {"t5": train_t5_tokenizer, "gpt2": train_gpt2_tokenizer}

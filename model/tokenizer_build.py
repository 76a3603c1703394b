"""Train small tokenizers offline and write them as FLAN-T5's and BioMedLM's folders hold theirs.

T5: a SentencePiece unigram `spiece.model` plus the `tokenizer.json` that transformers 4.x's converter
derives from it (the layout of FLAN-T5's hub folder). GPT-2: byte-level BPE `vocab.json` + `merges.txt`.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from .prompts import ANSWERS, DIAGNOSIS_QUESTION, build_prompt
from .tokenizer import TextTokenizer, read_bpe_vocab, read_tokenizer_json

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 in every T5 vocabulary


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


def t5_tokenizer_json(spiece_model: Path):
    """spiece.model -> `tokenizers.Tokenizer` laid out as transformers 4.x's T5 converter writes it: the
    unigram pieces, the model's precompiled normalizer then runs of spaces collapsed, Metaspace with a
    prefix space (a trailing space stays a `▁` token), `</s>` appended, the three specials marked special."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spiece_model.read_bytes())
    vocab = [(p.piece, p.score) for p in proto.pieces]
    tok = Tokenizer(models.Unigram(vocab, proto.trainer_spec.unk_id, False))
    collapse = normalizers.Replace(Regex(" {2,}"), " ")
    charsmap = proto.normalizer_spec.precompiled_charsmap
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap), collapse] if charsmap else [collapse])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    eos = [p.piece for p in proto.pieces].index("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in T5_SPECIALS])
    return tok


def train_t5_tokenizer(out_dir: Path, vocab_size: int = 256) -> TextTokenizer:
    """A real spiece.model (unigram; <pad>=0, </s>=1, <unk>=2) and its tokenizer.json in `out_dir`."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    (out_dir / "spiece.model").write_bytes(buf.getvalue())
    TextTokenizer(t5_tokenizer_json(out_dir / "spiece.model")).save(out_dir)
    return read_tokenizer_json(out_dir)


def train_gpt2_tokenizer(out_dir: Path, vocab_size: int = 384) -> TextTokenizer:
    """A byte-level BPE (vocab.json + merges.txt, <|endoftext|>=0) in `out_dir`."""
    from tokenizers import ByteLevelBPETokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(out_dir))
    return read_bpe_vocab(out_dir)


TRAINERS = {"t5": train_t5_tokenizer, "gpt2": train_gpt2_tokenizer}

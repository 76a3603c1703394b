#!/usr/bin/env python3
"""Generate the "official" fixtures: outputs of the published MedBLIP code itself.

The published training/inference code (github Qybc/MedBLIP, which imports
LAVIS) is run -- imported from the directories given on the command line, never
copied -- at tiny random-weight sizes, in a virtual environment of its own
(transformers 4.33.2, LAVIS's pin; see requirements.txt beside this file). For
each LLM variant (t5, biomedlm) it writes, under OUT/<variant>/:

  checkpoint.pth      torch.save(model.state_dict(), path), as medblip/trainer.py
  llm/                the LLM folder given to the published constructor, less its
                      weight files (the checkpoint holds the LLM weights)
  image_embeds.npy    ln_vision output, every 7th token, float32 [1, 393, 88]
  visual_tokens.npy   t5_proj / proj output, float32 [1, 8, d_llm]
  outputs.json        prompt ids, first-step logits, answer log-likelihoods,
                      the published generate's raw sequence and decoded text

Usage (any python3.11; the outer level is standard library only: it creates
or updates the venv from requirements.txt, then re-runs itself inside it):

  python3.11 tests/official/make_fixtures.py --medblip DIR --lavis DIR \
      --scan PATH --out tests/fixtures/official [--venv DIR]

DIR are work trees of the two GitHub repositories. Their commits are read with
git when DIR is a git checkout, else given with --medblip-commit/--lavis-commit.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements.txt")
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "medblip-edge", "oracle-venv")
STAMP_NAME = ".medblip-oracle-requirements.sha256"
# Installed before the rest: fairscale 0.4.4 (imported by LAVIS's blip2.py via
# clip_vit.py) is an sdist whose build imports torch, so the second step runs
# with --no-build-isolation against the torch installed here.
FIRST_STEP = ("torch", "torchvision")

# The inner run (--inside) continues the outer run's clock.
_T0 = (float(os.environ["MEDBLIP_ORACLE_T0"]) if "--inside" in sys.argv and "MEDBLIP_ORACLE_T0" in os.environ
       else time.time())
os.environ["MEDBLIP_ORACLE_T0"] = repr(_T0)


def log(msg):
    print("[make_fixtures %7.1fs] %s" % (time.time() - _T0, msg), file=sys.stderr, flush=True)


def fail(msg):
    print("make_fixtures: error: %s" % msg, file=sys.stderr, flush=True)
    sys.exit(2)


# --------------------------------------------------------------------------
# Outer level: arguments, sources, venv (standard library only)
# --------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--medblip", required=True, help="work tree of github Qybc/MedBLIP")
    p.add_argument("--lavis", required=True, help="work tree of github salesforce/LAVIS")
    p.add_argument("--scan", required=True, help="NIfTI volume (e.g. nilearn's MNI152 T1 template)")
    p.add_argument("--out", required=True, help="output folder, e.g. tests/fixtures/official")
    p.add_argument("--venv", default=DEFAULT_VENV, help="oracle venv (default %(default)s)")
    p.add_argument("--medblip-commit", help="MedBLIP commit, when --medblip is not a git checkout")
    p.add_argument("--lavis-commit", help="LAVIS commit, when --lavis is not a git checkout")
    p.add_argument("--variants", default="t5,biomedlm", help="comma-separated subset of t5,biomedlm")
    p.add_argument("--gpt2-attn-scaling", choices=("biomedlm", "plain"), default="biomedlm",
                   help="biomedlm (default): scale_attn_by_inverse_layer_idx=true as in "
                        "stanford-crfm/BioMedLM's config; plain: GPT-2's default (false)")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_sources(args):
    if not os.path.isdir(args.medblip):
        fail("--medblip %s: no such directory" % args.medblip)
    if not os.path.isfile(os.path.join(args.medblip, "medblip", "modeling_medblip_t5.py")):
        fail("--medblip %s: not a MedBLIP work tree (no medblip/modeling_medblip_t5.py)" % args.medblip)
    if not os.path.isdir(args.lavis):
        fail("--lavis %s: no such directory" % args.lavis)
    if not os.path.isfile(os.path.join(args.lavis, "lavis", "models", "blip2_models", "blip2.py")):
        fail("--lavis %s: not a LAVIS work tree (no lavis/models/blip2_models/blip2.py)" % args.lavis)
    if not os.path.isfile(args.scan):
        fail("--scan %s: no such file" % args.scan)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in ("t5", "biomedlm"):
            fail("--variants: unknown variant %r (t5, biomedlm)" % v)
    args.medblip_commit = source_commit(args.medblip, args.medblip_commit, "--medblip")
    args.lavis_commit = source_commit(args.lavis, args.lavis_commit, "--lavis")


def source_commit(path, given, flag):
    """The commit a work tree comes from: git's word for a checkout, else --X-commit."""
    inside = subprocess.run(["git", "-C", path, "rev-parse", "--show-toplevel"],
                            capture_output=True, text=True)
    if inside.returncode == 0 and os.path.realpath(inside.stdout.strip()) == os.path.realpath(path):
        head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        if dirty:
            fail("%s %s: the checkout has local changes; fixtures must come from a clean commit" % (flag, path))
        if given and given != head:
            fail("%s-commit %s differs from the checkout's HEAD %s" % (flag, given, head))
        return head
    if not given:
        fail("%s %s is not a git checkout: give its commit with %s-commit SHA" % (flag, path, flag))
    if len(given) != 40 or any(c not in "0123456789abcdef" for c in given.lower()):
        fail("%s-commit %r: expected a 40-hex-digit commit id" % (flag, given))
    return given.lower()


def read_requirements():
    if not os.path.isfile(REQUIREMENTS):
        fail("missing %s" % REQUIREMENTS)
    with open(REQUIREMENTS, "rb") as f:
        raw = f.read()
    pins = [line.split("#")[0].strip() for line in raw.decode().splitlines()]
    pins = [p for p in pins if p]
    for pin in pins:
        if "==" not in pin:
            fail("requirements.txt: %r is not an exact == pin" % pin)
    return hashlib.sha256(raw).hexdigest(), pins


def ensure_venv(venv):
    """Create or update the oracle venv; returns its python."""
    digest, pins = read_requirements()
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, STAMP_NAME)
    if os.path.isfile(python) and os.path.isfile(stamp):
        with open(stamp) as f:
            if f.read().strip() == digest:
                return python
    if not os.path.isfile(python):
        if sys.version_info[:2] != (3, 11):
            fail("creating the oracle venv needs python3.11 (the pins are for CPython 3.11); "
                 "this is %s" % sys.version.split()[0])
        log("creating venv %s" % venv)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    first = [p for p in pins if p.split("==")[0].lower() in FIRST_STEP]
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    log("installing %s (large download from the local wheel cache)" % " ".join(first))
    if subprocess.run(pip + first + ["-c", REQUIREMENTS]).returncode != 0:
        fail("pip could not install %s into %s" % (" ".join(first), venv))
    log("installing the rest of %s" % REQUIREMENTS)
    if subprocess.run(pip + ["--no-build-isolation", "-r", REQUIREMENTS]).returncode != 0:
        fail("pip could not install %s into %s" % (REQUIREMENTS, venv))
    with open(stamp, "w") as f:
        f.write(digest + "\n")
    return python


def outer(argv):
    args = parse_args(argv)
    check_sources(args)
    python = ensure_venv(os.path.abspath(args.venv))
    cmd = [python, os.path.abspath(__file__), "--inside",
           "--medblip", os.path.abspath(args.medblip), "--lavis", os.path.abspath(args.lavis),
           "--scan", os.path.abspath(args.scan), "--out", os.path.abspath(args.out),
           "--venv", os.path.abspath(args.venv),
           "--medblip-commit", args.medblip_commit, "--lavis-commit", args.lavis_commit,
           "--variants", ",".join(args.variants), "--gpt2-attn-scaling", args.gpt2_attn_scaling]
    log("running inside %s" % python)
    return subprocess.run(cmd).returncode


# --------------------------------------------------------------------------
# Tiny sizes, prompts and cases
# --------------------------------------------------------------------------

IMG_SIZE = 224
PATCH_SIZE = 16
VIT = dict(embed_dim=88, depth=2, num_heads=1, mlp_ratio=2.0)
NUM_QUERY_TOKEN = 8
QFORMER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128)
CROSS_ATTENTION_FREQ = 2  # Blip2Base.init_Qformer's default, which MedBLIP uses
T5_SP_VOCAB = 256
GPT2_BPE_VOCAB = 384

QUESTION = "Question: What will this subject be diagnosed with? Answer: "
ANSWERS = {"AD": "Dementia", "MCI": "mild cognitive impairment (MCI)", "NC": "Not demented"}
LONG_TEXT = (
    "The subject is an 81 year old male with 16 years of education, right handed and retired. "
    "MMSE 19, CDR 1.0, CDR sum of boxes 6.5, ADAS-Cog 13 score 31.0, FAQ 17, GDS 2. "
    "He has a history of hypertension, type 2 diabetes and a prior transient ischemic attack. "
    "His mother was diagnosed with dementia in her seventies. APOE4 status: two alleles. "
    "The informant reports progressive memory loss over three years, difficulty managing "
    "finances and getting lost while driving. "
)
PATIENT_TEXTS = ["", "The subject is a 74 year old female. MMSE 23, CDR 0.5. ", LONG_TEXT]

NOISE_SCALE = 0.02       # added to every floating-point tensor ...
NORM_NOISE_SCALE = 0.1   # ... and this much to LayerNorm / T5LayerNorm weights
NOISE_SEED = 1


def corpus():
    """Patient-text-like sentences for training the tiny tokenizers (deterministic)."""
    lines = []
    ages = [55, 61, 67, 70, 72, 74, 78, 81, 85, 89]
    sexes = ["female", "male"]
    mmse = [15, 19, 21, 23, 26, 28, 30]
    cdr = ["0", "0.5", "1.0", "2.0"]
    n = 0
    for a in ages:
        for s in sexes:
            for m in mmse:
                c = cdr[n % len(cdr)]
                n += 1
                text = "The subject is a %d year old %s. MMSE %d, CDR %s. " % (a, s, m, c)
                label = list(ANSWERS.values())[n % 3]
                lines.append(text + QUESTION + label)
                lines.append(text + "The diagnosis is %s." % ["AD", "MCI", "NC"][n % 3])
    for sentence in LONG_TEXT.split(". "):
        lines.append(sentence.strip() + ".")
    lines += [LONG_TEXT + QUESTION, QUESTION] + list(ANSWERS.values())
    lines += ["Education %d years. APOE4 %d alleles. ADAS-Cog 13 score %d.0, FAQ %d." % (e, k, s, f)
              for e, k, s, f in [(12, 0, 9, 1), (14, 1, 17, 5), (16, 2, 24, 11), (18, 1, 31, 17), (20, 0, 40, 23)]]
    history = ["hypertension", "hyperlipidemia", "atrial fibrillation", "coronary artery disease",
               "depression", "anxiety", "hypothyroidism", "osteoarthritis", "sleep apnea",
               "chronic kidney disease", "migraine", "stroke", "head injury", "smoking",
               "alcohol use", "obesity", "glaucoma", "hearing loss", "Parkinson disease"]
    findings = ["mild white matter hyperintensities", "global cortical atrophy",
                "medial temporal lobe atrophy", "enlarged lateral ventricles", "a small lacunar infarct",
                "normal hippocampal volumes", "bilateral hippocampal atrophy", "no acute abnormality"]
    complaints = ["forgets recent conversations", "repeats questions", "misplaces objects",
                  "has word finding difficulty", "is disoriented to time", "needs help with medications",
                  "no longer cooks", "sleeps poorly", "is more irritable", "lives alone",
                  "lives with a spouse", "walks independently"]
    for i, h in enumerate(history):
        f = findings[i % len(findings)]
        c = complaints[i % len(complaints)]
        lines.append("Past medical history includes %s. MRI shows %s. The patient %s." % (h, f, c))
        lines.append("She reports %s and her daughter says she %s." % (h, complaints[(i + 5) % len(complaints)]))
        lines.append("He was treated for %s; neuropsychological testing shows %s." % (h, f))
    return lines


# --------------------------------------------------------------------------
# Inside the venv
# --------------------------------------------------------------------------

def inside(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may come from a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.filterwarnings("ignore")

    import torch
    torch.set_num_threads(1)  # one summation order whatever the core count

    load_sources(args.medblip, args.lavis)
    import transformers
    transformers.logging.set_verbosity_error()

    out_root = os.path.abspath(args.out)
    os.makedirs(out_root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medblip-oracle-") as work:
        os.chdir(work)  # Blip2Base resolves "bert-base-uncased" relative to the cwd
        write_tiny_bert(os.path.join(work, "bert-base-uncased"))
        try:
            volume = load_volume(args.scan)
        except RuntimeError as e:  # SimpleITK's read errors
            fail("--scan %s: the published loader could not read it: %s" % (args.scan, str(e).strip()[:300]))
        log("volume %s sum %.6f" % (tuple(volume.shape), float(volume.double().sum())))
        common = {
            "sources": {"medblip_commit": args.medblip_commit, "lavis_commit": args.lavis_commit},
            "versions": versions(),
            "scan": {"name": os.path.basename(args.scan), "sha256": sha256_file(args.scan)},
            "volume": volume_record(volume),
        }
        for variant in args.variants:
            out_dir = os.path.join(out_root, variant)
            if os.path.isdir(out_dir):
                shutil.rmtree(out_dir)
            os.makedirs(out_dir)
            if variant == "t5":
                run_t5(work, out_dir, volume, common)
            else:
                run_biomedlm(work, out_dir, volume, common, args.gpt2_attn_scaling == "biomedlm")
            os.chdir(work)
        os.chdir(out_root)
    log("done")
    return 0


def load_sources(medblip_dir, lavis_dir):
    """Import path for the published code.

    lavis/__init__.py and lavis/models/__init__.py import LAVIS's whole model
    registry (every model, datasets, processors, tasks): they are bypassed by
    registering these two packages with their real __path__ and no __init__
    code, so that only the modules MedBLIP imports are loaded, unmodified.
    """
    import types
    for path in (lavis_dir, medblip_dir):
        if path not in sys.path:
            sys.path.insert(0, path)
    for name, rel in (("lavis", "lavis"), ("lavis.models", os.path.join("lavis", "models"))):
        pkg_dir = os.path.join(lavis_dir, rel)
        mod = types.ModuleType(name)
        mod.__path__ = [pkg_dir]
        mod.__file__ = os.path.join(pkg_dir, "__init__.py")
        mod.__package__ = name
        sys.modules[name] = mod
    sys.modules["lavis"].models = sys.modules["lavis.models"]


def versions():
    import numpy, SimpleITK, sentencepiece, timm, tokenizers, torch, transformers
    return {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__, "SimpleITK": SimpleITK.Version_VersionString(),
        "timm": timm.__version__, "sentencepiece": sentencepiece.__version__,
    }


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- volume ---------------------------------------------------------------

def load_volume(scan):
    """The published loader on one file: ZeroShotImageDataset.__getitem__.

    Its constructor only reads a CSV into self.df, so the object is made
    without it and given a one-row df; __getitem__ then runs as published
    (SimpleITK read -> astype(float) -> Tensor -> norm_img -> pad_img).
    """
    from medblip.dataset import ZeroShotImageDataset
    ds = object.__new__(ZeroShotImageDataset)
    ds.df = [(scan, "")]
    img, _ = ds[0]
    assert tuple(img.shape) == (1, 1, IMG_SIZE, IMG_SIZE, IMG_SIZE), img.shape
    return img.float().contiguous()


def volume_record(volume):
    import numpy as np
    arr = np.ascontiguousarray(volume.numpy(), dtype=np.float32)
    return {"shape": list(arr.shape), "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
            "sum": float(arr.astype(np.float64).sum())}


# ---- tiny pretrained folders ----------------------------------------------

def write_tiny_bert(folder):
    """A local 'bert-base-uncased' for Blip2Base.init_Qformer / init_tokenizer."""
    import torch
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["the", "subject", "is", "a", "year", "old", "female", "male", "question", "what",
             "will", "this", "be", "diagnosed", "with", "answer", "dementia", "mild", "cognitive",
             "impairment", "not", "demented", "mmse", "cdr", "mci"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,:?()-")
    vocab = specials + words + chars + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    plain = dict(architectures=["BertForMaskedLM"], model_type="bert", vocab_size=len(vocab),
                 hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02,
                 layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute",
                 **QFORMER)
    os.makedirs(folder)
    # Weights: a randomly initialised LAVIS BertLMHeadModel of the config that
    # init_Qformer builds (cross-attention every other layer, query FFN).
    cfg = BertConfig(**plain)
    cfg.encoder_width = VIT["embed_dim"]
    cfg.add_cross_attention = True
    cfg.cross_attention_freq = CROSS_ATTENTION_FREQ
    cfg.query_length = NUM_QUERY_TOKEN
    torch.manual_seed(101)
    BertLMHeadModel(cfg).save_pretrained(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(plain, f, indent=2, sort_keys=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "model_max_length": 512}, f)


WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.bin.index.json",
                "model.safetensors.index.json")


def copy_llm_folder(src, dst):
    """The LLM folder as given to the constructor, less its weight files."""
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        if name not in WEIGHT_FILES:
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def write_tiny_t5(folder):
    """FLAN-T5-like folder: SentencePiece unigram tokenizer + random T5 weights."""
    import io
    import sentencepiece as spm
    import torch
    from transformers import T5TokenizerFast
    from lavis.models.blip2_models.modeling_t5 import T5Config, T5ForConditionalGeneration

    os.makedirs(folder)
    src = folder + "-spm"
    os.makedirs(src)
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, model_type="unigram",
        vocab_size=T5_SP_VOCAB, character_coverage=1.0, num_threads=1,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2)
    with open(os.path.join(src, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    # Written through transformers 4.33's T5TokenizerFast: converts the
    # SentencePiece model to the tokenizer.json FLAN-T5's hub folder carries.
    tok = T5TokenizerFast(vocab_file=os.path.join(src, "spiece.model"), extra_ids=0)
    tok.save_pretrained(folder)
    shutil.rmtree(src)
    tok = T5TokenizerFast.from_pretrained(folder)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
    config = T5Config(
        vocab_size=len(tok), d_model=64, d_kv=32, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, initializer_factor=1.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=True,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        architectures=["T5ForConditionalGeneration"])
    torch.manual_seed(202)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return tok


def write_tiny_gpt2(folder, scale_by_layer):
    """BioMedLM-like folder: byte-level BPE tokenizer + random GPT-2 weights."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2Tokenizer
    from medblip.modeling_gpt2 import GPT2LMHeadModel

    os.makedirs(folder)
    src = folder + "-bpe"
    os.makedirs(src)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(corpus(), vocab_size=GPT2_BPE_VOCAB, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    assert bpe.token_to_id("<|endoftext|>") == 0
    bpe.save_model(src)
    tok = GPT2Tokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"))
    tok.save_pretrained(folder)
    shutil.rmtree(src)
    tok = GPT2Tokenizer.from_pretrained(folder)
    assert tok.eos_token_id == 0 and tok.bos_token_id == 0
    config = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=2,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=scale_by_layer,
        reorder_and_upcast_attn=False, architectures=["GPT2LMHeadModel"])
    torch.manual_seed(303)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return tok


# ---- the published model ---------------------------------------------------

def tiny_vit_factory():
    """Stands in for medblip.eva_vit.create_eva_vit_g (same signature).

    The published function hard-codes ViT-g sizes and downloads EVA weights;
    this builds the published VisionTransformer at tiny sizes with the same
    remaining arguments, and applies the published convert_weights_to_fp16
    when precision == "fp16", as create_eva_vit_g does.
    """
    from functools import partial
    import torch.nn as nn
    from medblip.eva_vit import VisionTransformer, convert_weights_to_fp16

    def create_eva_vit_g(img_size=256, patch_size=28, drop_path_rate=0.4, use_checkpoint=False,
                         precision="fp16"):
        model = VisionTransformer(
            img_size=img_size, patch_size=patch_size, use_mean_pooling=False,
            embed_dim=VIT["embed_dim"], depth=VIT["depth"], num_heads=VIT["num_heads"],
            mlp_ratio=VIT["mlp_ratio"], qkv_bias=True, drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_checkpoint=use_checkpoint)
        if precision == "fp16":
            convert_weights_to_fp16(model)
        return model
    return create_eva_vit_g


LLM_MODULES = ("t5_model", "lm_model")
LLM_NOISE_FRACTION = 0.5


def add_noise(model):
    """Deterministic noise on every floating-point parameter and buffer, in place,
    in its own dtype, so that zero biases, unit norms and near-uniform attention
    cannot hide a wrong computation: LayerNorm/T5LayerNorm weights get
    NORM_NOISE_SCALE, the image half's Linear/Conv weights 1/sqrt(fan_in)
    (init-scale weights of std 0.02 give attention scores ~0.03, i.e. uniform
    attention, where a wrong softmax scale would barely show), the LLM's matrices
    half their own standard deviation (the LLM folder's init is already the
    model's own scale: T5's unscaled attention with unit-gain q and k would be
    sharper than any trained T5), everything else NOISE_SCALE."""
    import torch
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D
    fan_in = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fan_in[id(w)] = w[0].numel()          # [out, in, *kernel]
        elif isinstance(mod, Conv1D):
            fan_in[id(w)] = w.shape[0]            # GPT-2's Conv1D: [in, out]
    gen = torch.Generator().manual_seed(NOISE_SEED)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, t in tensors:
            if not t.is_floating_point():
                continue
            parts = name.split(".")
            is_norm = parts[-1] == "weight" and any(
                "norm" in p.lower() or p in ("ln_1", "ln_2", "ln_f", "ln_vision") for p in parts[:-1])
            if is_norm:
                scale = NORM_NOISE_SCALE
            elif id(t) in fan_in and parts[0] in LLM_MODULES:
                scale = LLM_NOISE_FRACTION * float(t.float().std())
            elif id(t) in fan_in:
                scale = fan_in[id(t)] ** -0.5
            else:
                scale = NOISE_SCALE
            t.add_((torch.randn(t.shape, generator=gen, dtype=torch.float32) * scale).to(t.dtype))


def build(module, cls, **kwargs):
    import torch
    module.create_eva_vit_g = tiny_vit_factory()  # the name the published module calls
    torch.manual_seed(0)
    model = cls(img_size=IMG_SIZE, patch_size=PATCH_SIZE, num_query_token=NUM_QUERY_TOKEN, **kwargs)
    add_noise(model)
    return model


def dtype_summary(state):
    counts = {}
    for t in state.values():
        counts[str(t.dtype).replace("torch.", "")] = counts.get(str(t.dtype).replace("torch.", ""), 0) + 1
    return dict(sorted(counts.items()))


class Capture:
    """Forward hooks and a wrapper around the LLM instance's generate that record
    what the published generate computes without changing it."""

    def __init__(self, model, proj, embed, lm_head, llm):
        self.handles = []
        self.data = {}
        self.handles.append(model.ln_vision.register_forward_hook(self._keep("image_embeds")))
        self.handles.append(proj.register_forward_hook(self._keep("visual_tokens")))
        self.handles.append(embed.register_forward_hook(self._first_input("embed_ids")))
        self.handles.append(lm_head.register_forward_hook(self._first("first_logits")))
        self.handles.append(lm_head.register_forward_hook(self._append("step_logits")))
        self.llm = llm
        original = llm.generate

        def generate(*a, **kw):
            result = original(*a, **kw)
            self.data["generate_return"] = result
            return result
        llm.generate = generate
        self.original = original

    def _keep(self, key):
        def hook(mod, inputs, output):
            self.data[key] = output.detach().float().clone()
        return hook

    def _first(self, key):
        def hook(mod, inputs, output):
            if key not in self.data:
                self.data[key] = output.detach().float().clone()
        return hook

    def _append(self, key):
        def hook(mod, inputs, output):
            self.data.setdefault(key, []).append(output.detach().float()[0, -1].clone())
        return hook

    def _first_input(self, key):
        def hook(mod, inputs, output):
            if key not in self.data:
                self.data[key] = inputs[0].detach().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.llm.generate = self.original


def greedy_margin(step_logits, new_tokens, eos):
    """Smallest gap between the chosen and the runner-up logit over the greedy
    steps up to the first EOS: how far the fixture's argmaxes are from a tie."""
    import torch
    margins = []
    for logits, token in zip(step_logits, new_tokens):
        assert int(logits.argmax()) == token
        top2 = torch.topk(logits, 2).values
        margins.append(float(top2[0] - top2[1]))
        if token == eos:
            break
    return min(margins)


def floats(t):
    return [float(x) for x in t.reshape(-1).tolist()]


def cut_at_eos(ids, eos):
    return ids[:ids.index(eos)] if eos in ids else ids


IMAGE_EMBEDS_STRIDE = 7  # tokens 0, 7, 14, ... of 2745: every patch row is represented, at 1/7 of the bytes


def save_arrays(out_dir, image_embeds, visual_tokens):
    import numpy as np
    np.save(os.path.join(out_dir, "image_embeds.npy"),
            np.ascontiguousarray(image_embeds[:, ::IMAGE_EMBEDS_STRIDE].numpy(), dtype=np.float32))
    np.save(os.path.join(out_dir, "visual_tokens.npy"),
            np.ascontiguousarray(visual_tokens.numpy(), dtype=np.float32))


def same(a, b, what):
    import torch
    if a.shape != b.shape or not torch.equal(a, b):
        raise AssertionError("%s differs between cases" % what)


def close(a, b, what, tol=1e-5):
    diff = float((a - b).abs().max())
    scale = max(1.0, float(b.abs().max()))
    if diff > tol * scale:
        raise AssertionError("%s: max |diff| %.3g" % (what, diff))
    return diff


def write_outputs(out_dir, record):
    with open(os.path.join(out_dir, "outputs.json"), "w") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
        f.write("\n")


def run_t5(work, out_dir, volume, common):
    import torch
    import medblip.modeling_medblip_t5 as published

    log("t5: tokenizer and LLM folder")
    llm_dir = os.path.join(work, "flan-t5-tiny")
    write_tiny_t5(llm_dir)
    log("t5: building MedBLIPModel_t5")
    model = build(published, published.MedBLIPModel_t5, t5_model=llm_dir)
    state = model.state_dict()
    torch.save(model.state_dict(), os.path.join(out_dir, "checkpoint.pth"))  # as medblip/trainer.py
    copy_llm_folder(llm_dir, os.path.join(out_dir, "llm"))
    dtypes = dtype_summary(state)
    del state

    model.float().eval()
    t5, tok = model.t5_model, model.t5_tokenizer
    start, eos = t5.config.decoder_start_token_id, t5.config.eos_token_id
    answers = {k: {"text": v, "ids": tok(v).input_ids} for k, v in ANSWERS.items()}
    cases, image_embeds, visual_tokens = [], None, None
    for text in PATIENT_TEXTS:
        prompt = text + QUESTION
        cap = Capture(model, model.t5_proj, t5.encoder.embed_tokens, t5.lm_head, t5)
        try:
            generated_text = model.generate({"images": volume, "prompt": [prompt]}, device="cpu")
        finally:
            cap.close()
        d = cap.data
        prompt_ids = tok(prompt, padding="longest").input_ids  # as the published generate
        assert d["embed_ids"][0].tolist() == prompt_ids
        if image_embeds is None:
            image_embeds, visual_tokens = d["image_embeds"], d["visual_tokens"]
        same(d["image_embeds"], image_embeds, "image_embeds")
        same(d["visual_tokens"], visual_tokens, "visual tokens")
        sequence = d["generate_return"].sequences[0].tolist()
        with torch.no_grad():
            ids = torch.tensor([prompt_ids])
            embeds = torch.cat([t5.encoder.embed_tokens(ids), visual_tokens], dim=1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            first = t5(inputs_embeds=embeds, attention_mask=mask,
                       decoder_input_ids=torch.tensor([[start]])).logits[0, 0]
            diff = close(d["first_logits"][0, 0], first, "t5 first-step logits vs generate's first step")
            assert sequence[0] == start
            assert int(first.argmax()) == sequence[1], (int(first.argmax()), sequence[:3])
            loglik, per_token = {}, {}
            for key, ans in answers.items():
                labels = torch.tensor([ans["ids"]])
                res = t5(inputs_embeds=embeds, attention_mask=mask, labels=labels)
                lp = torch.log_softmax(res.logits[0].float(), dim=-1)
                tok_lp = lp[torch.arange(labels.shape[1]), labels[0]]
                close(-tok_lp.mean(), res.loss, "t5 loss vs summed log-probs", tol=1e-5)
                loglik[key] = float(tok_lp.double().sum())
                per_token[key] = floats(tok_lp)
        cases.append({
            "patient_text": text, "prompt": prompt, "prompt_ids": prompt_ids,
            "first_step_logits": floats(first), "answer_loglik": loglik,
            "answer_token_logprobs": per_token, "generate_sequence": sequence,
            "generated_ids": cut_at_eos(sequence[1:], eos), "generated_text": generated_text[0],
            "greedy_min_margin": greedy_margin(d["step_logits"], sequence[1:], eos),
        })
        log("t5: case %d prompt %d tokens, first step max|diff| vs generate %.3g -> %r"
            % (len(cases), len(prompt_ids), diff, generated_text[0]))
    save_arrays(out_dir, image_embeds, visual_tokens)
    cfg = t5.config
    record = dict(variant="t5", **common)
    record["sizes"] = sizes(dtypes, llm={
        "family": "t5", "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff, "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads, "feed_forward_proj": cfg.feed_forward_proj,
        "dense_act_fn_set_by_medblip": cfg.dense_act_fn,
        "decoder_start_token_id": start, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
        "max_new_tokens": 60})
    record["answers"] = answers
    record["cases"] = cases
    write_outputs(out_dir, record)


def run_biomedlm(work, out_dir, volume, common, scale_by_layer):
    import torch
    import medblip.modeling_medblip_biomedlm as published

    log("biomedlm: tokenizer and LLM folder")
    llm_dir = os.path.join(work, "biomedlm-tiny")
    write_tiny_gpt2(llm_dir, scale_by_layer)
    log("biomedlm: building MedBLIPModel_biomedlm")
    model = build(published, published.MedBLIPModel_biomedlm, lm_model=llm_dir)
    state = model.state_dict()
    torch.save(model.state_dict(), os.path.join(out_dir, "checkpoint.pth"))  # as medblip/trainer.py
    copy_llm_folder(llm_dir, os.path.join(out_dir, "llm"))
    dtypes = dtype_summary(state)
    del state

    model.float().eval()
    lm, tok = model.lm_model, model.tokenizer
    eos, filler = lm.config.eos_token_id, lm.config.bos_token_id
    answers = {k: {"text": v, "ids": tok(v).input_ids} for k, v in ANSWERS.items()}
    cases, image_embeds, visual_tokens = [], None, None
    for text in PATIENT_TEXTS:
        prompt = text + QUESTION
        cap = Capture(model, model.proj, lm.transformer.wte, lm.lm_head, lm)
        try:
            generated_text = model.generate({"images": volume, "prompt": [prompt]}, device="cpu")
        finally:
            cap.close()
        d = cap.data
        prompt_ids = tok(prompt, padding="longest", truncation=True,
                         max_length=model.max_txt_len).input_ids  # as the published generate
        assert d["embed_ids"][0].tolist() == prompt_ids
        if image_embeds is None:
            image_embeds, visual_tokens = d["image_embeds"], d["visual_tokens"]
        same(d["image_embeds"], image_embeds, "image_embeds")
        same(d["visual_tokens"], visual_tokens, "visual tokens")
        sequence = d["generate_return"][0].tolist()
        p, q = len(prompt_ids), visual_tokens.shape[1]
        with torch.no_grad():
            prefix = torch.cat([lm.transformer.wte(torch.tensor([prompt_ids])), visual_tokens], dim=1)
            mask = torch.ones(prefix.shape[:2], dtype=torch.long)
            pos = mask.cumsum(-1) - 1  # as prepare_inputs_for_generation
            first = lm(inputs_embeds=prefix, attention_mask=mask, position_ids=pos).logits[0, -1]
            diff = close(d["first_logits"][0, -1], first, "gpt2 first-step logits vs generate's first step")
            assert sequence[0] == filler
            assert int(first.argmax()) == sequence[1], (int(first.argmax()), sequence[:3])
            loglik, per_token = {}, {}
            for key, ans in answers.items():
                a = len(ans["ids"])
                embeds = torch.cat([prefix, lm.transformer.wte(torch.tensor([ans["ids"]]))], dim=1)
                mask_a = torch.ones(embeds.shape[:2], dtype=torch.long)
                logits = lm(inputs_embeds=embeds, attention_mask=mask_a,
                            position_ids=mask_a.cumsum(-1) - 1).logits[0]
                close(logits[p + q - 1], first, "gpt2 answer forward's first row vs first-step logits")
                lp = torch.log_softmax(logits[p + q - 1: p + q + a - 1].float(), dim=-1)
                tok_lp = lp[torch.arange(a), torch.tensor(ans["ids"])]
                loglik[key] = float(tok_lp.double().sum())
                per_token[key] = floats(tok_lp)
        cases.append({
            "patient_text": text, "prompt": prompt, "prompt_ids": prompt_ids,
            "first_step_logits": floats(first), "answer_loglik": loglik,
            "answer_token_logprobs": per_token, "generate_sequence": sequence,
            "generated_ids": cut_at_eos(sequence[1:], eos), "generated_text": generated_text[0],
            "greedy_min_margin": greedy_margin(d["step_logits"], sequence[1:], eos),
        })
        log("biomedlm: case %d prompt %d tokens, first step max|diff| vs generate %.3g -> %r"
            % (len(cases), p, diff, generated_text[0]))
    save_arrays(out_dir, image_embeds, visual_tokens)
    cfg = lm.config
    record = dict(variant="biomedlm", **common)
    record["sizes"] = sizes(dtypes, llm={
        "family": "gpt2", "vocab_size": cfg.vocab_size, "tokenizer_len_with_pad": len(tok),
        "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_positions": cfg.n_positions, "activation_function": cfg.activation_function,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": cfg.reorder_and_upcast_attn,
        "bos_token_id": filler, "eos_token_id": eos, "max_txt_len": model.max_txt_len,
        "generate_max_length": lm.generation_config.max_length})
    record["answers"] = answers
    record["cases"] = cases
    write_outputs(out_dir, record)


def sizes(dtypes, llm):
    return {
        "img_size": IMG_SIZE, "patch_size": PATCH_SIZE,
        "vit": dict(VIT, qkv_bias=True, layer_norm_eps=1e-6, tokens=(IMG_SIZE // PATCH_SIZE) ** 3 + 1,
                    precision="fp16"),
        "qformer": dict(QFORMER, num_query_token=NUM_QUERY_TOKEN, cross_attention_freq=CROSS_ATTENTION_FREQ,
                        layer_norm_eps=1e-12),
        "llm": llm,
        "noise": {"seed": NOISE_SEED, "scale": NOISE_SCALE, "norm_weight_scale": NORM_NOISE_SCALE,
                  "linear_conv_weight_scale": "fan_in ** -0.5 (image half), 0.5 x own std (LLM)"},
        "checkpoint_dtypes": dtypes,
    }


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--inside" in argv:
        a = parse_args(argv)
        a.variants = [v for v in a.variants.split(",") if v]
        sys.exit(inside(a))
    sys.exit(outer(argv))

#!/usr/bin/env python3
"""Train the known-answer models: tiny MedBLIP checkpoints trained by the published code on a synthetic cohort.

The published MedBLIP model classes (github Qybc/MedBLIP, importing LAVIS) are imported from the work trees given
on the command line, in the oracle virtual environment of make_fixtures.py (transformers 4.33.2), and trained with
their own `forward` (its ITC + LM loss) on a cohort written by `python -m medblip_edge.synth` (scans whose class is
set by a planted ventricle enlargement, patient text with a weaker signal). Each checkpoint is saved as the
published trainer saves it, `torch.save(model.state_dict(), path)`, every tensor in the dtype the published
constructor gave it. For each variant, OUT/<variant>/ gets:

  checkpoint.pth   the trained model's state dict
  llm/             the LLM folder given to the published constructor, less its weight files
  training.json    seeds, cohort, hyper-parameters, the training curve, validation figures, sources, versions

Usage (any python3.11; the outer level reuses make_fixtures.py's venv handling):

  python -m medblip_edge.synth --n 1200 --seed 0 --out /tmp/ka-train     # in the project's venv
  python3.11 tests/official/make_known_answer.py --medblip DIR --lavis DIR \\
      --cohort /tmp/ka-train/cohort.csv --out tests/fixtures/known_answer
"""

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_fixtures as mf  # noqa: E402  (same folder: venv, sources, tiny folders, the ViT stand-in)

IMG_SIZE = 224
PATCH_SIZE = 32          # the paper's 3D stem: 7x7x7 patches of 32 voxels
NUM_QUERY_TOKEN = 8
CLASS_OF_LABEL = {"AD": "AD", "MCI": "MCI", "NC": "NC"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--medblip", required=True, help="work tree of github Qybc/MedBLIP")
    p.add_argument("--lavis", required=True, help="work tree of github salesforce/LAVIS")
    p.add_argument("--cohort", required=True, help="training cohort.csv written by python -m medblip_edge.synth")
    p.add_argument("--out", required=True, help="output folder, e.g. tests/fixtures/known_answer")
    p.add_argument("--venv", default=mf.DEFAULT_VENV, help="oracle venv (default %(default)s)")
    p.add_argument("--medblip-commit", help="MedBLIP commit, when --medblip is not a git checkout")
    p.add_argument("--lavis-commit", help="LAVIS commit, when --lavis is not a git checkout")
    p.add_argument("--variants", default="t5,biomedlm", help="comma-separated subset of t5,biomedlm")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (the published default is 2e-5, "
                   "for a pre-trained model; these tiny models start from random weights)")
    p.add_argument("--vision-lr", type=float, help="learning rate of the image encoder's trainable 3D stem (default: "
                   "--lr); its patch embedding has 32,768 inputs per output, so Adam's per-weight step moves each "
                   "token far more than the same rate moves the Q-Former")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    p.add_argument("--unfreeze-llm", action="store_true",
                   help="also train the LLM (the published code freezes it; a random tiny LLM may need it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init-noise", action="store_true",
                   help="after the constructor, add make_fixtures.py's deterministic noise (image-half weights at "
                        "1/sqrt(fan_in)): BERT's 0.02 initialisation of the tiny Q-Former attends uniformly over "
                        "the 344 image tokens, so the visual tokens barely depend on the image and nothing learns")
    p.add_argument("--balanced-batches", action="store_true",
                   help="every batch holds the same number of scans of each class (--batch-size a multiple of 3): "
                        "the ITC loss's in-batch targets then never pair two scans of one class")
    p.add_argument("--no-mmse", action="store_true",
                   help="train on patient texts without their MMSE sentence (the text's strongest class signal), so "
                        "that the image is the only strong one")
    p.add_argument("--init-gain", type=float, default=1.0,
                   help="multiply the Q-Former cross-attention weights (query, key, value, output) by this after "
                        "initialisation: sharper attention and a larger image-dependent part in the query outputs")
    p.add_argument("--init", help="continue from this checkpoint.pth (a saved OUT/<variant>/checkpoint.pth; "
                   "give one variant) instead of the constructor's initialisation")
    p.add_argument("--cache", help="keep the loaded volumes (or, with --frozen-stem, the image encoder's outputs) "
                   "here between runs (a .npy named by the cohort's SHA-256; the encoder outputs also by the encoder's "
                   "weights)")
    p.add_argument("--frozen-stem", action="store_true",
                   help="freeze the 3D stem too, so the whole image encoder is frozen: its output for each scan is "
                        "then fixed, computed once with the encoder and looked up during training (the same values; "
                        "no volume is kept), which lets far more scans and steps run on a CPU")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def outer(argv):
    args = parse_args(argv)
    args.scan = args.cohort                      # make_fixtures' source checks look for a readable file there
    mf.check_sources(args)
    python = mf.ensure_venv(os.path.abspath(args.venv))
    cmd = [python, os.path.abspath(__file__), "--inside",
           "--medblip", os.path.abspath(args.medblip), "--lavis", os.path.abspath(args.lavis),
           "--cohort", os.path.abspath(args.cohort), "--out", os.path.abspath(args.out),
           "--medblip-commit", args.medblip_commit, "--lavis-commit", args.lavis_commit,
           "--variants", ",".join(args.variants), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", repr(args.lr),
           "--vision-lr", repr(args.vision_lr if args.vision_lr is not None else args.lr),
           "--warmup-ratio", repr(args.warmup_ratio),
           "--val-fraction", repr(args.val_fraction), "--seed", str(args.seed), "--threads", str(args.threads)]
    if args.unfreeze_llm:
        cmd.append("--unfreeze-llm")
    if args.cache:
        cmd += ["--cache", os.path.abspath(args.cache)]
    if args.init:
        cmd += ["--init", os.path.abspath(args.init)]
    if args.init_noise:
        cmd.append("--init-noise")
    cmd += ["--init-gain", repr(args.init_gain)]
    if args.no_mmse:
        cmd.append("--no-mmse")
    if args.balanced_batches:
        cmd.append("--balanced-batches")
    if args.frozen_stem:
        cmd.append("--frozen-stem")
    mf.log("running inside %s" % python)
    return subprocess.run(cmd).returncode


# --------------------------------------------------------------------------
# Inside the venv
# --------------------------------------------------------------------------

def read_cohort(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    base = os.path.dirname(os.path.abspath(path))
    for r in rows:
        r["scan"] = os.path.join(base, r["scan"])
        if r["label"] not in CLASS_OF_LABEL:
            mf.fail("%s: label %r is not AD, MCI or NC" % (path, r["label"]))
    return rows


def patient_text(row, no_mmse=False):
    return re.sub(r" MMSE \d+\. ", " ", row["patient_text"]) if no_mmse else row["patient_text"]


def report(row, no_mmse=False):
    """The training report as the published dataset lists carry it: patient text, then the diagnosis sentence."""
    return "%sThe diagnosis is %s." % (patient_text(row, no_mmse), row["label"])


def split(rows, fraction):
    """Every k-th subject of each class to validation (deterministic, stratified)."""
    k = max(2, round(1 / fraction))
    val, seen = [], {}
    for i, r in enumerate(rows):
        seen[r["label"]] = seen.get(r["label"], 0) + 1
        (val if seen[r["label"]] % k == 0 else []).append(i)
    train = [i for i in range(len(rows)) if i not in set(val)]
    return train, val


def epoch_batches(idx, rows, size, balanced, gen):
    """One epoch's batches (sorted indices each): a random order, or with `balanced` one scan per class in turn
    (each class shuffled on its own; the epoch ends with the smallest class)."""
    import torch
    if not balanced:
        order = [idx[i] for i in torch.randperm(len(idx), generator=gen).tolist()]
        return [sorted(order[s * size:(s + 1) * size]) for s in range(len(idx) // size)]
    if size % len(CLASS_OF_LABEL):
        mf.fail("--balanced-batches needs a --batch-size that is a multiple of %d" % len(CLASS_OF_LABEL))
    per = []
    for c in CLASS_OF_LABEL:
        mine = [i for i in idx if rows[i]["label"] == c]
        per.append([mine[j] for j in torch.randperm(len(mine), generator=gen).tolist()])
    order = [i for group in zip(*per) for i in group]
    return [sorted(order[s * size:(s + 1) * size]) for s in range(len(order) // size)]


def load_volumes(rows, path):
    """Every scan through the published loader, kept in a float32 memmap (the loader's exact output)."""
    import numpy as np
    if os.path.isfile(path):
        mf.log("volumes from %s" % path)
        return np.load(path, mmap_mode="r")
    vols = np.lib.format.open_memmap(path + ".part", mode="w+", dtype=np.float32,
                                     shape=(len(rows), 1, IMG_SIZE, IMG_SIZE, IMG_SIZE))
    for i, r in enumerate(rows):
        vols[i] = mf.load_volume(r["scan"])[0].numpy()
        if (i + 1) % 40 == 0 or i + 1 == len(rows):
            mf.log("loaded %d/%d scans with the published loader" % (i + 1, len(rows)))
    vols.flush()
    del vols
    os.replace(path + ".part", path)
    return np.load(path, mmap_mode="r")


def encoder_outputs(encoder, rows, cache):
    """The frozen image encoder's output for every scan (the published loader, then the encoder), float32
    [N, tokens, width]; kept in `cache` under the cohort's and the encoder weights' SHA-256."""
    import numpy as np
    import torch
    digest = hashlib.sha256()
    for k, v in sorted(encoder.state_dict().items()):
        digest.update(k.encode() + v.detach().float().numpy().tobytes())
    path = os.path.join(cache, "encoder-%s-%s.npy" % (rows_digest(rows)[:16], digest.hexdigest()[:16]))
    if os.path.isfile(path):
        mf.log("image encoder outputs from %s" % path)
        return np.load(path)
    encoder.eval()
    out = None
    with torch.no_grad():
        for i, r in enumerate(rows):
            one = encoder(mf.load_volume(r["scan"]))[0].numpy()
            if out is None:
                out = np.empty((len(rows),) + one.shape, np.float32)
            out[i] = one
            if (i + 1) % 100 == 0 or i + 1 == len(rows):
                mf.log("encoded %d/%d scans (published loader, frozen encoder)" % (i + 1, len(rows)))
    with open(path + ".part", "wb") as f:
        np.save(f, out)
    os.replace(path + ".part", path)
    return out


def rows_digest(rows):
    """SHA-256 of the scans' paths and labels, in order (what the encoder outputs are keyed by)."""
    return hashlib.sha256("\n".join("%s\t%s" % (r["scan"], r["label"]) for r in rows).encode()).hexdigest()


def encoder_lookup(outputs):
    """A stand-in for the frozen image encoder that returns its precomputed outputs for the scans in `.rows`
    (set before each call); the placeholder image it is given only carries the batch size."""
    import torch

    class EncoderOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.outputs = torch.from_numpy(outputs)
            self.rows = []

        def forward(self, image):
            assert image.shape[0] == len(self.rows), (image.shape, self.rows)
            return self.outputs[self.rows]

    return EncoderOutputs()


def cpu_image_type():
    """An image tensor whose .cuda() and .half() leave it as it is.

    The published forward starts with `samples["images"].cuda().half()` and relies on a GPU and LAVIS's autocast;
    on a CPU (where maybe_autocast is off) the model trains in fp32 on the same float32 volumes.
    """
    import torch

    class CpuImage(torch.Tensor):
        def cuda(self, *a, **k):
            return self

        def half(self, *a, **k):
            return self.as_subclass(torch.Tensor)

    return CpuImage


class Scorer:
    """Per-class answer log-likelihoods of the model in eval mode (the toolkit's sum rule), for validation."""

    def __init__(self, model, variant):
        self.model, self.variant = model, variant
        self.tok = model.t5_tokenizer if variant == "t5" else model.tokenizer
        self.answers = {k: self.tok(v).input_ids for k, v in mf.ANSWERS.items()}

    def visual_tokens(self, images):
        m = self.model
        embeds = m.ln_vision(m.visual_encoder(images)).float()
        q = m.Qformer.bert(query_embeds=m.query_tokens.expand(images.shape[0], -1, -1),
                           encoder_hidden_states=embeds,
                           encoder_attention_mask=embeds.new_ones(embeds.shape[:2], dtype=None).long(),
                           return_dict=True).last_hidden_state
        return (m.t5_proj if self.variant == "t5" else m.proj)(q)

    def logliks(self, image, text):
        import torch
        vis = self.visual_tokens(image)
        prompt = text + mf.QUESTION
        out = {}
        if self.variant == "t5":
            t5 = self.model.t5_model
            ids = torch.tensor([self.tok(prompt).input_ids])
            embeds = torch.cat([t5.encoder.embed_tokens(ids), vis], dim=1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            for k, a in self.answers.items():
                labels = torch.tensor([a])
                lp = torch.log_softmax(t5(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits[0], -1)
                out[k] = float(lp[torch.arange(len(a)), labels[0]].sum())
        else:
            lm = self.model.lm_model
            ids = self.tok(prompt, truncation=True, max_length=self.model.max_txt_len).input_ids
            prefix = torch.cat([lm.transformer.wte(torch.tensor([ids])), vis], dim=1)
            n = prefix.shape[1]
            for k, a in self.answers.items():
                embeds = torch.cat([prefix, lm.transformer.wte(torch.tensor([a]))], dim=1)
                mask = torch.ones(embeds.shape[:2], dtype=torch.long)
                logits = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=mask.cumsum(-1) - 1).logits[0]
                lp = torch.log_softmax(logits[n - 1:n - 1 + len(a)], -1)
                out[k] = float(lp[torch.arange(len(a)), torch.tensor(a)].sum())
        return out


def evaluate(scorer, images_of, rows, idx, no_mmse=False):
    import torch
    scorer.model.eval()
    correct, per_class = 0, {}
    with torch.no_grad():
        for i in idx:
            ll = scorer.logliks(images_of([i]), patient_text(rows[i], no_mmse))
            pred = max(ll, key=ll.get)
            ok = pred == rows[i]["label"]
            correct += ok
            c = per_class.setdefault(rows[i]["label"], [0, 0])
            c[0] += ok
            c[1] += 1
    return {"accuracy": correct / len(idx),
            "balanced_accuracy": sum(a / b for a, b in per_class.values()) / len(per_class),
            "n": len(idx)}


TEXT_EMBEDDINGS = ("Qformer.bert.embeddings.word_embeddings.", "Qformer.bert.embeddings.position_embeddings.")


def build(published, cls, seed, **kwargs):
    """The published model, with the Q-Former's text embeddings kept for training.

    The published constructor sets `Qformer.bert.embeddings.word_embeddings` and `.position_embeddings` to None
    (the published checkpoint layout has neither), yet its forward runs the Q-Former's text path for the ITC loss,
    which needs them. They are captured as `init_Qformer` made them, put back for training, and left out of the
    saved checkpoint (TEXT_EMBEDDINGS), so the saved layout is the published one.
    """
    import torch
    published.create_eva_vit_g = mf.tiny_vit_factory()   # the name the published module calls
    captured = {}

    class WithTextEmbeddings(cls):
        @classmethod
        def init_Qformer(klass, *a, **k):
            qformer, query_tokens = super().init_Qformer(*a, **k)
            captured["emb"] = (qformer.bert.embeddings.word_embeddings, qformer.bert.embeddings.position_embeddings)
            return qformer, query_tokens

    torch.manual_seed(seed)
    model = WithTextEmbeddings(img_size=IMG_SIZE, patch_size=PATCH_SIZE, num_query_token=NUM_QUERY_TOKEN, **kwargs)
    stored = {k: v.dtype for k, v in model.state_dict().items()}
    model.Qformer.bert.embeddings.word_embeddings, model.Qformer.bert.embeddings.position_embeddings = captured["emb"]
    return model, stored


def without_dropout(bert_dir):
    """The Q-Former's BERT config without dropout (bert-base's is 0.1; the tiny T5 and GPT-2 folders have none).

    The image reaches the LLM as a small variation on near-constant query outputs (the Q-Former starts attending
    almost uniformly over 344 tokens, most of them background); dropout at 0.1 on those hidden states is noise
    several times that variation. Inference runs without dropout either way, so the checkpoint is unaffected."""
    path = os.path.join(bert_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)


def room_for_pad(llm_dir):
    """The published BioMedLM constructor adds a `<PAD>` token to the GPT-2 tokenizer and its forward pads the
    answers of a batch with it, so the embedding needs a row for that id: the tiny GPT-2 folder's embedding is
    resized to the tokenizer's length with its pad token (its other rows unchanged)."""
    from transformers import GPT2LMHeadModel, GPT2Tokenizer
    need = len(GPT2Tokenizer.from_pretrained(llm_dir, pad_token="<PAD>"))
    lm = GPT2LMHeadModel.from_pretrained(llm_dir)
    if lm.config.vocab_size < need:
        lm.resize_token_embeddings(need)
        lm.save_pretrained(llm_dir)


def widen_text_embeddings(model, vocab):
    """The published BioMedLM forward tokenizes the ITC text with the GPT-2 tokenizer and feeds those ids to the
    Q-Former's BERT word embeddings: BioMedLM's 28,896-token vocabulary fits BERT's 30,522 rows, the tiny GPT-2's
    does not fit the tiny BERT's. The (training-only, unsaved) embedding gets rows for every GPT-2 id."""
    import torch
    emb = model.Qformer.bert.embeddings.word_embeddings
    if emb.num_embeddings >= vocab:
        return
    wide = torch.nn.Embedding(vocab, emb.embedding_dim, padding_idx=emb.padding_idx)
    with torch.no_grad():
        wide.weight.normal_(0.0, 0.02)
        wide.weight[:emb.num_embeddings] = emb.weight
    model.Qformer.bert.embeddings.word_embeddings = wide


def train_variant(args, variant, work, rows, vols, common):
    import torch
    from medblip.trainer import Trainer

    if variant == "t5":
        import medblip.modeling_medblip_t5 as published
        llm_dir = os.path.join(work, "flan-t5-tiny")
        if not os.path.isdir(llm_dir):
            mf.write_tiny_t5(llm_dir)
        model, stored_dtypes = build(published, published.MedBLIPModel_t5, args.seed, t5_model=llm_dir)
        llm_module = model.t5_model
    else:
        import medblip.modeling_medblip_biomedlm as published
        llm_dir = os.path.join(work, "biomedlm-tiny")
        if not os.path.isdir(llm_dir):
            mf.write_tiny_gpt2(llm_dir, True)
            room_for_pad(llm_dir)
        model, stored_dtypes = build(published, published.MedBLIPModel_biomedlm, args.seed, lm_model=llm_dir)
        llm_module = model.lm_model
        widen_text_embeddings(model, len(model.tokenizer))
    init = None
    if args.init_noise and not args.init:
        mf.add_noise(model)
        init = {"noise": "make_fixtures.add_noise (seed %d)" % mf.NOISE_SEED}
    if args.init_gain != 1.0 and not args.init:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".crossattention." in name and name.endswith(".weight") and p.dim() == 2:
                    p.mul_(args.init_gain)
        init = dict(init or {}, cross_attention_gain=args.init_gain)
    if args.init:
        state = torch.load(args.init, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith(TEXT_EMBEDDINGS) for k in missing), (missing, unexpected)
        with open(args.init, "rb") as f:
            init = {"checkpoint_sha256": hashlib.sha256(f.read()).hexdigest()}
        prior = os.path.join(os.path.dirname(args.init), "training.json")
        if os.path.isfile(prior):
            with open(prior) as f:
                init["previous"] = json.load(f)["training"]
                f.seek(0)
                init["previous_curve"] = json.load(f)["curve"]
    if args.unfreeze_llm:
        for p in llm_module.parameters():
            p.requires_grad = True
    model.float()                                   # CPU: fp32 compute (see cpu_image_type)
    CpuImage = cpu_image_type()
    encoder, lookup = model.visual_encoder, None
    if args.frozen_stem:
        for p in encoder.parameters():
            p.requires_grad = False
        lookup = encoder_lookup(encoder_outputs(encoder, rows, args.cache or work))
        model.visual_encoder = lookup

    def images_of(batch):
        if lookup is None:
            return torch.from_numpy(vols[batch]).as_subclass(CpuImage)
        lookup.rows = list(batch)
        return torch.zeros(len(batch), 1).as_subclass(CpuImage)

    trainable = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train_idx, val_idx = split(rows, args.val_fraction)
    steps_per_epoch = len(epoch_batches(train_idx, rows, args.batch_size, args.balanced_batches,
                                        torch.Generator().manual_seed(0)))
    total = steps_per_epoch * args.epochs
    # The published trainer's optimiser set-up: AdamW, no decay on biases and LayerNorm weights, WarmupCosine.
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    named = list(model.named_parameters())
    groups = []
    for vision in (False, True):
        part = [(n, p) for n, p in named if n.startswith("visual_encoder.") == vision]
        lr = args.vision_lr if vision else args.lr
        groups += [{"params": [p for n, p in part if not any(nd in n for nd in no_decay)], "weight_decay": 0.01,
                    "lr": lr},
                   {"params": [p for n, p in part if any(nd in n for nd in no_decay)], "weight_decay": 0.0, "lr": lr}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scheduler = Trainer._get_scheduler(optimizer, scheduler="warmupcosine",
                                       warmup_steps=math.ceil(total * args.warmup_ratio), t_total=total)
    scorer = Scorer(model, variant)
    gen = torch.Generator().manual_seed(args.seed)
    curve, t0 = [], time.time()
    mf.log("%s: training %d parameters in %s; %d train / %d validation scans, %d steps"
           % (variant, n_trainable, ",".join(trainable), len(train_idx), len(val_idx), total))
    for epoch in range(args.epochs):
        batches = epoch_batches(train_idx, rows, args.batch_size, args.balanced_batches, gen)
        losses = []
        for s, batch in enumerate(batches):
            images = images_of(batch)
            model.train()
            with contextlib.redirect_stdout(open(os.devnull, "w")):   # the forward prints every sample
                loss = model({"images": images, "reports": [report(rows[i], args.no_mmse) for i in batch]})["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            losses.append(float(loss))
            if (s + 1) % 10 == 0:
                mf.log("%s: epoch %d step %d/%d loss %.4f" % (variant, epoch + 1, s + 1, steps_per_epoch,
                                                            sum(losses[-10:]) / 10))
        val = evaluate(scorer, images_of, rows, val_idx, args.no_mmse)
        curve.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "val": val,
                      "seconds": round(time.time() - t0, 1)})
        mf.log("%s: epoch %d loss %.4f val accuracy %.3f balanced %.3f"
               % (variant, epoch + 1, curve[-1]["loss"], val["accuracy"], val["balanced_accuracy"]))

    model.visual_encoder = encoder
    out_dir = os.path.join(os.path.abspath(args.out), variant)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    state = {k: v.detach().to(stored_dtypes[k]) for k, v in model.state_dict().items()
             if not k.startswith(TEXT_EMBEDDINGS)}
    assert set(state) == set(stored_dtypes), sorted(set(state) ^ set(stored_dtypes))
    torch.save(state, os.path.join(out_dir, "checkpoint.pth"))   # as medblip/trainer.py, in the stored dtypes
    mf.copy_llm_folder(llm_dir, os.path.join(out_dir, "llm"))
    record = dict(variant=variant, **common)
    record.update({
        "model": {"img_size": IMG_SIZE, "patch_size": PATCH_SIZE, "num_query_token": NUM_QUERY_TOKEN,
                  "vit": mf.VIT, "trainable_modules": trainable, "trainable_parameters": n_trainable,
                  "llm_frozen": not args.unfreeze_llm, "stored_dtypes": mf.dtype_summary(state)},
        "training": {"seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                     "vision_lr": args.vision_lr,
                     "optimizer": "AdamW (weight decay 0.01, none on biases and LayerNorm weights)",
                     "scheduler": "published Trainer._get_scheduler('warmupcosine')",
                     "warmup_ratio": args.warmup_ratio, "max_grad_norm": 1.0, "loss": "published forward: ITC + LM",
                     "qformer_dropout": 0.0, "patient_text_mmse": not args.no_mmse,
                     "balanced_batches": args.balanced_batches, "frozen_stem": args.frozen_stem,
                     "text_embeddings": "Q-Former word/position embeddings trained for the ITC text path and "
                                        "left out of the checkpoint, as in the published layout",
                     "compute": "CPU, fp32", "train_scans": len(train_idx), "val_scans": len(val_idx),
                     "seconds": round(time.time() - t0, 1), "continued_from": init},
        "curve": curve,
    })
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    mf.log("%s: wrote %s" % (variant, out_dir))


def inside(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(args.threads)

    mf.load_sources(args.medblip, args.lavis)
    import transformers
    transformers.logging.set_verbosity_error()
    rows = read_cohort(args.cohort)
    with open(args.cohort, "rb") as f:
        cohort_sha = hashlib.sha256(f.read()).hexdigest()
    common = {"sources": {"medblip_commit": args.medblip_commit, "lavis_commit": args.lavis_commit},
              "versions": mf.versions(),
              "cohort": {"csv": os.path.basename(args.cohort), "sha256": cohort_sha, "n": len(rows),
                         "labels": {c: sum(r["label"] == c for r in rows) for c in CLASS_OF_LABEL}}}
    with tempfile.TemporaryDirectory(prefix="medblip-known-answer-") as work:
        os.chdir(work)   # Blip2Base resolves "bert-base-uncased" relative to the cwd
        mf.write_tiny_bert(os.path.join(work, "bert-base-uncased"))
        without_dropout(os.path.join(work, "bert-base-uncased"))
        cache = args.cache or work
        os.makedirs(cache, exist_ok=True)
        vols = (None if args.frozen_stem
                else load_volumes(rows, os.path.join(cache, "volumes-%s.npy" % cohort_sha[:16])))
        for variant in args.variants.split(","):
            train_variant(args, variant, work, rows, vols, common)
        os.chdir(HERE)
    mf.log("done")
    return 0


if __name__ == "__main__":
    if "--inside" in sys.argv:
        sys.exit(inside(parse_args(sys.argv[1:])))
    sys.exit(outer(sys.argv[1:]))

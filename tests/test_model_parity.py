"""Our MedBlip against a literal re-implementation of REFERENCE.md, and the checkpoint loader's contract."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from medblip_edge.errors import CheckpointError
from medblip_edge.model.checkpoint import infer_config, load_checkpoint, read_llm_config, read_state_dict
from medblip_edge.model.config import preset
from medblip_edge.model.random_init import write_random_checkpoint


def _load_literal():
    # Imported by path, so this works whether or not tests/ is a package.
    spec = importlib.util.spec_from_file_location("_medblip_literal_reference",
                                                  Path(__file__).with_name("literal_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


literal = _load_literal()
literal_visual_tokens = literal.literal_visual_tokens

PRESETS = ("tiny", "tiny-biomedlm")
TOL = 1e-4
SENSITIVE = 20 * TOL  # a change this big in the output is far outside the parity tolerance
PROJ = {"t5": "t5_proj.", "gpt2": "proj."}
LLM = {"t5": "t5_model.", "gpt2": "lm_model."}


def _discriminating(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make the random checkpoint able to catch wiring errors, keeping every key, shape and storage dtype.

    The random init leaves every LayerNorm at (1, 0), the Q-Former's biases at 0 and its weights at
    std 0.02 (near-uniform attention, sublayers tiny next to the residual), and its patch filters see
    only the mean of a uniform-noise volume; so swapped LayerNorms, lost biases, a wrong attention
    scale or a broken image path would barely move the output. Give those tensors useful values.
    """
    g = torch.Generator().manual_seed(123)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point() or k.startswith(tuple(LLM.values())):
            out[k] = v
            continue
        new = v
        if re.search(r"(LayerNorm|norm\d|ln_vision)\.weight$", k):
            new = 1.0 + 0.2 * torch.randn(v.shape, generator=g)
        elif k.endswith(".bias") or k.endswith("_bias"):
            new = 0.1 * torch.randn(v.shape, generator=g)
        elif v.dim() == 2 and k.endswith(".weight"):  # every Linear: unit-gain init, O(1) attention scores
            new = torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5
        elif k == "visual_encoder.patch_embed_3d.proj.weight":  # zero-mean filters: patches differ, not share
            new = v.float() - v.float().mean(dim=(1, 2, 3, 4), keepdim=True)
        out[k] = new.to(v.dtype).contiguous()
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """preset name -> (checkpoint path, llm dir, raw state dict); written once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            ckpt, llm_dir = write_random_checkpoint(preset(name), d)
            sd = _discriminating(torch.load(ckpt, weights_only=True))
            torch.save(sd, ckpt)
            cache[name] = (ckpt, llm_dir, sd)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def volume():
    torch.manual_seed(0)
    return torch.rand(2, 1, 224, 224, 224)


@pytest.fixture(scope="module")
def loaded(ckpts):
    cache = {}

    def get(name: str):
        if name not in cache:
            ckpt, llm_dir, _ = ckpts(name)
            cache[name] = load_checkpoint(ckpt, llm_dir)
        return cache[name]

    return get


# -- parity -------------------------------------------------------------------

@pytest.mark.parametrize("name", PRESETS)
def test_visual_tokens_match_literal_reference(name, ckpts, loaded, volume):
    _, _, sd = ckpts(name)
    model, _ = loaded(name)
    cfg = preset(name)
    with torch.no_grad():
        ours = model.visual_tokens(volume)
    ref = literal_visual_tokens(sd, volume)
    d_llm = cfg.llm["d_model"] if cfg.variant == "t5" else cfg.llm["n_embd"]
    assert ours.shape == ref.shape == (2, cfg.qformer.num_query, d_llm)
    assert ours.dtype == ref.dtype == torch.float32
    assert torch.isfinite(ref).all()
    diff = (ours - ref).abs().max().item()
    assert diff < TOL, f"max abs diff {diff:.3g}"
    # The two volumes give different tokens: the image reaches the output.
    assert (ref[0] - ref[1]).abs().max().item() > SENSITIVE


@pytest.mark.parametrize("name", PRESETS)
def test_parity_is_not_vacuous(name, ckpts, volume):
    """Perturbing one weight, or the head counts read off nothing, moves the literal output far past TOL."""
    _, _, sd = ckpts(name)
    vol = volume[:1]
    ref = literal_visual_tokens(sd, vol)

    def moved(**kw):
        return (literal_visual_tokens(kw.pop("sd", sd), vol, **kw) - ref).abs().max().item()

    for key in ("Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
                "Qformer.bert.encoder.layer.1.output_query.dense.weight",
                "visual_encoder.blocks.1.attn.v_bias",
                "ln_vision.bias"):
        g = torch.Generator().manual_seed(7)
        bumped = dict(sd)
        bumped[key] = (sd[key].float() + 0.05 * torch.randn(sd[key].shape, generator=g)).to(sd[key].dtype)
        assert moved(sd=bumped) > SENSITIVE, key
    assert moved(vit_head_dim=44) > SENSITIVE  # 4 ViT heads instead of 2
    assert moved(qformer_head_dim=32) > SENSITIVE  # 4 Q-Former heads instead of 2


# -- sizes and key accounting -------------------------------------------------

@pytest.mark.parametrize("name", PRESETS)
def test_infer_config_reads_sizes(name, ckpts):
    ckpt, llm_dir, _ = ckpts(name)
    want = preset(name)
    cfg = infer_config(read_state_dict(ckpt), read_llm_config(llm_dir))
    assert cfg.variant == want.variant
    for f in ("width", "depth", "mlp_dim", "patch", "image_size", "heads", "num_patches"):
        assert getattr(cfg.vision, f) == getattr(want.vision, f), f
    for f in ("hidden", "layers", "intermediate", "num_query", "cross_attention_frequency", "heads"):
        assert getattr(cfg.qformer, f) == getattr(want.qformer, f), f


_ALLOWED_UNUSED = {
    "contrastive": re.compile(r"^(vision_proj|text_proj|qa_proj)\.(weight|bias)$|^temp$"),
    "qformer_text": re.compile(r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|"
                               r"^Qformer\.bert\.embeddings\.position_ids$"),
    "gpt2_buffers": re.compile(r"^lm_model\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$"),
}


@pytest.mark.parametrize("name", PRESETS)
def test_unused_keys_are_exactly_the_allowed_ones(name, ckpts, loaded):
    _, _, sd = ckpts(name)
    _, report = loaded(name)
    cfg = preset(name)
    expected = sorted(k for k in sd if any(rx.search(k) for rx in _ALLOWED_UNUSED.values()))
    assert sorted(report.unused) == expected
    counts = {n: sum(1 for k in expected if rx.search(k)) for n, rx in _ALLOWED_UNUSED.items()}
    assert counts["contrastive"] == 7
    assert counts["qformer_text"] == 6 * cfg.qformer.layers + 1
    assert counts["gpt2_buffers"] == (2 * cfg.llm["n_layer"] if cfg.variant == "gpt2" else 0)
    assert report.llm_weights_from == "checkpoint"
    assert report.loaded + len(report.unused) == len(sd)


# -- loader failures ----------------------------------------------------------

def _required_keys(variant: str) -> list[str]:
    return ["visual_encoder.blocks.1.attn.v_bias",
            "Qformer.bert.encoder.layer.1.attention.self.key.bias",
            "Qformer.bert.encoder.layer.0.crossattention.output.LayerNorm.weight",
            PROJ[variant] + "bias",
            LLM[variant] + ("encoder.final_layer_norm.weight" if variant == "t5" else "transformer.ln_f.weight")]


@pytest.mark.parametrize("name", PRESETS)
def test_missing_key_is_named(name, ckpts, tmp_path):
    ckpt, llm_dir, sd = ckpts(name)
    for key in _required_keys(preset(name).variant):
        assert key in sd
        bad = tmp_path / "missing.pth"
        torch.save({k: v for k, v in sd.items() if k != key}, bad)
        with pytest.raises(CheckpointError) as ei:
            load_checkpoint(bad, llm_dir)
        assert key in str(ei.value), (key, str(ei.value))


def test_truncated_checkpoint_is_corrupt(ckpts, tmp_path):
    ckpt, llm_dir, _ = ckpts("tiny")
    data = ckpt.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(cut, llm_dir)
    assert ei.value.code == "corrupt_checkpoint"


_MARKER = "MEDBLIP-TEST-PAYLOAD-RAN-4f1c"


class _Payload:
    """Unpickling this calls print(marker): harmless, but it is code that a weights-only load must refuse."""

    def __reduce__(self):
        return (print, (_MARKER,))


def test_pickled_code_is_refused_and_never_runs(ckpts, tmp_path, capfd):
    ckpt, llm_dir, sd = ckpts("tiny")
    evil = tmp_path / "evil.pth"
    torch.save({**sd, "payload": _Payload()}, evil)
    # The file really carries code: a plain (unsafe) load would run it.
    torch.load(evil, weights_only=False)
    assert _MARKER in capfd.readouterr().out
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(evil, llm_dir)
    assert ei.value.code == "unsafe_checkpoint"
    assert _MARKER not in capfd.readouterr().out


# -- accepted layouts ---------------------------------------------------------

def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", PRESETS)
def test_model_wrapper_and_safetensors_load(name, ckpts, loaded, tmp_path):
    from safetensors.torch import save_file

    _, llm_dir, sd = ckpts(name)
    ref, _ = loaded(name)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": sd}, wrapped)
    _same_weights(load_checkpoint(wrapped, llm_dir)[0], ref)
    st = tmp_path / "checkpoint.safetensors"
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(st))  # clone: no shared storage
    model, report = load_checkpoint(st, llm_dir)
    _same_weights(model, ref)
    assert report.unused == loaded(name)[1].unused


def test_t5_checkpoint_with_gpt2_llm_folder_is_wrong_variant(ckpts):
    ckpt, _, _ = ckpts("tiny")
    _, gpt2_llm, _ = ckpts("tiny-biomedlm")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(ckpt, gpt2_llm)
    assert ei.value.code == "wrong_variant"


@pytest.mark.parametrize("name", PRESETS)
def test_loaded_parameters_are_fp32(name, ckpts, loaded):
    _, _, sd = ckpts(name)
    stored = {v.dtype for v in sd.values()}
    assert {torch.float16, torch.float32} <= stored
    assert (torch.bfloat16 if preset(name).variant == "t5" else torch.float16) in stored
    model, _ = loaded(name)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())

"""Weights as the checkpoint stores them: written block by block, read memory-mapped, computed in fp32 per block.

What lets a paper-size export run on a 24 GiB machine, held to the fp32 model bit for bit at tiny sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medblip_edge.model.evalset import eval_volumes
from medblip_edge.model.checkpoint import load_checkpoint, read_state_dict, to_training_key
from medblip_edge.model.config import preset
from medblip_edge.model.random_init import random_model, storage_dtype, write_random_checkpoint
from medblip_edge.model.stored import fp32_compute, read_safetensors, release, write_safetensors
from medblip_edge.runtime.llm_torch import TORCH_LLMS

PRESETS = ("tiny", "tiny-biomedlm")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = write_random_checkpoint(preset(name), tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _rss() -> int:
    from medblip_edge.export.resources import rss_bytes

    return rss_bytes()


@pytest.mark.parametrize("name", PRESETS)
def test_random_checkpoint_is_the_training_layout_in_stored_dtypes(name, written):
    ckpt, llm_dir = written(name)
    sd = torch.load(ckpt, weights_only=True)  # a plain torch.save file, read as the published code reads it
    model = random_model(load_checkpoint(ckpt, llm_dir)[0].cfg)
    fam = model.family
    for key, value in model.state_dict().items():
        stored = sd[to_training_key(key, fam)]
        assert stored.dtype == storage_dtype(to_training_key(key, fam), fam), key
        assert torch.equal(stored, value.to(stored.dtype)), key  # the same values random_model makes
    assert {torch.float16, torch.float32} <= {v.dtype for v in sd.values()}
    if name == "tiny":  # tied T5 embeddings: one storage, as the trainer's state_dict saves them
        s = [sd[f"t5_model.{k}.weight"].untyped_storage().data_ptr() for k in ("shared", "encoder.embed_tokens")]
        assert s[0] == s[1]


@pytest.mark.parametrize("name", PRESETS)
def test_stored_weights_compute_the_fp32_model_bit_for_bit(name, written):
    ckpt, llm_dir = written(name)
    fp32, _ = load_checkpoint(ckpt, llm_dir)
    stored, _ = load_checkpoint(ckpt, llm_dir, dtype=None)
    assert {p.dtype for p in stored.parameters()} > {torch.float32}  # bf16 / fp16 kept as stored
    volume = eval_volumes(1)
    with torch.inference_mode():
        a = fp32.visual_tokens(volume)
        la, lb = TORCH_LLMS[fp32.cfg.variant](fp32.llm, "fp32"), TORCH_LLMS[fp32.cfg.variant](stored.llm, "fp32")
        sa = la.prefill([5, 6, 7, 1], a)
        with fp32_compute(stored):
            b = stored.visual_tokens(volume)
            sb = lb.prefill([5, 6, 7, 1], b)
            cb, stb = lb.candidate_logits(sb, [[3, 4], [5]]), lb.step(sb, 3)
        assert torch.equal(a, b) and torch.equal(sa.next_logits, sb.next_logits)
        assert np.array_equal(la.candidate_logits(sa, [[3, 4], [5]]), cb) and torch.equal(la.step(sa, 3), stb)
    assert {p.dtype for p in stored.parameters()} > {torch.float32}, "weights back as stored afterwards"


def test_safetensors_written_tensor_by_tensor_and_read_mapped(tmp_path):
    tensors = {"a": torch.randn(300, 700), "b": torch.arange(10, dtype=torch.int64),
               "c": torch.randn(5, 3).to(torch.bfloat16), "empty": torch.zeros(0, 4, dtype=torch.float16)}
    n = write_safetensors(tensors, tmp_path / "w.safetensors")
    assert n == (tmp_path / "w.safetensors").stat().st_size
    from safetensors.torch import load_file

    for back in (read_safetensors(tmp_path / "w.safetensors"), load_file(str(tmp_path / "w.safetensors"))):
        assert back.keys() == tensors.keys()
        assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_release_gives_back_mapped_pages_and_only_those(tmp_path):
    write_safetensors({"w": torch.randn(64, 2**20)}, tmp_path / "big.safetensors")  # 256 MiB
    mapped = read_safetensors(tmp_path / "big.safetensors")["w"]
    total = float(mapped.sum())  # touch every page
    before = _rss()
    release([mapped])
    assert before - _rss() > 200 * 2**20, "the mapped pages left the process"
    assert float(mapped.sum()) == total, "and come back from the file unchanged"
    anon = torch.ones(2**24)
    release([anon])  # an ordinary allocation is not a file mapping: untouched
    assert float(anon.sum()) == 2**24


def test_state_dict_reader_maps_safetensors(written, tmp_path):
    ckpt, _ = written("tiny")
    sd = read_state_dict(ckpt)
    write_safetensors(sd, tmp_path / "c.safetensors", release_after=False)
    again = read_state_dict(tmp_path / "c.safetensors")
    assert all(torch.equal(again[k], v) for k, v in sd.items())

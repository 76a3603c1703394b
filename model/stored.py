"""Weights kept as the checkpoint stores them: memory-mapped, in their stored dtypes, upcast one block at a time.

A paper-size checkpoint is ~8 GB as stored (bf16/fp16 LLM, fp16 ViT Linear layers) and ~16 GB in fp32,
so the export never makes an fp32 copy of the model:

- `read_safetensors` maps a safetensors file and returns tensors that are views of the mapping
  (torch.load(mmap=True) does the same for the training code's `.pth` files);
- `fp32_compute(model)` runs forward passes in fp32 with each block's weights upcast on entry and
  dropped on exit (bf16/fp16 -> fp32 is exact, so outputs are those of the fp32 model, bit for bit);
- `release(tensors)` gives the pages of mapped tensors back to the kernel once a phase is done with
  them (they are re-read from the file if touched again), so resident memory does not accumulate.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE
RELEASE_BATCH = 256 << 20  # bytes written between two releases (each reads /proc/self/maps once)

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file -> {key: tensor viewing the file's mapping} (read-only; nothing copied)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: a stray write never reaches the file
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start) if count else torch.empty(0, dtype=dtype)
        out[key] = t.view(info["shape"])
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, release_after: bool = True) -> int:
    """Write `tensors` tensor by tensor (never all in memory at once); returns bytes written.

    release_after: give back each mapped source tensor's pages once written.
    """
    header, offset = {}, 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    pending, pending_bytes = [], 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
            pending.append(t)
            pending_bytes += t.numel() * t.element_size()
            if release_after and pending_bytes > RELEASE_BATCH:
                release(pending)
                pending, pending_bytes = [], 0
    if release_after:
        release(pending)
    return 8 + len(blob) + offset


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def release(tensors) -> None:
    """Drop the resident pages under `tensors` (whole pages inside each storage). Only storages that view a
    mapped file are touched: their pages come back from the file if read again (never written: the export
    only reads weights), where an ordinary allocation would lose its contents."""
    ranges, madvise = None, None
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.untyped_storage().nbytes():
            continue
        s = t.untyped_storage()
        ptr, n = s.data_ptr(), s.nbytes()
        ranges = _file_ranges() if ranges is None else ranges
        if not any(lo <= ptr and ptr + n <= hi for lo, hi in ranges):
            continue
        lo, hi = -(-ptr // PAGE) * PAGE, (ptr + n) // PAGE * PAGE
        if hi > lo:
            madvise = madvise or _madvise()
            madvise(lo, hi - lo, MADV_DONTNEED)


def _file_ranges() -> list[tuple[int, int]]:
    """[start, end) of every mapping of a file in this process (from /proc/self/maps)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/") and fields[4] != "0":  # inode 0: anonymous
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi))
    return out


def release_module(module: nn.Module) -> None:
    """`release` every parameter and buffer of `module`."""
    release(list(module.parameters()) + list(module.buffers()))


# -- fp32 compute over stored weights ------------------------------------------------

def units(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, whole) for each part whose weights are handled together: every element of a ModuleList
    (a transformer block, whole: a parent may read a child's weight dtype, as T5's FFN does with `wo`), and
    every other module with direct parameters or buffers (those alone)."""
    out = []

    def walk(name: str, module: nn.Module) -> None:
        if module._parameters or module._buffers:
            out.append((name, module, False))
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.ModuleList):
                out.extend((f"{full}.{i}", m, True) for i, m in enumerate(child))
            else:
                walk(full, child)

    walk("", model)
    return out


def _low(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32


@contextmanager
def fp32_compute(model: nn.Module):
    """Forward passes of `model` in fp32 while its weights stay as stored: each unit's weights are upcast
    when it is entered and the fp32 copies dropped when it returns. The copies go into buffers kept for the
    context's duration (one per weight position in a block, reused by every block of that shape), so a
    decode step converts weights without allocating and faulting in fresh pages each time."""
    handles, scratch = [], {}
    for _, unit, whole in units(model):
        if not any(_low(p) for p in (unit.parameters() if whole else unit._parameters.values())):
            continue
        handles.append(unit.register_forward_pre_hook(_upcast(whole, scratch)))
        handles.append(unit.register_forward_hook(_restore, always_call=True))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        scratch.clear()


def _upcast(whole: bool, scratch: dict):
    def hook(unit, args):
        saved = []
        for prefix, m in (unit.named_modules() if whole else [("", unit)]):
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if not _low(t):
                        continue
                    key = (type(unit).__name__, prefix, name, tuple(t.shape))
                    buf = scratch.get(key)
                    if buf is None or buf[1]:  # none yet, or in use by a unit still running
                        buf = scratch[key] = [torch.empty(t.shape, dtype=torch.float32), False]
                    buf[0].copy_(t.detach())
                    buf[1] = True
                    saved.append((store, name, t, buf))
                    up = buf[0]
                    store[name] = nn.Parameter(up, requires_grad=False) if isinstance(t, nn.Parameter) else up
        unit._medblip_stored = saved

    return hook


def _restore(unit, args, output):
    for store, name, t, buf in getattr(unit, "_medblip_stored", ()):
        store[name] = t
        buf[1] = False
    unit._medblip_stored = []
    return output

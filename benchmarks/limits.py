"""This machine's ceilings, measured in the same run: matmul FLOP/s per precision and memory bandwidth."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..runtime.hugepages import collapse_buffer
from .timing import time_calls


def _best_s(fn: Callable[[], object], device: str, reps: int, warmup: int = 1) -> float:
    """Fastest of `reps` timed calls, in seconds (the ceiling is the best the hardware did, not the typical)."""
    return min(time_calls(fn, device, reps, warmup)[0]) / 1e3


def _torch_mm(n: int, dtype: torch.dtype, device: str, reps: int) -> dict:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    s = _best_s(lambda: torch.mm(a, b), device, reps)
    return {"how": f"torch.mm {n}x{n} {str(dtype).replace('torch.', '')}", "flops_per_s": 2 * n**3 / s}


def _torch_int_mm(n: int, device: str, reps: int) -> dict:
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
    b = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
    s = _best_s(lambda: torch._int_mm(a, b), device, reps)
    return {"how": f"torch._int_mm {n}x{n} int8->int32", "flops_per_s": 2 * n**3 / s}


def _ort_matmul_integer(n: int, reps: int) -> dict:
    """uint8 activations x int8 constant weights: the op ONNX Runtime's dynamic INT8 quantization emits."""
    from onnx import TensorProto, helper, numpy_helper

    from ..engines.ort_session import ort_session

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-128, 127, (n, n), dtype=np.int8), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "mmi",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])], [w])
    # an IR version every ORT since 1.15 reads (the onnx package may default to a newer one than ORT knows)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    sess = ort_session(model.SerializeToString(), optimize=False)
    a = rng.integers(0, 255, (n, n), dtype=np.uint8)
    s = _best_s(lambda: sess.run(None, {"A": a}), "cpu", reps)
    return {"how": f"onnxruntime MatMulInteger {n}x{n} u8 x s8->int32", "flops_per_s": 2 * n**3 / s}


PROBE_N = 512  # a product this size takes well under a second even on an emulated path
CEILING_BUDGET_S = 5.0  # per ceiling measurement: longer means the path is too slow to be anyone's ceiling


def _try(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # a precision this build or CPU lacks is a fact to report, not a failure
        return {"how": getattr(fn, "__name__", "?"), "error": str(e).splitlines()[0][:200]}


def _bounded(fn, n: int, reps: int, *args, budget_s: float = CEILING_BUDGET_S, required: bool = False) -> dict:
    """`fn(n, *args, reps)` unless a PROBE_N-sized probe says it would take longer than `budget_s`.

    Some CPUs run a precision through an emulated path (torch's int8 or bf16 GEMM without AVX-512 ran at
    under 2 GOP/s on an AVX2-only EPYC: about a minute per 2048^3 product); the probe catches that within
    a second, and the ceiling is reported as skipped, with the probe's rate, instead of being measured.
    A `required` ceiling (fp32: every floor can fall back to it) is then the probe's own rate instead.
    """
    probe = _try(fn, PROBE_N, *args, 2)
    if "flops_per_s" not in probe:
        return probe
    projected = 2 * n**3 * (reps + 1) / probe["flops_per_s"]
    if projected > budget_s and required:
        return {**probe, "note": f"{n}x{n} would take ~{projected:.0f} s: the {PROBE_N}x{PROBE_N} probe's rate is used"}
    if projected > budget_s:
        return {"how": probe["how"].replace(f"{PROBE_N}x{PROBE_N}", f"{n}x{n}"),
                "skipped": f"a {PROBE_N}x{PROBE_N} probe ran at {probe['flops_per_s'] / 1e9:.2f} GFLOP/s: "
                           f"{n}x{n} x{reps + 1} would take ~{projected:.0f} s (budget {budget_s:.0f} s)",
                "probe_flops_per_s": probe["flops_per_s"]}
    return _try(fn, n, *args, reps)


def matmul_ceilings(device: str, quick: bool) -> dict:
    """{precision: {how, flops_per_s | error}} plus `fastest`: the precision that ran fastest."""
    cuda = device.startswith("cuda")
    n, reps = (4096 if cuda else 2048), (3 if quick else 5)  # a GPU needs bigger products to reach its peak
    out = {"fp32": _bounded(_torch_mm, n, reps, torch.float32, device, required=True),
           "bf16": _bounded(_torch_mm, n, reps, torch.bfloat16, device)}
    if cuda:
        out["fp16"] = _bounded(_torch_mm, n, reps, torch.float16, device)
        out["int8"] = _bounded(_torch_int_mm, n, reps, device)
    else:
        torch_i8 = _bounded(_torch_int_mm, n, reps, device)
        ort_i8 = _bounded(_ort_matmul_integer, n, reps)
        out["int8_torch"], out["int8_ort"] = torch_i8, ort_i8
        # the INT8 ceiling for the ORT rows: ONNX Runtime's integer GEMM (their MatMulNBits kernels multiply in int8)
        out["int8"] = ort_i8 if "flops_per_s" in ort_i8 else torch_i8
    ran = {k: v["flops_per_s"] for k, v in out.items() if "flops_per_s" in v}
    out["fastest"] = max(ran, key=ran.get) if ran else None
    return out


def _stream_rates(src: torch.Tensor, dst: torch.Tensor, device: str, reps: int) -> dict:
    mat, vec = src.view(4096, -1), torch.ones(src.numel() // 4096, device=device)
    return {"copy_bytes_per_s": 2 * src.nbytes / _best_s(lambda: dst.copy_(src), device, reps),
            "read_bytes_per_s": src.nbytes / _best_s(lambda: src.sum(), device, reps),
            "matvec_bytes_per_s": src.nbytes / _best_s(lambda: torch.mv(mat, vec), device, reps)}


def bandwidth(device: str, quick: bool) -> dict:
    """Bytes/s of a large copy (read + write counted), a sum (read) and a matrix-vector product (the decode
    step's access pattern: stream a weight matrix once); `bytes_per_s` is the best of them.

    On CPU each is measured on 4 KiB pages and again after moving the buffers onto 2 MiB pages, as the
    runtime does with its weights (runtime/hugepages.py), so that a floor is never below what the
    machine's best page size allows.
    """
    mib = 256 if quick else 512
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    reps = 3 if quick else 5
    rates = _stream_rates(src, dst, device, reps)
    out = {"how": f"torch copy_, sum and mv over {mib} MiB float32 on {device}, best of {reps}", **rates}
    if device == "cpu":
        moved = [collapse_buffer(t.data_ptr(), t.nbytes) for t in (src, dst)]
        out["huge_pages"] = moved[0].as_json()
        if not moved[0].skipped:
            out["huge_page_rates"] = _stream_rates(src, dst, device, reps)
            rates = {k: max(v, out["huge_page_rates"][k]) for k, v in rates.items()}
    del src, dst
    return {**out, "bytes_per_s": max(rates.values())}


def measure_limits(device: str, quick: bool = False) -> dict:
    """{matmul: {...}, memory: {...}, threads} for the floors; a few seconds on CPU."""
    return {"matmul": matmul_ceilings(device, quick), "memory": bandwidth(device, quick),
            "torch_threads": torch.get_num_threads()}


def best_of(first: dict, second: dict) -> dict:
    """Two measurements of the limits (start and end of a run) -> the higher rate of each, as the ceiling.

    Other work on the machine can only lower a measured rate, so the better of two is the truer limit.
    """
    out = {"torch_threads": first["torch_threads"], "memory": dict(first["memory"]), "matmul": {}}
    if second["memory"]["bytes_per_s"] > first["memory"]["bytes_per_s"]:
        out["memory"] = dict(second["memory"])
    for k, a in first["matmul"].items():
        b = second["matmul"].get(k)
        if k == "fastest" or not isinstance(a, dict):
            continue
        out["matmul"][k] = b if isinstance(b, dict) and b.get("flops_per_s", 0) > a.get("flops_per_s", 0) else a
    ran = {k: v["flops_per_s"] for k, v in out["matmul"].items() if "flops_per_s" in v}
    out["matmul"]["fastest"] = max(ran, key=ran.get) if ran else None
    out["runs"] = [first, second]
    return out


def compute_peak(limits: dict, precision: str) -> tuple[float, str]:
    """FLOP/s ceiling a stage running in `precision` can reach, and which measurement it is.

    int8 and int4 (MatMulNBits at accuracy level 4, as the export writes them) quantize activations to int8
    and multiply in int8, so their compute ceiling is the int8 one; fp16 on a CPU computes in fp32.
    """
    mm = limits["matmul"]
    key = {"int4": "int8", "fp16": "fp16" if "fp16" in mm else "fp32"}.get(precision, precision)
    entry = mm.get(key, {})
    if "flops_per_s" not in entry:
        key, entry = "fp32", mm["fp32"]
    return entry["flops_per_s"], key

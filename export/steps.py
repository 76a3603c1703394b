"""Export steps after the PyTorch weights: each makes one artifact and checks it against the fp32 reference.

A step's `run(ctx)` writes into the bundle only after its check passed; it
returns an optional note for the user (e.g. why TensorRT was skipped).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import MedblipError
from ..model.medblip import image_encoder_of
from ..runtime.llm_ort import ORT_LLMS
from .llm_graphs import LLM_GRAPHS
from .onnx_export import compare, export_onnx, io_spec, ort_session
from .quantize import QUANTIZERS

VISION_TOL = {"fp32": {"max_abs_err": 1e-3, "cosine": 0.9999}, "fp16": {"max_abs_err": 5e-2, "cosine": 0.999}}
LLM_FP32_PROB_TOL = 1e-4


def _copy_graph(files: list[Path], dst_dir: Path) -> list[str]:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst_dir / f.name)
    return [f.name for f in files]


class VisionOnnxStep:
    title = "vision graph -> ONNX (3D ViT + ln_vision + Q-Former + projection), checked with ONNX Runtime"

    def run(self, ctx) -> str | None:
        ref, writer, work = ctx["ref"], ctx["writer"], ctx["work"]
        max_batch = ctx["opts"].max_batch
        path = work / "vision.onnx"
        files = self._export(image_encoder_of(ctx["model"]), path, ref, max_batch)
        sess = ort_session(path)
        parity = self._check(sess, ref, "fp32")
        names = _copy_graph(files, writer.path("vision/x").parent)
        writer.add("vision_onnx", f"vision/{names[0]}", {"data": f"vision/{names[1]}"} if len(names) > 1 else None,
                   kind="onnx", precision="fp32", **io_spec(sess), parity=parity)
        if ctx["opts"].precision == "fp16" or ctx["opts"].trt:
            self._fp16(ctx, path, writer, ref)
        return None

    @staticmethod
    def _export(encoder, path: Path, ref, max_batch: int) -> list[Path]:
        """ImageEncoder is the export wrapper: volume [B,1,S,S,S] float32 -> visual_tokens [B,Q,d] float32."""
        return export_onnx(encoder, (ref.volumes[:2],), path, ["volume"], ["visual_tokens"],
                           {"volume": {0: torch.export.Dim("batch", min=1, max=max(max_batch, 2))}})

    @staticmethod
    def _check(sess, ref, precision: str) -> dict:
        """Run the eval volumes in batches of 2 (exercises the dynamic batch axis); fail if out of tolerance."""
        out = np.concatenate([sess.run(None, {"volume": ref.volumes[i:i + 2].numpy()})[0]
                              for i in range(0, len(ref.volumes), 2)])
        parity = {**compare(out, ref.volume_visual.numpy()), "volumes": len(ref.volumes)}
        tol = VISION_TOL[precision]
        if parity["max_abs_err"] > tol["max_abs_err"] or parity["cosine"] < tol["cosine"]:
            raise MedblipError(f"vision ONNX ({precision}) disagrees with PyTorch: {parity}", code="parity_failed")
        return parity

    def _fp16(self, ctx, src: Path, writer, ref) -> None:
        """fp16 graph for GPUs and TensorRT's strongly typed mode: the ViT in fp16 with fp32 softmax and
        LayerNorm statistics; ln_vision, Q-Former and projection in fp32 (as transformers runs BLIP-2)."""
        dst = writer.path("vision/vision_fp16.onnx")
        files = self._export(image_encoder_of(ctx["model"], torch.float16), dst, ref, ctx["opts"].max_batch)
        extra = {"data": f"vision/{files[1].name}"} if len(files) > 1 else None
        try:
            sess = ort_session(dst)
            parity, io = self._check(sess, ref, "fp16"), io_spec(sess)
        except Exception as e:  # CPU providers lack some fp16 kernels; the figure then comes from the GPU run
            parity, io = {"checked": False, "reason": str(e).splitlines()[0][:160]}, {}
        writer.add("vision_onnx_fp16", "vision/vision_fp16.onnx", extra, kind="onnx", precision="fp16", **io,
                   parity=parity)


class LlmOnnxStep:
    def __init__(self, quant: str):
        self.quant = quant
        self.title = f"LLM graphs -> ONNX ({'fp32' if quant == 'none' else quant}), greedy tokens checked"

    def run(self, ctx) -> str | None:
        model, ref, work = ctx["model"], ctx["ref"], ctx["work"]
        fp32_files, decode = self._export(model.llm, model, work / "llm_fp32")
        fp32 = self._backend(ctx, fp32_files, "fp32")
        parity = {"greedy_tokens_identical": ref.greedy_match(fp32), **ref.compare(fp32)}
        if not parity["greedy_tokens_identical"] or parity["max_abs_prob_diff"] > LLM_FP32_PROB_TOL:
            raise MedblipError(f"fp32 LLM ONNX disagrees with PyTorch: {parity}", code="parity_failed")
        if self.quant == "none":
            return self._ship(ctx, fp32_files, "fp32", parity)
        formats = {}
        if self.quant == "fp16":
            half = model.family.to_half(copy.deepcopy(model.llm), torch.float16)
            shipped, _ = self._export(half, model, work / "llm_fp16", fused=False)
        else:
            formats = {name: QUANTIZERS[self.quant].for_graph(name in decode) for name in fp32_files}
            shipped = {name: self._quantize(files, work / f"llm_{self.quant}", formats[name])
                       for name, files in fp32_files.items()}
        try:
            low = self._backend(ctx, shipped, self.quant)
            result = {**ref.compare(low), "greedy_tokens_identical": ref.greedy_match(low)}
        except Exception as e:  # e.g. fp16 kernels missing on the CPU provider: the GPU run measures it
            result = {"checked": False, "reason": str(e).splitlines()[0][:160]}
        return self._ship(ctx, shipped, self.quant, {**result, "fp32_onnx": parity},
                          {name: f.describe() for name, f in formats.items()})

    @staticmethod
    def _export(llm, model, out: Path, fused: bool = True) -> tuple[dict[str, list[Path]], set[str]]:
        """Every graph of the family -> ({graph name: [file, (external data)]}, names of the decode graphs).

        fused: write the graphs that have an op-by-op fp32 version that way (the fp32 source of the
        fp32/INT8/INT4 LLMs); the fp16 LLM is traced from the half model (fp32 residual stream, fp16 matmuls).
        """
        out.mkdir()
        graphs = LLM_GRAPHS[model.cfg.variant](llm, model.d_llm, model.cfg.qformer.num_query)
        return {g.name: g.export(out / f"{g.name}.onnx", fused) for g in graphs}, {g.name for g in graphs if g.decode}

    @staticmethod
    def _quantize(files: list[Path], out: Path, quantize) -> list[Path]:
        out.mkdir(exist_ok=True)
        dst = out / files[0].name
        quantize(files[0], dst)
        return [p for p in (dst, dst.with_name(dst.name + ".data")) if p.exists()]

    @staticmethod
    def _ship(ctx, graphs: dict[str, list[Path]], precision: str, result: dict,
              formats: dict[str, str] | None = None) -> str | None:
        """Copy the graphs into the bundle and register them as one artifact with its parity figures
        (and, when quantized, each graph's weight format)."""
        out_dir = ctx["writer"].path("llm/x").parent
        extra = {}
        for name, files in graphs.items():
            copied = _copy_graph(files, out_dir)
            extra[name] = f"llm/{copied[0]}"
            if len(copied) > 1:
                extra[name + ".data"] = f"llm/{copied[1]}"
        main = next(iter(extra.values()))
        entry = ctx["writer"].add("llm_onnx", main, extra, kind="onnx", precision=precision,
                                  family=ctx["model"].cfg.variant, graphs=list(graphs), parity=result,
                                  **({"weight_formats": formats} if formats else {}))
        result["bytes_on_disk"] = entry["bytes"]
        if result.get("label_agreement", 1.0) < 1.0:
            return f"{precision} LLM: label agreement {result['label_agreement']:.2f} on the evaluation set"
        return None

    @staticmethod
    def _backend(ctx, files: dict, precision: str):
        llm = ctx["model"].llm
        return ORT_LLMS[ctx["model"].cfg.variant]({n: f[0] for n, f in files.items()}, precision,
                                                  int(llm.config.eos_token_id),
                                                  decoder_start_token_id=getattr(llm.config, "decoder_start_token_id",
                                                                                 0) or 0)


class TrtStep:
    title = "TensorRT FP16 engine of the vision graph"

    def run(self, ctx) -> str | None:
        from .trt_engine import build_engine, trt_available

        reason = trt_available()
        if reason:
            return f"--trt skipped: {reason}; the rest of the bundle is written"
        opts, writer = ctx["opts"], ctx["writer"]
        src = writer.path("vision/vision_fp16.onnx")
        engine = writer.path("trt/vision_fp16.engine")
        meta = build_engine(src, engine, min_batch=opts.min_batch, opt_batch=opts.opt_batch,
                            max_batch=opts.max_batch, timing_cache_path=ctx["work"] / "timing.cache")
        shutil.copy2(ctx["work"] / "timing.cache", writer.path("trt/timing.cache"))
        writer.add("vision_trt", "trt/vision_fp16.engine", {"timing_cache": "trt/timing.cache"}, kind="tensorrt",
                   precision="fp16", **meta)
        return None


def plan_steps(opts) -> list:
    """The steps `opts` asks for, in order."""
    if not opts.onnx:
        if opts.trt or opts.llm_quant != "none":
            raise MedblipError("--no-onnx cannot be combined with --trt or --llm-quant", code="usage")
        return []
    steps = [VisionOnnxStep(), LlmOnnxStep(opts.llm_quant)]
    if opts.trt:
        steps.append(TrtStep())
    return steps

"""Export steps after the PyTorch weights: each makes its artifacts and checks them against the fp32 reference.

A step's `run(ctx)` writes into the bundle's temporary folder and returns a StepResult: the artifacts whose
check passed (the export registers them in the manifest) and an optional note for the user (e.g. why
TensorRT was skipped). Every graph is
written op by op from the weights as stored, one layer at a time, in its final format (export/graphs_*.py),
and each artifact records the time, peak RSS and bytes it took.
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..bundle.format import LLM_ONNX, VISION_INPUT, VISION_ONNX, VISION_ONNX_FP16, VISION_OUTPUT, VISION_TRT
from ..engines.ort_session import ort_session
from ..errors import MedblipError
from ..model.fidelity import check_vision
from ..model.fidelity import compare as compare_tensors
from ..model.medblip import image_encoder_of
from ..model.stored import fp32_compute, release_module
from .context import Artifact, StepResult
from .graphs_vision import VisionWriter
from .gptq import (CALIBRATION_VOLUMES, DAMP, MAX_HESSIAN_BYTES, GptqBlockQuant, calibration_visual, hessian_bytes,
                   hessians)
from .llm_graphs import LLM_GRAPHS
from .mixed import Mixed
from .onnx_builder import WeightFile
from .onnx_export import export_onnx, io_spec
from .parity import engine_visual, ort_llm, torch_llm
from .quantize import FP32, LLM_FORMATS, QUANTIZERS, VISION_FORMATS, BlockQuant, LlmQuant
from .resources import Meter
from .smooth import ALPHAS, Smoothed, activation_maxima
from .speed import llm_times
from .tolerant import (TolerantWrite, allow_out, alternatives_wanted, has_raised_step, mixed_llm, raised_share_of,
                       share_of, tolerance_of)

LLM_FP32_PROB_TOL = 1e-4
FP32_CHECK_BYTES = 4 << 30  # fp32 LLM graphs up to this size are written and held to the strict check first


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _files(graph_files: dict[str, list[Path]], folder: str) -> dict[str, str]:
    """{graph name: bundle-relative path} plus the shared weight file, for the manifest."""
    out = {name: f"{folder}/{files[0].name}" for name, files in graph_files.items()}
    data = {f.name for files in graph_files.values() for f in files[1:]}
    out.update({f"data{i or ''}": f"{folder}/{name}" for i, name in enumerate(sorted(data))})
    return out


class VisionOnnxStep:
    title = "vision graph -> ONNX (3D ViT + ln_vision + Q-Former + projection), checked with ONNX Runtime"

    def run(self, ctx) -> StepResult:
        ref, writer, model, opts = ctx.ref, ctx.writer, ctx.model, ctx.opts
        precision = "int8" if opts.precision == "int8" else "fp32"
        quantization, note = None, None
        with Meter() as meter:
            path = writer.path("vision/vision.onnx")
            if precision == "int8":
                down, quantization, note = self._tolerant(ctx, path.parent)
            else:
                self._write(model, path.parent, FP32)
            release_module(model)
            sess = ort_session(path)
            visual = self._visual(sess, ref)
            io = io_spec(sess)
            del sess
            parity = self._check(visual, ref, precision)
            if precision != "fp32":
                parity["downstream"] = down
        meta = dict(kind="onnx", precision=precision, **io, parity=parity, resources=meter.result)
        if quantization is not None:
            meta["quantization"] = quantization
        made = [Artifact(VISION_ONNX, "vision/vision.onnx", {"data": "vision/vision.data"}, meta)]
        if opts.precision == "fp16" or opts.trt:
            made.append(self._fp16(ctx, writer, ref))
        return StepResult(made, note)

    @staticmethod
    def _write(model, folder: Path, fmt) -> list[Path]:
        path = folder / "vision.onnx"
        with WeightFile(folder / "vision.data") as weights:
            return VisionWriter(model, fmt).write(path, weights) + [weights.path]

    def _tolerant(self, ctx, folder: Path):
        """The INT8 vision graph held to the LLM's tolerance downstream (labels, top-1 and KL of the fp32 LLM run
        on its visual tokens), the most sensitive ViT matmuls kept fp32 until it is met (tolerant.py).
        -> (downstream figures of the shipped graph, quantization record, note)."""
        model = ctx.model

        def compare(files) -> dict:
            sess = ort_session(files[0])
            visual = self._visual(sess, ctx.ref)
            del sess
            return {**self._downstream(ctx, visual), "visual_tokens": compare_tensors(visual,
                                                                                     ctx.ref.volume_visual.numpy())}

        def timer(files) -> dict:
            sess, vol = ort_session(files[0]), ctx.ref.volumes[:1].numpy()
            best = min(_timed(lambda: sess.run(None, {VISION_INPUT: vol})) for _ in range(3))
            return {"vision_ms": round(1e3 * best, 3)}

        job = TolerantWrite("vision graph", "int8", tolerance_of(ctx.opts, "int8"), share_of(ctx.opts),
                            ctx.work / "vision_trial", lambda dst, fmt_of: self._write(model, dst, fmt_of(False)),
                            compare, lambda keep, raised=frozenset(): (lambda decode: Mixed(VISION_FORMATS["int8"],
                                                                                             keep)))
        _, result, record, note = job.run(folder, allow_out(ctx.opts), timer)
        shutil.rmtree(ctx.work / "vision_trial", ignore_errors=True)
        return result, record, note

    @staticmethod
    def _visual(sess, ref) -> np.ndarray:
        """The eval volumes in batches of 2 (exercises the dynamic batch axis) -> [n,Q,d]."""
        return np.concatenate([sess.run(None, {VISION_INPUT: ref.volumes[i:i + 2].numpy()})[0]
                               for i in range(0, len(ref.volumes), 2)])

    @staticmethod
    def _check(visual: np.ndarray, ref, precision: str) -> dict:
        """Visual tokens against the fp32 reference's; fail if out of tolerance."""
        return check_vision(visual, ref.volume_visual.numpy(), precision, "vision ONNX")

    @staticmethod
    def _downstream(ctx, visual: np.ndarray) -> dict:
        """What the reduced-precision visual tokens do to the answers: the fp32 LLM run on them, against the
        reference (labels, probabilities, per-token top-1 and KL), so the figure is the vision graph's alone."""
        model = ctx.model
        with torch.inference_mode(), fp32_compute(model):
            out = ctx.ref.compare(torch_llm(model), torch.from_numpy(visual))
        release_module(model)
        return {**out, "llm": "fp32 PyTorch (the reference's)"}

    @staticmethod
    def _fp16(ctx, writer, ref) -> Artifact:
        """fp16 graph for GPUs and TensorRT's strongly typed mode, traced: the ViT in fp16 with fp32 softmax and
        LayerNorm statistics; ln_vision, Q-Former and projection in fp32 (as transformers runs BLIP-2)."""
        with Meter() as meter:
            dst = writer.path("vision/vision_fp16.onnx")
            encoder = image_encoder_of(ctx.model, torch.float16)
            files = export_onnx(encoder, (ref.volumes[:2],), dst, [VISION_INPUT], [VISION_OUTPUT],
                                {VISION_INPUT: {0: torch.export.Dim("batch", min=1, max=max(ctx.opts.max_batch, 2))}})
            del encoder
            release_module(ctx.model)
            extra = {"data": f"vision/{files[1].name}"} if len(files) > 1 else None
            try:
                sess = ort_session(dst)
                parity = VisionOnnxStep._check(VisionOnnxStep._visual(sess, ref), ref, "fp16")
                io = io_spec(sess)
                del sess
            except Exception as e:  # CPU providers lack some fp16 kernels; the figure then comes from the GPU run
                parity, io = {"checked": False, "reason": str(e).splitlines()[0][:160]}, {}
        return Artifact(VISION_ONNX_FP16, "vision/vision_fp16.onnx", extra,
                        dict(kind="onnx", precision="fp16", **io, parity=parity, resources=meter.result))


class LlmOnnxStep:
    def __init__(self, quant: str):
        self.quant = quant
        self.title = f"LLM graphs -> ONNX ({'fp32' if quant == 'none' else quant}), checked against the reference"

    def run(self, ctx) -> StepResult:
        model, writer = ctx.model, ctx.writer
        formats = ctx.opts.llm_formats or LLM_FORMATS[self.quant]
        fp32_bytes = 4 * sum(p.numel() for p in model.llm.parameters())
        bundle_dir = writer.path("llm/x").parent
        with Meter() as meter:
            if self.quant == "none" or fp32_bytes <= FP32_CHECK_BYTES:
                # the writers' fp32 graphs, held to the reference's greedy tokens and probabilities
                fp32_dir = bundle_dir if self.quant == "none" else ctx.work / "llm_fp32"
                fp32_files, _ = self._write(model, fp32_dir, lambda decode: FP32)
                strict = self._measure(ctx, fp32_files, "fp32")
                if not strict["greedy_tokens_identical"] or strict["max_abs_prob_diff"] > LLM_FP32_PROB_TOL:
                    raise MedblipError(f"fp32 LLM ONNX disagrees with PyTorch: {strict}", code="parity_failed")
            else:
                fp32_files, fp32_dir = None, None
                strict = {"checked": False, "reason": f"fp32 graphs not built at this size ({fp32_bytes / 2**30:.1f} "
                                                      "GiB); the same writers are held to it at the small sizes"}
            quantization, note = None, None
            if self.quant == "none":
                shipped, result, names = fp32_files, strict, {}
            else:
                if fp32_dir is not None:
                    shutil.rmtree(fp32_dir)
                if self.quant in QUANTIZERS or ctx.opts.llm_formats is not None:
                    shipped, result, names, quantization, note = self._tolerant(ctx, formats, bundle_dir)
                    result["fp32_onnx"] = strict
                else:
                    shipped, names = self._write(model, bundle_dir, formats.for_graph)
                    try:
                        result = {**self._measure(ctx, shipped, self.quant), "fp32_onnx": strict}
                    except Exception as e:  # e.g. fp16 kernels missing on the CPU provider: the GPU run measures it
                        result = {"checked": False, "reason": str(e).splitlines()[0][:160], "fp32_onnx": strict}
        done = self._ship(ctx, shipped, "fp32" if self.quant == "none" else self.quant, result, names, meter.result)
        if quantization is not None:
            done.artifacts[0].meta["quantization"] = quantization
            done.note = note or done.note
        return done

    def _tolerant(self, ctx, formats, folder: Path):
        """The graphs in `formats`, the most sensitive matmuls raised to 8 bits (4-bit formats) and then kept fp32 until
        the tolerance is met (tolerant.py).
        -> (files, parity, formats described, quantization record, note)."""
        model = ctx.model

        def write(dst: Path, fmt_of):
            return self._write(model, dst, fmt_of)[0]

        job = TolerantWrite("LLM graphs", self.quant, tolerance_of(ctx.opts, self.quant), share_of(ctx.opts),
                            ctx.work / "llm_trial", write,
                            lambda files: ctx.ref.compare(self._backend(ctx, files, self.quant)), mixed_llm(formats),
                            raised_share_of(ctx.opts) if has_raised_step(formats) else None)
        timer = lambda files: llm_times(self._backend(ctx, files, self.quant), ctx.ref)  # noqa: E731
        files, result, record, note = job.run(folder, allow_out(ctx.opts), timer,
                                              (lambda: self._alternatives(ctx, formats))
                                              if alternatives_wanted(ctx.opts) else None)
        shutil.rmtree(ctx.work / "llm_trial", ignore_errors=True)
        names = {g.name: job.shipped_fmt_of(g.decode).describe() for g in LLM_GRAPHS[model.cfg.variant](model.llm)}
        return files, result, names, record, note

    @classmethod
    def _alternatives(cls, ctx, formats) -> list:
        """The quantizers tried before any fallback (tolerant.TolerantWrite._better_quantizer): SmoothQuant alphas,
        and for 4-bit formats GPTQ (export/gptq.py) where its calibration sums fit in memory."""
        out = cls._smoothed(ctx, formats) if ctx.opts.smooth else []
        fourbit = all(isinstance(f, BlockQuant) and f.bits == 4 for f in (formats.gemm, formats.gemv))
        if ctx.opts.gptq and fourbit and hessian_bytes(ctx.model) <= MAX_HESSIAN_BYTES:
            out.append((f"GPTQ (calibration: {CALIBRATION_VOLUMES * ctx.ref.budget.cases} other volumes, damping "
                        f"{DAMP:g})", mixed_llm(cls._gptq(ctx, formats))))
        return out

    @staticmethod
    def _gptq(ctx, formats) -> LlmQuant:
        model = ctx.model
        budget = ctx.ref.budget
        visual = calibration_visual(model, CALIBRATION_VOLUMES * budget.cases)
        with torch.inference_mode(), fp32_compute(model):
            sums = hessians(model, lambda: ctx.ref.calibrate(torch_llm(model), visual, budget.continuation_tokens))
        release_module(model)
        return LlmQuant(*(GptqBlockQuant(f.bits, f.block, f.accuracy, sums=sums) for f in (formats.gemm, formats.gemv)))

    @staticmethod
    def _smoothed(ctx, formats) -> list:
        """SmoothQuant-style alternatives (export/smooth.py): one per alpha, the activation maxima from the fp32
        LLM's prefill and answer scoring of every evaluation case."""
        model = ctx.model
        with torch.inference_mode(), fp32_compute(model):
            maxima = activation_maxima(model, lambda: ctx.ref.prefill_and_score(torch_llm(model)))
        release_module(model)
        return [(f"smoothed alpha {a:g}", mixed_llm(LlmQuant(Smoothed(formats.gemm, a, maxima),
                                                             Smoothed(formats.gemv, a, maxima)))) for a in ALPHAS]

    @staticmethod
    def _write(model, folder: Path, fmt_of) -> tuple[dict[str, list[Path]], dict[str, str]]:
        """Every graph of the family into `folder`, sharing one weight file; fmt_of(decode) -> weight format.
        -> ({graph: [graph file, weight file]}, {graph: its format described})."""
        folder.mkdir(parents=True, exist_ok=True)
        files, names = {}, {}
        with WeightFile(folder / "llm.data") as weights:
            for g in LLM_GRAPHS[model.cfg.variant](model.llm):
                files[g.name] = g.write(folder / f"{g.name}.onnx", fmt_of(g.decode), weights) + [weights.path]
                names[g.name] = fmt_of(g.decode).describe()
                release_module(model.llm)
        return files, names

    def _measure(self, ctx, files: dict, precision: str) -> dict:
        backend = self._backend(ctx, files, precision)
        try:
            return ctx.ref.compare(backend)
        finally:
            del backend
            gc.collect()

    @staticmethod
    def _ship(ctx, graphs: dict[str, list[Path]], precision: str, result: dict, formats: dict[str, str],
              resources: dict) -> StepResult:
        """The graphs (already in the bundle's llm/ folder) as one artifact with its parity figures."""
        extra = _files(graphs, "llm")
        main = extra[next(iter(graphs))]
        result["bytes_on_disk"] = sum(f.stat().st_size for f in {f for files in graphs.values() for f in files})
        art = Artifact(LLM_ONNX, main, extra, dict(kind="onnx", precision=precision, family=ctx.model.cfg.variant,
                                                   graphs=list(graphs), parity=result,
                                                   **({"weight_formats": formats} if formats else {}),
                                                   resources=resources))
        note = None
        if result.get("label_agreement", 1.0) < 1.0:
            note = f"{precision} LLM: label agreement {result['label_agreement']:.2f} on the evaluation set"
        return StepResult([art], note)

    @staticmethod
    def _backend(ctx, files: dict, precision: str):
        return ort_llm(ctx.model, {n: f[0] for n, f in files.items()}, precision)


class TrtStep:
    title = "TensorRT FP16 engine of the vision graph"

    def run(self, ctx) -> StepResult:
        from ..engines.trt_build import build_engine, trt_available

        reason = trt_available()
        if reason:
            return StepResult(note=f"--trt skipped: {reason}; the rest of the bundle is written")
        opts, writer = ctx.opts, ctx.writer
        src = writer.path("vision/vision_fp16.onnx")
        engine = writer.path("trt/vision_fp16.engine")
        with Meter() as meter:
            meta = build_engine(src, engine, min_batch=opts.min_batch, opt_batch=opts.opt_batch,
                                max_batch=opts.max_batch, timing_cache_path=ctx.work / "timing.cache")
            # the engine as medblip-infer runs it, on the evaluation volumes, against the fp32 PyTorch tokens
            parity = check_vision(engine_visual(engine, meta, ctx.ref.volumes), ctx.ref.volume_visual.numpy(),
                                  "fp16", "TensorRT engine")
        shutil.copy2(ctx.work / "timing.cache", writer.path("trt/timing.cache"))
        return StepResult([Artifact(VISION_TRT, "trt/vision_fp16.engine", {"timing_cache": "trt/timing.cache"},
                                    dict(kind="tensorrt", precision="fp16", **meta, parity=parity,
                                         resources=meter.result))])


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

#!/usr/bin/env bash
# Every GPU check of one device session, in one go, within 10 minutes (the steps' limits together); installs nothing.
#
#   OUT=DIR bash benchmarks/device_run.sh      (from the repository root, on the GPU machine)
#
# The device image has torch (CUDA), transformers, tokenizers, sentencepiece, onnx, onnxruntime, click and psutil,
# but neither this package's console scripts nor nibabel. The package goes on PYTHONPATH through a symlink and
# the suites run as `python -m medblip_edge.cli_bench SUITE ...`, which is `medblip-bench SUITE ...`. Wheels
# carried in .whl/ are put on PYTHONPATH as they are, not installed, each only where the image lacks its package
# (nibabel's, pure Python: the pipeline suite and the CUDA tests open Pipelines, which read NIfTI with it).
# Each step has its own time limit, so one that hangs cannot eat the session; its output goes to
# $OUT/<step>.txt, each suite's results.json and report.md to $OUT/<step>/, and a table of exit codes and wall
# times to stdout.
#   vision_forms  the ViT's training forms (Conv3d, eager attention) against the fused forms (patch GEMM,
#                 scaled_dot_product_attention) at paper size, fp16, batch 1, 8 and 32
#   pipeline      the paper-t5 rows through the runtime factory: the published code's path in its GPU dtypes,
#                 torch fp32/fp16/bf16, decode per token with the CUDA-graph and the eager decoder, batch 1, 8, 32
#   cuda_tests    tests/test_cuda.py and tests/test_vit_forms.py
set -u
OUT=${OUT:-device-out}
PY=${PYTHON:-python3}  # the image's python3 holds torch
mkdir -p "$OUT" /tmp/pkg
ln -sfn "$PWD" /tmp/pkg/medblip_edge
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
for whl in "$PWD"/.whl/*.whl; do
    [ -e "$whl" ] || continue
    pkg=${whl##*/}
    "$PY" -c "import ${pkg%%-*}" 2>/dev/null || PYTHONPATH=$PYTHONPATH:$whl
done

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch sees no CUDA GPU here: nothing to run" >&2
    exit 1
fi
"$PY" -c "import torch; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    > "$OUT/gpu.txt" 2>&1
date -u +%Y-%m-%dT%H:%M:%SZ >> "$OUT/gpu.txt"

step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    echo "| $name | $rc | $(( $(date +%s) - start )) s |"
}

echo "| step | exit | wall |"
echo "| --- | ---: | ---: |"
step vision_forms 120 "$PY" -m medblip_edge.cli_bench vision-forms --preset paper-t5 --device cuda --dtype fp16 \
    --batch 1 --batch 8 --batch 32 --iters 10 --out "$OUT/vision_forms"
step pipeline 360 "$PY" -m medblip_edge.cli_bench pipeline --device cuda --preset paper-t5 --backends torch \
    --scan eval --batch 1,8,32 --iters 3 --reference-iters 1 --compare-decode --out "$OUT/pipeline"
step cuda_tests 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_vit_forms.py
echo
cat "$OUT/gpu.txt"
tail -n 12 "$OUT/vision_forms.txt"
tail -n 3 "$OUT/pipeline.txt"
tail -n 3 "$OUT/cuda_tests.txt"

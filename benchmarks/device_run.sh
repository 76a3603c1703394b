#!/usr/bin/env bash
# Every GPU check of one device session, in one go, in under 8 minutes on an H200; installs nothing.
#
#   OUT=DIR bash benchmarks/device_run.sh      (from the repository root, on the GPU machine)
#
# The device image has torch (CUDA), transformers, tokenizers and sentencepiece; the steps below import
# nothing else (no nibabel, no ONNX). Each step has its own time limit, so one that hangs cannot eat the
# session; its output goes to $OUT/<step>.txt and a table of exit codes and wall times to stdout.
#   vision_forms  the ViT's training forms (Conv3d, eager attention) against the fused forms (patch GEMM,
#                 scaled_dot_product_attention) at paper size, fp16, batch 1, 8 and 32
#   gpu_paper_t5  the paper-t5 rows: the published code's path, torch fp32/fp16/bf16, decode per token
#   cuda_tests    tests/test_cuda.py and tests/test_vit_forms.py
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT" /tmp/pkg
ln -sfn "$PWD" /tmp/pkg/medblip_edge
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch sees no CUDA GPU here: nothing to run" >&2
    exit 1
fi
python -c "import torch; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)" \
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
step vision_forms 120 python -m medblip_edge.benchmarks.vision_forms --preset paper-t5 --device cuda --dtype fp16 \
    --batch 1 --batch 8 --batch 32 --iters 10 --out "$OUT/vision_forms.json"
step gpu_paper_t5 270 python -m medblip_edge.benchmarks.gpu_paper_t5 --out "$OUT/gpu_paper_t5" --iters 3 \
    --batches 1,8,32
step cuda_tests 120 python -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_vit_forms.py
echo
cat "$OUT/gpu.txt"
tail -n 12 "$OUT/vision_forms.txt"
tail -n 3 "$OUT/cuda_tests.txt"

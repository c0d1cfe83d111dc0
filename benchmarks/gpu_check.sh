#!/usr/bin/env bash
# One script for a session that has a CUDA GPU: the GPU parity tests, the CUDA bench of b2 at 384, and IO
# binding against plain run.
# Usage (from the repository root): bash benchmarks/gpu_check.sh [OUT_DIR]
# Needs an environment with pvt-deploy[export] installed and onnxruntime-gpu with working CUDA (and TensorRT
# libraries for the TensorRT rows; they are skipped with a reason otherwise). Budget: ~8 min on one H100.
set -euo pipefail
out_dir="${1:-benchmarks/results}"
python="${PYTHON:-.venv/bin/python}"
pvt="${PVT_DEPLOY:-.venv/bin/pvt-deploy}"
mkdir -p "$out_dir"
export_dir="$(mktemp -d)/pvt_v2_b2_random"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out_dir/gpu.txt"

# 1. GPU tests (marked @pytest.mark.gpu; they skip on machines without CUDA). A failure is reported at the end
#    but does not stop the bench, so one run brings back every number.
tests_rc=0
"$python" -m pytest -q -m gpu tests >"$out_dir/gpu_tests.txt" 2>&1 || tests_rc=$?
tail -n 20 "$out_dir/gpu_tests.txt"

# 2. b2 at 384 with seeded random weights, fp32 + fp16, then the CUDA bench (the CPU named in its JSON):
#    torch eager fp32 / fp16-autocast on CUDA (when torch has CUDA), ORT CUDA fp32 / fp16 with IO binding,
#    TensorRT fp16, next to the CPU rows. Batches 1 and 32 carry the fp16 target (>= 2x eager fp16 autocast).
"$pvt" export pvt_v2_b2 --random-weights --precision fp32,fp16 --out "$export_dir" --force
card="$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 | head -n1 | tr ' ' '-')"
"$pvt" bench "$export_dir" --device cuda --batch-sizes 1,8,32 --no-compile --budget 240 \
    --out "$out_dir/bench-b2-384-cuda-${card}.json"

# 3. IO binding against plain run on the same card, fp32 and fp16 (issue 4), outputs checked equal
"$python" benchmarks/runtime_iobinding.py "$export_dir" --precision fp32 --out "$out_dir/runtime_iobinding-fp32-${card}.json"
"$python" benchmarks/runtime_iobinding.py "$export_dir" --precision fp16 --out "$out_dir/runtime_iobinding-fp16-${card}.json"

if [ "$tests_rc" -ne 0 ]; then
    echo "GPU tests failed (exit $tests_rc): see $out_dir/gpu_tests.txt" >&2
    exit "$tests_rc"
fi

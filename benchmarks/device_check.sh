#!/usr/bin/env bash
# The checks gnfx runs on a CUDA machine, which CI does not have: `bash benchmarks/device_check.sh [OUT]`
# (OUT: where the logs and tables go, default benchmarks/results/device). Runs from the repository root
# with the machine's own python3 and torch (PYTHON=... to pick another), gnfx from this checkout.
#   1. tests/test_cuda.py: training on the device against the CPU, the compiled update (inductor,
#      Triton) against eager and its graph count, torch.compile of the model, bfloat16 autocast;
#   2. benchmarks.big_factors on the device: K-FAC's whole step on the ResNet-18 at batch 32 against AdamW;
#   3. benchmarks.targets' rows-per-step sweep on the device at width 1024 (compile="auto" compiles the
#      update there), whole step against AdamW's.
# Each part has its own time limit, so that one that hangs leaves the others their time.
set -u
out=${1:-benchmarks/results/device}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
{ nvidia-smi -L; "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
    2>&1 | tee "$out/machine.txt"
timeout "${TEST_LIMIT:-240}" "$py" -m pytest tests/test_cuda.py -o addopts="" -q -p no:warnings -p no:cacheprovider \
    -rfE 2>&1 | grep -v "^DEBUG" | tee "$out/test_cuda.log" | tail -40
timeout "${FACTORS_LIMIT:-90}" "$py" -m benchmarks.big_factors --device cuda --batch 32 --rounds 3 --out "$out" \
    > "$out/big_factors.log" 2>&1; tail -8 "$out/big_factors.log"
timeout "${SWEEP_LIMIT:-180}" "$py" -m benchmarks.targets --device cuda --sweep --sweep-width 1024 \
    --sweep-ratios 4 16 --sweep-rounds 5 --out "$out" > "$out/sweep.log" 2>&1; grep "^sweep\|Error" "$out/sweep.log" | tail -5
ls "$out"

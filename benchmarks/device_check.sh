#!/usr/bin/env bash
# The checks gnfx runs on a CUDA machine, which CI does not have: `bash benchmarks/device_check.sh [OUT]`
# (OUT: where the logs and tables go, default benchmarks/results/device). Runs from the repository root
# with the machine's own python3 and torch (PYTHON=... to pick another), gnfx from this checkout.
# PARTS (default "tests factors sweep compile") picks and orders the parts:
#   tests    tests/test_cuda.py: training on the device against the CPU, the compiled update (inductor,
#            Triton) against eager and its graph count, torch.compile of the model, bfloat16 autocast;
#   factors  benchmarks.big_factors: K-FAC's whole step on the ResNet-18 at batch 32 against AdamW;
#   sweep    benchmarks.targets' rows-per-step sweep at width 1024 (compile="auto" compiles the update
#            there), whole step against AdamW's; SWEEP_ARGS adds to its arguments;
#   compile  benchmarks.compile_time: the first compiled steps' price and the steady gain, cold cache.
# Each part has its own time limit (TEST_LIMIT, FACTORS_LIMIT, SWEEP_LIMIT, COMPILE_LIMIT, seconds),
# so that one that hangs leaves the others their time.
set -u
out=${1:-benchmarks/results/device}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
{ nvidia-smi -L; "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
    2>&1 | tee "$out/machine.txt"
for part in ${PARTS:-tests factors sweep compile}; do
    case $part in
    tests) timeout "${TEST_LIMIT:-240}" "$py" -m pytest tests/test_cuda.py -o addopts="" -q -p no:warnings \
               -p no:cacheprovider -rfE 2>&1 | grep -v "^DEBUG" | tee "$out/test_cuda.log" | tail -40 ;;
    factors) timeout "${FACTORS_LIMIT:-90}" "$py" -m benchmarks.big_factors --device cuda --batch 32 --rounds 3 \
                 --out "$out" > "$out/big_factors.log" 2>&1; tail -8 "$out/big_factors.log" ;;
    sweep) timeout "${SWEEP_LIMIT:-180}" "$py" -m benchmarks.targets --device cuda --sweep --sweep-width 1024 \
               --sweep-ratios 4 16 --sweep-rounds 5 ${SWEEP_ARGS:-} --out "$out" > "$out/sweep.log" 2>&1
           grep "^sweep\|Error" "$out/sweep.log" | tail -5 ;;
    compile) timeout "${COMPILE_LIMIT:-240}" "$py" -m benchmarks.compile_time --device cuda \
                 --models ${COMPILE_MODELS:-char_gpt mlp1024} --out "$out" > "$out/compile_time.log" 2>&1
             grep -v "Warning\|warn" "$out/compile_time.log" | tail -8 ;;
    *) echo "unknown part $part (tests, factors, sweep, compile)"; exit 2 ;;
    esac
done
ls "$out"

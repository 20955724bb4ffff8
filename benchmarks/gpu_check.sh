#!/usr/bin/env bash
# The command a session gives the device tool: the one budgeted GPU run (benchmarks/gpu_run.py), with the
# wheelhouse in .whl/ (benchmarks/wheelhouse.sh) installed by its first step. Results: results.md,
# results.csv and a tarball of every CSV and log at the top of $OUT (else benchmarks/results/gpu).
#
#   ATEDM_GIT_SHA=<sha> bash benchmarks/gpu_check.sh [gpu_run options, e.g. --compile]
#
# Device tool: run(command="ATEDM_GIT_SHA=<sha> bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 -m benchmarks.gpu_run --wheelhouse .whl "$@"

#!/usr/bin/env bash
# Collect the pure-Python wheels that the GPU machine's image lacks for benchmarks/gpu_run.py, on a machine
# that reaches the package index; carry the folder to the offline GPU box (the device tool: carry=[".whl"]).
#
#   bash benchmarks/wheelhouse.sh [DIR]      (default: .whl/ at the repo root, git-ignored)
#
# What the image lacks (its package list: torch, triton, numpy, transformers, huggingface-hub, safetensors,
# filelock, regex, requests, pillow, zipp, ... but no diffusers): diffusers at the version this repo tests,
# tomesd, and of their requirements only importlib_metadata. diffusers imports the standard library's
# importlib.metadata on Python 3.12; the wheel only makes its declared requirements whole. 8.7.0 is the
# one pinned: it needs nothing beyond zipp (10.x also wants lazy-importer, which the image lacks).
# All three are pure Python. The script prints every wheel's requirements so that another target image
# can be checked against them. gpu_run.py installs the folder with `pip install --no-index --no-deps
# --target DIR` and puts DIR on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
limit_mib=64  # what the device tool carries with the working tree, in all
wheels=(diffusers==0.42.1 tomesd==0.1.3 importlib_metadata==8.7.0)
python=${PYTHON:-python3}

mkdir -p "$dir"
rm -f "$dir"/*.whl  # one version of each: two stop the whole --no-deps install
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dir" "${wheels[@]}"

for wheel in "$dir"/*.whl; do
  echo "$(basename "$wheel") requires:"
  unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^Requires-Dist:/   /'
done
bytes=$(du -cb "$dir"/*.whl | tail -n 1 | cut -f1)
echo "$(ls "$dir"/*.whl | wc -l) wheels, $((bytes / 1024)) KiB in $dir"
if (( bytes >= limit_mib * 1024 * 1024 )); then
  echo "wheelhouse.sh: $dir holds ${bytes} bytes, over the ${limit_mib} MiB the device tool carries" >&2
  exit 1
fi

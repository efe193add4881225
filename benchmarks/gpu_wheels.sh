#!/usr/bin/env bash
# Wheels for the GPU check on a machine without network (Python 3.12, torch, CuPy, numba and
# xarray installed): the shared script's (dask, distributed, zarr, numcodecs, dask-cuda, bokeh),
# plus what this project imports beyond them (xxhash, ml_dtypes, safetensors, tqdm, scipy,
# pytest-timeout). Run from the project's root on a machine with network:
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/gpu/fetch-wheels.sh
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --no-deps -d .whl "xxhash>=3.4" "ml_dtypes>=0.5" "safetensors>=0.6" "tqdm>=4.66" \
  "scipy>=1.11" "pytest-timeout>=2.3" "threadpoolctl>=3.1"
ls .whl
du -sh .whl

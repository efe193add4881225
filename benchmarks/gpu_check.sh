#!/usr/bin/env bash
# The GPU check (`make gpu-check`): the tests marked `gpu` and the GPU fit benchmark
# (benchmarks/bench_gpu.py: CuPy fit against the CPU kernel on one store, agreement, and the
# host-to-device transfer share), everything tee'd into gpu-check/ (gpu-check.log, pytest.xml,
# bench_gpu.json, bench_gpu.md). Exits non-zero when a test or the benchmark's agreement fails.
#
# No network: on a GPU machine whose Python lacks dask/zarr (../shared/gpu/README.md), the
# wheels that ../shared/gpu/fetch-wheels.sh put in .whl/ are installed into /tmp/site first.
#
# Environment:
#   STAND_IN=1       run on the CPU with a stand-in cupy module (figures are NOT GPU figures);
#                    also what happens, with a message, when no usable GPU is found
#   REQUIRE_GPU=1    fail instead of falling back to the stand-in when no GPU is found
#   PYTHON           the interpreter (default python3)
#   BENCH_N, BENCH_EPOCHS, BENCH_MODES, BENCH_SAMPLES   the benchmark's store and fit
#                    (default 4e6 x 100, M=10, K=1000 on a GPU; 5e5 x 50 with the stand-in)
#   GPU_CHECK_OUT    output folder (default gpu-check)
#   GPU_CHECK_SITE   where .whl/ is installed (default /tmp/site)
#   GPU_CHECK_TESTS=0  skip the tests marked gpu (the benchmark only)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$OUT" || exit 2
LOG=$OUT/gpu-check.log
: >"$LOG"
say() { printf '%s\n' "$*" | tee -a "$LOG"; }
fail() { say "GPU CHECK FAILED: $*"; exit 1; }
say "== gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD with $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"

stand_in=${STAND_IN:-0}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# (a) the wheels of .whl/, when this Python lacks what they hold (no network needed)
if ! "$PY" -c 'import dask, distributed, zarr, numcodecs' >/dev/null 2>&1; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        site=${GPU_CHECK_SITE:-/tmp/site}
        say "== installing .whl/ into $site (--no-index: no network)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl 2>&1 | tee -a "$LOG"
        [ "${PIPESTATUS[0]}" -eq 0 ] || fail "pip could not install .whl/"
        export PYTHONPATH="$site:$PYTHONPATH"
    else
        say "dask/distributed/zarr/numcodecs are missing and there is no .whl/:"
        fail "run benchmarks/gpu_wheels.sh on a machine with network and bring .whl/ along"
    fi
fi

# (b) the device: nvidia-smi and cupy
if [ "$stand_in" != 1 ]; then
    say "== device"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>&1 | tee -a "$LOG" \
        && "$PY" - 2>&1 <<'EOF' | tee -a "$LOG"
import cupy
n = cupy.cuda.runtime.getDeviceCount()
assert n > 0, "cupy sees no CUDA device"
name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
name = name.decode() if isinstance(name, bytes) else name
print(f"cupy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
      f"{n} device(s); device 0: {name}")
EOF
    then
        say "GPU found: running the GPU check"
    else
        [ "${REQUIRE_GPU:-0}" = 1 ] && fail "no usable GPU (nvidia-smi or cupy failed) and REQUIRE_GPU=1"
        say "NO USABLE GPU (nvidia-smi missing or cupy failed): running the STAND-IN check on the CPU;"
        say "its figures are NOT GPU figures"
        stand_in=1
    fi
else
    say "== STAND_IN=1: stand-in cupy on the CPU; figures are NOT GPU figures"
fi

# everything the tests and the benchmark import, checked at once for a clear message
mods="numpy scipy dask distributed zarr numcodecs tqdm psutil click safetensors torch pytest xxhash ml_dtypes"
[ "$stand_in" = 1 ] || mods="$mods cupy dask_cuda"
"$PY" - $mods 2>&1 <<'EOF' | tee -a "$LOG"
import importlib.util, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
if missing:
    print("missing Python modules: " + " ".join(missing))
    sys.exit(1)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "modules missing (see above); none can come from the network here"

# (c) the tests marked gpu (only the files that hold them: the other test modules need more
# packages than a GPU image has), then the benchmark
if [ "${GPU_CHECK_TESTS:-1}" = 0 ]; then
    say "== GPU_CHECK_TESTS=0: the tests marked gpu are skipped"
else
say "== pytest -m gpu"
files=$(grep -rlE 'mark\.gpu' tests --include='test_*.py' | sort)
[ -n "$files" ] || fail "no test file under tests/ marks tests gpu"
popts=()
if ! "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
    # pyproject's `timeout` option needs pytest-timeout; without it --strict-config would refuse
    popts=(-o "addopts=-ra --strict-markers")
    say "(pytest-timeout is missing: running without --strict-config)"
fi
# shellcheck disable=SC2086
"$PY" -m pytest ${popts[@]+"${popts[@]}"} -m gpu -ra -p no:cacheprovider --junitxml="$OUT/pytest.xml" $files 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || fail "pytest -m gpu exited $rc"
if [ "$stand_in" != 1 ]; then  # on a GPU nothing marked gpu may be skipped
    "$PY" - "$OUT/pytest.xml" 2>&1 <<'EOF' | tee -a "$LOG"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
ran = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(f"gpu tests: {ran} collected, {skipped} skipped")
sys.exit(1 if skipped or not ran else 0)
EOF
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail "tests marked gpu were skipped (or none ran) on a GPU machine"
fi
fi

say "== GPU benchmark"
if [ "$stand_in" = 1 ]; then
    bargs=(--stand-in --cpu-kernel numpy --n "${BENCH_N:-5e5}" --epochs "${BENCH_EPOCHS:-50}")
else
    bargs=(--n "${BENCH_N:-4e6}" --epochs "${BENCH_EPOCHS:-100}")
fi
store=${TMPDIR:-/tmp}/cmd-gpu-check-$$.zarr
"$PY" benchmarks/bench_gpu.py "${bargs[@]}" --modes "${BENCH_MODES:-10}" \
    --samples "${BENCH_SAMPLES:-1000}" --store "$store" --out "$OUT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$store"
[ "$rc" -eq 0 ] || fail "bench_gpu.py exited $rc (see $OUT/bench_gpu.md)"
say "GPU CHECK PASSED ($([ "$stand_in" = 1 ] && echo 'STAND-IN, not GPU figures' || echo GPU)): $OUT/gpu-check.log, $OUT/pytest.xml, $OUT/bench_gpu.json, $OUT/bench_gpu.md"

"""Fit benchmark: CMD fit against a plain read of the store and against the in-memory algorithm.

In one run, on one synthetic trajectory store (planted modes plus noise, written through the
store API; default N = 2e7, T = 50: 4 GB of float32 on disk):

1. ``read``: one plain read of every row block through the same I/O path and runtime as the
   fit (the embedded LocalCluster, 2 single-threaded worker processes), into each worker
   thread's reused buffer;
2. ``fit-numba`` / ``fit-numpy``: ``pipeline.fit`` (sampling, clustering, the pass over all
   rows, summaries) with each CPU kernel (``--kernels``; the fused numba kernel is the
   default one), each a new study, deleted after it is timed; with ``--compare-read`` also
   ``fit-*-read``: the same fit with each block read into a buffer instead of mapped from the
   chunk files (``CMD_PIPELINE_NO_MMAP=1`` on the workers);
3. ``in-memory``: the straightforward version of the paper's algorithm as the research code
   writes it: the whole N x T float32 matrix in RAM and float32 one-pass raw-moment statistics
   (run in a separate process so that its peak RSS is its own; skipped when the matrix would
   not fit in half the RAM, or with ``--no-baseline``).

1-2 are interleaved ``--repeat`` times (read, each kernel, read, ...); the table reports the
medians. With N x T larger than the page cache the reads come from the disk.

Peak RSS of 1-2 is the summed RSS of the client, scheduler and workers (sampled every 20 ms);
of 3, the process's ``ru_maxrss``. Usage::

    .venv/bin/python benchmarks/bench_fit.py --n 1e7 --epochs 100 --modes 10 --repeat 3
    .venv/bin/python benchmarks/bench_fit.py --n 1e7 --epochs 100 --kernels numba \
        --block-rows 32768,131072 --repeat 2 --no-baseline      # rows per task
    .venv/bin/python benchmarks/bench_fit.py --n 1e7 --epochs 100 --kernels numba \
        --compare-read --repeat 3 --no-baseline                  # mapped against read blocks
    .venv/bin/python benchmarks/bench_fit.py --n 1e7 --epochs 100 --kernels numba \
        --compare-read --drop-caches --repeat 2 --no-baseline    # the same from disk (root)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from dask import delayed

import pipeline
from pipeline.bench.common import PeakRSS, in_memory_baseline, synthetic_store
from pipeline.buffers import scratch
from pipeline.config import FIT_BLOCK_BYTES, FIT_KERNEL_ENV
from pipeline.plan import blocks, fit_block_rows
from pipeline.runtime import RuntimeOptions, runner
from pipeline.store.analysis import AnalysisGroup
from pipeline.store.trajectory import ChunkGrid, TrajectoryStore


def _read_task(grid: ChunkGrid, r0: int, r1: int, cols: np.ndarray) -> int:
    """The plain read: the stored bytes, as stored, into the worker thread's reused buffer
    (a fresh array per task would also time the first touch of its pages)."""
    out = scratch("bench-read", len(cols) * (r1 - r0), grid.np_dtype).reshape(len(cols), r1 - r0)
    return grid.read_rows(r0, r1, cols, out)


def _drop_caches() -> None:
    """Write back, then drop the clean page cache (``echo 1 > /proc/sys/vm/drop_caches``)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=2e7)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--store", default="bench-output/fit-store.zarr")
    ap.add_argument("--out", default="bench-output/fit.json")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic store")
    ap.add_argument("--kernels", default="numba,numpy", help="CPU kernels of the fit, comma list")
    ap.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the synthetic trajectory's dtype (bfloat16: what ingest makes of a bf16 run)")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions (medians)")
    ap.add_argument("--block-rows", default="", metavar="R[,R...]",
                    help="rows per fit task, comma list (each a divisor or multiple of the store's chunk "
                         "rows); every kernel runs once per value [the fit's default]")
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-memory algorithm")
    ap.add_argument("--drop-caches", action="store_true",
                    help="empty the page cache before every timed run (root; Linux): the store is read from disk")
    ap.add_argument("--compare-read", action="store_true",
                    help="also fit with the blocks read into a buffer instead of mapped (CMD_PIPELINE_NO_MMAP=1)")
    ap.add_argument("--baseline", metavar="URL", help=argparse.SUPPRESS)  # internal: run the baseline
    a = ap.parse_args(argv)
    if a.baseline:
        print(json.dumps(in_memory_baseline(a.baseline, a.modes, a.samples, 0)))
        return 0
    n = int(a.n)
    if a.drop_caches and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        ap.error("--drop-caches needs write access to /proc/sys/vm/drop_caches (root, Linux)")
    url = os.path.abspath(a.store)
    shutil.rmtree(url, ignore_errors=True)
    t = time.perf_counter()
    isz = 4 if a.store_dtype == "float32" else 2
    print(f"writing a synthetic {a.store_dtype} store N={n:.3g} x T={a.epochs} ({n * a.epochs * isz / 1e9:.1f} GB) ...", flush=True)
    synthetic_store(url, n, a.epochs, a.modes, dtype=a.store_dtype)
    print(f"  {time.perf_counter() - t:.1f} s", flush=True)
    gb = n * a.epochs * isz / 1e9
    rows = {}
    try:
        st = TrajectoryStore.open(url)
        grid = st.chunk_grid()
        cols = np.arange(a.epochs)
        s_rows = fit_block_rows(grid.chunk_rows, a.epochs, raw=True, target_bytes=FIT_BLOCK_BYTES)
        kernels = [k.strip() for k in a.kernels.split(",") if k.strip()]
        sizes = [int(float(v)) for v in a.block_rows.split(",") if v.strip()] or [None]

        paths = ["map", "read"] if a.compare_read else ["map"]

        def run_name(k: str, br: int | None, path: str = "map") -> str:
            name = f"fit-{k}" if len(sizes) == 1 and br is None else f"fit-{k}-{br or s_rows}rows"
            return name if path == "map" else f"{name}-read"

        runs: dict[str, list[dict]] = {
            "read": [], **{run_name(k, br, p): [] for k in kernels for br in sizes for p in paths}
        }
        with runner(RuntimeOptions(workers=a.workers, progress=False)) as run:
            assert run.client is not None
            tasks = [delayed(_read_task, pure=False)(grid, r0, r1, cols) for r0, r1 in blocks(n, s_rows)]
            if "numba" in kernels:  # compile once here; workers load it from numba's disk cache
                from pipeline.kernels.cmd_numba import warm_up

                t = time.perf_counter()
                warm_up((a.store_dtype,))
                run.client.run(warm_up, (a.store_dtype,))
                rows["kernel_load_seconds"] = time.perf_counter() - t
                print(f"  numba kernel compiled or loaded: {rows['kernel_load_seconds']:.2f} s", flush=True)
            for i in range(a.repeat):
                if a.drop_caches:
                    _drop_caches()
                with PeakRSS(0.2) as rss:  # sparse sampling: the sampler competes with 2 workers for 2 cores
                    t = time.perf_counter()
                    nbytes = sum(run.compute(tasks, "read"))
                    runs["read"].append({"seconds": time.perf_counter() - t, "peak_rss_GB": rss.peak / 1e9, "bytes": nbytes})
                print(f"  read {i}: {runs['read'][-1]['seconds']:.2f} s", flush=True)
                for k in kernels:
                    os.environ[FIT_KERNEL_ENV] = k  # the client compiles it, the workers run it
                    run.client.run(os.environ.__setitem__, FIT_KERNEL_ENV, k)
                    for br, path in [(br, p) for br in sizes for p in paths]:
                        key = run_name(k, br, path)
                        name = f"bench-{k}-{br}-{path}-{i}"
                        no_mmap = "1" if path == "read" else None
                        _set_env("CMD_PIPELINE_NO_MMAP", no_mmap)
                        run.client.run(_set_env, "CMD_PIPELINE_NO_MMAP", no_mmap)
                        if a.drop_caches:
                            _drop_caches()
                        with PeakRSS(0.2) as rss:  # sparse sampling: the sampler competes with 2 workers for 2 cores
                            t = time.perf_counter()
                            res = pipeline.fit(url, name, modes=a.modes, samples=a.samples, block_rows=br, run=run)
                            runs[key].append({"seconds": time.perf_counter() - t, "peak_rss_GB": rss.peak / 1e9,
                                              "sampling_bytes": res.bytes_sampled, "modes_found": res.n_modes,
                                              "dynamics_error": res.summary["dynamics_error"],
                                              "relative_error": res.summary["relative_error"],
                                              "blocks": res.blocks_run})
                        AnalysisGroup(url, name).delete()
                        print(f"  {key} {i}: {runs[key][-1]['seconds']:.2f} s", flush=True)
        os.environ.pop(FIT_KERNEL_ENV, None)
        os.environ.pop("CMD_PIPELINE_NO_MMAP", None)
        for key, rs in runs.items():
            med = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]
            rows[key] = {**med, "all_seconds": [r["seconds"] for r in rs], "peak_rss_GB": max(r["peak_rss_GB"] for r in rs)}
        fits_in_ram = gb * 1e9 < 0.5 * psutil.virtual_memory().total
        if not a.no_baseline and fits_in_ram:
            out = subprocess.run([sys.executable, __file__, "--baseline", url, "--modes", str(a.modes), "--samples", str(a.samples)],
                                 capture_output=True, text=True, check=True)
            rows["in-memory"] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not a.keep:
            shutil.rmtree(url, ignore_errors=True)
    result = {"N": n, "T": a.epochs, "GB": gb, "store_dtype": a.store_dtype, "modes": a.modes,
              "samples": a.samples, **rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"N={n:.3g}, T={a.epochs}, {gb:.2f} GB {a.store_dtype}, M={a.modes}, K={a.samples}")
    print("| run | time s (median) | GB/s | time / read | peak RSS GB |")
    print("|---|---|---|---|---|")
    rd = rows["read"]
    for k, r in rows.items():
        if not isinstance(r, dict):
            continue
        print(f"| {k} | {r['seconds']:.2f} | {gb / r['seconds']:.2f} | {r['seconds'] / rd['seconds']:.2f} | {r['peak_rss_GB']:.2f} |")
    fits = [k for k in rows if k.startswith("fit-")]
    if len(fits) == 2:
        print(f"{fits[1]} / {fits[0]} time: {rows[fits[1]]['seconds'] / rows[fits[0]]['seconds']:.2f}")
    f = rows[fits[0]]
    if "in-memory" in rows:
        im = rows["in-memory"]
        print(f"in-memory / {fits[0]} time: {im['seconds'] / f['seconds']:.2f}; "
              f"{fits[0]} / in-memory peak RSS: {f['peak_rss_GB'] / im['peak_rss_GB']:.3f}")
    print(f"sampling read {f['sampling_bytes'] / 1e6:.2f} MB ({f['sampling_bytes'] / (gb * 1e9):.2e} of the trajectory); "
          f"modes found {f['modes_found']}, error relative to the dynamics {f['dynamics_error']:.4f} "
          f"(to ‖W‖: {f['relative_error']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

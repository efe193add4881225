"""Fit benchmark: CMD fit against a plain read of the store and against the in-memory algorithm.

In one run, on one synthetic trajectory store (planted modes plus noise, written through the
store API; default N = 2e7, T = 50: 4 GB of float32 on disk):

1. ``read``: one plain read of every row block through the same I/O path and runtime as the
   fit (the embedded LocalCluster, 2 single-threaded worker processes);
2. ``fit``: ``pipeline.fit`` (sampling, clustering, the pass over all rows, summaries);
3. ``in-memory``: the straightforward version of the paper's algorithm as the research code
   writes it: the whole N x T float32 matrix in RAM and float32 one-pass raw-moment statistics
   (run in a separate process so that its peak RSS is its own).

Peak RSS of 1-2 is the summed RSS of the client, scheduler and workers (sampled every 20 ms);
of 3, the process's ``ru_maxrss``. Usage::

    .venv/bin/python benchmarks/bench_fit.py --n 2e7 --epochs 50 --modes 10
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
from dask import delayed

import pipeline
from pipeline.bench.common import PeakRSS, in_memory_baseline, synthetic_store
from pipeline.plan import blocks, fit_block_rows
from pipeline.runtime import RuntimeOptions, runner
from pipeline.store.trajectory import ChunkGrid, TrajectoryStore


def _read_task(grid: ChunkGrid, r0: int, r1: int, cols: np.ndarray) -> int:
    out = np.empty((len(cols), r1 - r0), dtype=np.float32)
    return grid.read_rows(r0, r1, cols, out)


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
    ap.add_argument("--baseline", metavar="URL", help=argparse.SUPPRESS)  # internal: run the baseline
    a = ap.parse_args(argv)
    if a.baseline:
        print(json.dumps(in_memory_baseline(a.baseline, a.modes, a.samples, 0)))
        return 0
    n = int(a.n)
    url = os.path.abspath(a.store)
    shutil.rmtree(url, ignore_errors=True)
    t = time.perf_counter()
    print(f"writing a synthetic store N={n:.3g} x T={a.epochs} ({n * a.epochs * 4 / 1e9:.1f} GB) ...", flush=True)
    synthetic_store(url, n, a.epochs, a.modes)
    print(f"  {time.perf_counter() - t:.1f} s", flush=True)
    gb = n * a.epochs * 4 / 1e9
    rows = {}
    try:
        st = TrajectoryStore.open(url)
        grid = st.chunk_grid()
        cols = np.arange(a.epochs)
        s_rows = fit_block_rows(grid.chunk_rows, a.epochs, raw=True, target_bytes=16 * 2**20)
        with runner(RuntimeOptions(workers=a.workers, progress=False)) as run:
            tasks = [delayed(_read_task, pure=False)(grid, r0, r1, cols) for r0, r1 in blocks(n, s_rows)]
            with PeakRSS() as rss:
                t = time.perf_counter()
                nbytes = sum(run.compute(tasks, "read"))
                rows["read"] = {"seconds": time.perf_counter() - t, "peak_rss_GB": rss.peak / 1e9, "bytes": nbytes}
            with PeakRSS() as rss:
                t = time.perf_counter()
                res = pipeline.fit(url, "bench", modes=a.modes, samples=a.samples, run=run)
                rows["fit"] = {"seconds": time.perf_counter() - t, "peak_rss_GB": rss.peak / 1e9,
                               "sampling_bytes": res.bytes_sampled, "modes_found": res.n_modes,
                               "dynamics_error": res.summary["dynamics_error"],
                               "relative_error": res.summary["relative_error"]}
        out = subprocess.run([sys.executable, __file__, "--baseline", url, "--modes", str(a.modes), "--samples", str(a.samples)],
                             capture_output=True, text=True, check=True)
        rows["in-memory"] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not a.keep:
            shutil.rmtree(url, ignore_errors=True)
    result = {"N": n, "T": a.epochs, "GB": gb, "modes": a.modes, "samples": a.samples, **rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"N={n:.3g}, T={a.epochs}, {gb:.2f} GB float32, M={a.modes}, K={a.samples}")
    print("| run | time s | GB/s | peak RSS GB |")
    print("|---|---|---|---|")
    for k in ("read", "fit", "in-memory"):
        r = rows[k]
        print(f"| {k} | {r['seconds']:.2f} | {gb / r['seconds']:.2f} | {r['peak_rss_GB']:.2f} |")
    f, rd, im = rows["fit"], rows["read"], rows["in-memory"]
    print(f"fit / read time: {f['seconds'] / rd['seconds']:.2f}; in-memory / fit time: {im['seconds'] / f['seconds']:.2f}; "
          f"fit / in-memory peak RSS: {f['peak_rss_GB'] / im['peak_rss_GB']:.3f}")
    print(f"sampling read {f['sampling_bytes'] / 1e6:.2f} MB ({f['sampling_bytes'] / (gb * 1e9):.2e} of the trajectory); "
          f"modes found {f['modes_found']}, error relative to the dynamics {f['dynamics_error']:.4f} "
          f"(to ‖W‖: {f['relative_error']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import PeakRSS
from dask import delayed

import pipeline
from pipeline._version import __version__
from pipeline.plan import blocks, default_chunk_rows, fit_block_rows
from pipeline.runtime import RuntimeOptions, runner
from pipeline.store.schema import EpochEntry, IngestSettings, SourceFile, StoreMeta, TensorEntry
from pipeline.store.trajectory import ChunkGrid, TrajectoryStore


def synthetic_store(url: str, n: int, t: int, modes: int, seed: int = 0, layers: int = 8) -> None:
    """Write a trajectory store with planted modes: w_i(t) = a_i r_m(t) + b_i + noise."""
    st = TrajectoryStore.open_or_create(url)
    per = n // layers
    tensors, off = [], 0
    for i in range(layers):
        size = per if i < layers - 1 else n - off
        tensors.append(TensorEntry(f"layers.{i}.weight", (size,), "float32", "parameter", off))
        off += size
    epochs = tuple(
        EpochEntry(e, (SourceFile(f"synthetic://seed{seed}/epoch_{e}", 0, hashlib.sha256(f"{seed}:{n}:{e}".encode()).hexdigest()),))
        for e in range(t)
    )
    settings = IngestSettings(chunk_rows=default_chunk_rows(n, 1), time_chunk=1, codec="none")
    st.write_meta(StoreMeta(settings, tuple(tensors), n, epochs, None, __version__))
    st.create_trajectory(n, t, settings)
    grid = st.chunk_grid()
    tt = np.linspace(0, 1, t)
    kinds = [np.exp(-3 * tt), 1 / (1 + np.exp(-10 * (tt - 0.5))), np.sin(3 * tt), tt, np.sqrt(tt), tt**2,
             np.cos(5 * tt), np.log1p(5 * tt), np.exp(-10 * tt), np.tanh(4 * tt - 2)]
    profiles = np.stack([kinds[m % len(kinds)] * (1 + m // len(kinds)) for m in range(modes)])
    rng = np.random.default_rng(seed)
    col = np.empty((grid.chunk_rows, 1), dtype=np.float32)
    for r0, r1 in blocks(n, grid.chunk_rows):
        rows = r1 - r0
        m = rng.integers(modes, size=rows)
        a = rng.standard_normal(rows).astype(np.float32) * 0.1
        b = rng.standard_normal(rows).astype(np.float32) * 0.1
        for e in range(t):
            x = col[:rows, 0]
            np.multiply(a, profiles[m, e].astype(np.float32), out=x)
            x += b
            x += rng.standard_normal(rows, dtype=np.float32) * np.float32(1e-3)
            grid.write(r0, e, col[:rows])


def _read_task(grid: ChunkGrid, r0: int, r1: int, cols: np.ndarray) -> int:
    out = np.empty((len(cols), r1 - r0), dtype=np.float32)
    return grid.read_rows(r0, r1, cols, out)


def in_memory_baseline(url: str, modes: int, samples: int, seed: int) -> dict[str, float]:
    """The research code's way: whole matrix in RAM, float32 one-pass raw moments."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    t0 = time.perf_counter()
    st = TrajectoryStore.open(url)
    W = np.asarray(st.trajectory()[:, :])  # (N, T) float32, all in memory
    t_load = time.perf_counter() - t0
    n, t = W.shape
    T = np.float32(t)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=samples, replace=False))
    S = W[idx]
    sx, sxx = S.sum(1), (S * S).sum(1)
    num = T * (S @ S.T) - np.outer(sx, sx)
    var = T * sxx - sx * sx
    corr = num / np.sqrt(np.outer(var, var))
    dist = np.clip(1 - np.abs(np.nan_to_num(corr)), 0, 1)
    np.fill_diagonal(dist, 0)
    labels = fcluster(linkage(squareform((dist + dist.T) / 2, checks=False), "complete"), modes, "maxclust")
    refs = []
    for m in np.unique(labels):
        mem = np.flatnonzero(labels == m)
        refs.append(idx[mem[np.argmax(np.abs(np.nan_to_num(corr[np.ix_(mem, mem)])).sum(1))]])
    R = W[np.array(refs)]
    sr, srr = R.sum(1), (R * R).sum(1)
    Sx = W.sum(1)
    Sxx = np.einsum("ij,ij->i", W, W)
    Sxr = W @ R.T
    c = (T * Sxr - Sx[:, None] * sr[None, :]) / np.sqrt((T * Sxx - Sx * Sx)[:, None] * (T * srr - sr * sr)[None, :])
    mode = np.argmax(np.abs(np.nan_to_num(c)), axis=1)
    rows = np.arange(n)
    a = (T * Sxr[rows, mode] - Sx * sr[mode]) / (T * srr[mode] - sr[mode] ** 2)
    b = (Sx - a * sr[mode]) / T
    total = time.perf_counter() - t0
    del a, b
    return {"seconds": total, "load_seconds": t_load, "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


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
          f"modes found {f['modes_found']}, relative error {f['relative_error']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

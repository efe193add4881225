"""Pieces shared by the benchmark suite and the benchmark scripts: a synthetic planted-mode
store, peak-RSS sampling, the research code's in-memory algorithm, hardware limits."""

from __future__ import annotations

import hashlib
import os
import resource
import threading
import time

import numpy as np
import psutil

from pipeline._version import __version__
from pipeline.plan import blocks, default_chunk_rows
from pipeline.store.schema import EpochEntry, IngestSettings, SourceFile, StoreMeta, TensorEntry
from pipeline.store.trajectory import TrajectoryStore

__all__ = [
    "PeakRSS",
    "in_memory_baseline",
    "memcpy_bandwidth",
    "power_law",
    "raw_read_bandwidth",
    "raw_write_bandwidth",
    "synthetic_store",
]


class PeakRSS:
    """Samples the summed RSS of this process tree (client, scheduler, workers) in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.peak_single = max(self.peak_single, rss)
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._sample()  # at least two samples, however short the step: at its start and end
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


def synthetic_store(
    url: str, n: int, t: int, modes: int, seed: int = 0, layers: int = 8, dtype: str = "float32"
) -> None:
    """Write a trajectory store with planted modes: w_i(t) = a_i r_m(t) + b_i + noise.

    ``dtype`` "bfloat16" or "float16" stores the values rounded to that dtype, as a 16-bit
    trajectory (what ingest makes of a bf16 or fp16 run)."""
    from pipeline.store.dtypes import numpy_dtype

    st = TrajectoryStore.open_or_create(url)
    per = n // layers
    tensors, off = [], 0
    for i in range(layers):
        size = per if i < layers - 1 else n - off
        tensors.append(TensorEntry(f"layers.{i}.weight", (size,), dtype, "parameter", off))
        off += size
    epochs = tuple(
        EpochEntry(e, (SourceFile(f"synthetic://seed{seed}/epoch_{e}", 0, hashlib.sha256(f"{seed}:{n}:{e}".encode()).hexdigest()),))
        for e in range(t)
    )
    itemsize = numpy_dtype(dtype).itemsize
    settings = IngestSettings(
        chunk_rows=default_chunk_rows(n, 1, itemsize=itemsize), time_chunk=1, codec="none"
    )
    st.write_meta(
        StoreMeta(settings, tuple(tensors), n, epochs, None, __version__, store_dtype=dtype)
    )
    st.create_trajectory(n, t, settings, dtype)
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
            if dtype != "float32":  # round to the 16-bit dtype, then widen exactly
                x[...] = x.astype(numpy_dtype(dtype)).astype(np.float32)
            grid.write(r0, e, col[:rows])


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



def memcpy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second of ``np.copyto`` between two preallocated, touched buffers (median)."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.zeros_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return float(nbytes / np.median(times))


def raw_read_bandwidth(root: str, repeats: int = 3) -> tuple[float, int]:
    """Bytes per second of a plain sequential read of every file under ``root`` into one reused
    16 MiB buffer (``readinto``; median of ``repeats``, from the page cache when it holds them).
    Returns (bytes per second, bytes per pass)."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    buf = bytearray(16 * 2**20)
    view = memoryview(buf)
    times, total = [], 0
    for _ in range(repeats):
        total = 0
        t = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while True:
                    n = f.readinto(view)
                    if not n:
                        break
                    total += n
        times.append(time.perf_counter() - t)
    return float(total / np.median(times)), total


def raw_write_bandwidth(root: str, nbytes: int, repeats: int = 3) -> float:
    """Bytes per second of writing ``nbytes`` into fresh 8 MiB files under ``root`` (write to a
    temporary name, then rename, as zarr's local store does), median of ``repeats``. Fresh
    files are what ingest and reconstruct write: their pages are allocated on first touch,
    which is much slower on these machines than overwriting cached pages."""
    os.makedirs(root, exist_ok=True)
    chunk = 8 * 2**20
    buf = np.ones(chunk // 4, dtype=np.float32).tobytes()
    count = max(1, nbytes // chunk)
    times = []
    for rep in range(repeats):
        t = time.perf_counter()
        for i in range(count):
            tmp = os.path.join(root, f"w{rep}-{i}.partial")
            with open(tmp, "wb") as f:
                f.write(buf)
            os.replace(tmp, os.path.join(root, f"w{rep}-{i}"))
        times.append(time.perf_counter() - t)
        for i in range(count):
            os.unlink(os.path.join(root, f"w{rep}-{i}"))
    return float(count * chunk / np.median(times))


def power_law(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares fit of ``y = c x^k`` in log-log space: returns (k, c)."""
    k, logc = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(k), float(np.exp(logc))

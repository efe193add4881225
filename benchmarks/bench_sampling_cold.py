"""Sampling from a store that is not in the page cache: the fit's K sampled rows x T epochs,
one value per read, cold and warm.

The fit draws its K samples (default 1000) by reading each sampled value on its own
(:meth:`pipeline.store.trajectory.ChunkGrid.read_scattered`): 100,000 reads at T = 100. From the
page cache that takes a fraction of a second; from a disk, each read waits for the disk. This
benchmark writes (or reuses) a synthetic float32 store, then per round and per variant:

1. evicts the store's chunk files from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``
   on every file after a ``sync``: no root needed);
2. in a fresh process (``PYTHONPATH`` = this checkout, or ``--old PATH``): opens the store and
   times ``read_scattered`` of ``--samples`` random rows (the same rows for every variant) x
   every epoch, then the same call again (now from the page cache).

Usage::

    .venv/bin/python benchmarks/bench_sampling_cold.py --n 1e7 --epochs 100 --repeat 3 \\
        [--store PATH --keep] [--old OLD_CHECKOUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import numpy as np
from pipeline.store.trajectory import TrajectoryStore

url, k, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
st = TrajectoryStore.open(url)
meta = st.require_meta()
grid = st.chunk_grid()
rows = np.sort(np.random.default_rng(seed).choice(meta.n_rows, k, replace=False))
cols = np.arange(meta.n_epochs)
out = {}
for label in ("cold", "warm"):
    t = time.perf_counter()
    x, nbytes = grid.read_scattered(rows, cols)
    out[label] = time.perf_counter() - t
out["checksum"] = float(np.nansum(x.astype(np.float64)))
print(json.dumps(out))
"""


def evict(store: Path) -> int:
    """Drop the store's trajectory chunk files from the page cache; the number of files."""
    os.sync()
    n = 0
    for path in (store / "trajectory" / "c").rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


def run_child(store: Path, k: int, seed: int, code: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code)}
    got = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), str(k), str(seed)],
        env=env, check=True, capture_output=True, text=True, cwd=str(code),
    )  # fmt: skip
    return json.loads(got.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e7, help="rows of the synthetic store")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--samples", type=int, default=1000, help="rows read (the fit's K)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (medians reported)")
    ap.add_argument("--store", default="bench-output/sampling-cold.zarr")
    ap.add_argument("--keep", action="store_true", help="keep the store")
    ap.add_argument("--old", default=None, help="a checkout of the code to compare with")
    ap.add_argument("--out", default="bench-output/sampling-cold.json")
    a = ap.parse_args(argv)
    if not hasattr(os, "posix_fadvise"):
        print("posix_fadvise is not available here: cannot evict the store from the page cache")
        return 1
    store = Path(a.store).resolve()
    made = False
    if not (store / "trajectory").exists():
        from pipeline.bench.common import synthetic_store

        print(f"writing a synthetic float32 store N={a.n:.3g} x T={a.epochs} ...", flush=True)
        synthetic_store(str(store), int(a.n), a.epochs, 10)
        made = True
    variants = [("this code", ROOT)]
    if a.old:
        variants.append(("old", Path(a.old).resolve()))
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        for r in range(a.repeat):
            for label, code in variants:
                files = evict(store)
                got = run_child(store, a.samples, 1000 + r, code)
                runs.setdefault(label, []).append(got)
                print(f"round {r} {label}: cold {got['cold']:.2f} s, warm {got['warm']:.3f} s "
                      f"({files} chunk files evicted)", flush=True)
    finally:
        if made and not a.keep:
            shutil.rmtree(store, ignore_errors=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("cold", "warm")} for k, v in runs.items()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"medians": med, "runs": runs}, indent=2))
    values = a.samples * a.epochs
    print(f"\n{a.samples} rows x {a.epochs} epochs = {values:,} values, N = {a.n:.3g}; medians of {a.repeat}")
    print("| code | cold s | warm s | cold / warm |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v['cold']:.2f} | {v['warm']:.3f} | {v['cold'] / v['warm']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

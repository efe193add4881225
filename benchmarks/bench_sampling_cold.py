"""Sampling from a store that is not in the page cache: the fit's K sampled rows x T epochs,
one value per read, cold and warm.

The fit draws its K samples (default 1000) by reading each sampled value on its own
(:meth:`pipeline.store.trajectory.ChunkGrid.read_scattered`): 100,000 reads at T = 100. From the
page cache that takes a fraction of a second; from a disk, each read waits for the disk. This
benchmark writes (or reuses) a synthetic float32 store, then per round and per variant:

1. evicts the store's chunk files from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``
   on every file after a ``sync``: no root needed, but pages another process read just before
   may stay; ``--drop-caches``, as root: the whole page cache emptied first, reliably);
2. in a fresh process (``PYTHONPATH`` = this checkout, or ``--old PATH``): opens the store and
   times ``read_scattered`` of ``--samples`` random rows (the same rows for every variant) x
   every epoch, then the same call again (now from the page cache);
3. with ``--blocks B``, per variant: the store evicted, then in a fresh process B fit blocks
   of 131,072 rows x every epoch (every 5th block of the store: blocks apart, as a worker
   of a larger cluster meets them; other blocks for every variant and round) mapped (``ChunkGrid.map_rows``) and summed in the fit
   kernel's order (512 rows at a time across all epochs); the median seconds per block;
4. with ``--fit``, per round also: the store evicted again and read whole by two threads (a
   plain read of every chunk file: the reference), then per variant the store evicted and a
   whole ``pipeline.fit`` (M = 10, K = ``--samples``) timed in a fresh process on the
   LocalCluster (started before the clock; the study is deleted after).

Usage::

    .venv/bin/python benchmarks/bench_sampling_cold.py --n 1e7 --epochs 100 --repeat 3 \\
        [--store PATH --keep] [--old OLD_CHECKOUT] [--blocks 8] [--fit] [--drop-caches]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
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


FIT_CHILD = r"""
import json, sys, time
if __name__ == "__main__":
    import pipeline
    from pipeline.runtime import RuntimeOptions, runner
    from pipeline.store.analysis import AnalysisGroup

    url, k, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with runner(RuntimeOptions(mode="local", workers=2, progress=False)) as run:
        sys.stdin.readline()  # the parent evicts the store once the cluster is up
        t = time.perf_counter()
        pipeline.fit(url, name, modes=10, samples=k, run=run)
        s = time.perf_counter() - t
    AnalysisGroup(url, name).delete()
    print(json.dumps({"fit": s}))
"""


BLOCK_CHILD = r"""
import json, os, statistics, sys, time
import numpy as np
from pipeline.store.trajectory import TrajectoryStore

url, b, off, drop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
st = TrajectoryStore.open(url)
grid = st.chunk_grid()
meta = st.require_meta()
rows, cols = 131072, np.arange(meta.n_epochs)


def read_bytes():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


times, nbytes = [], []
for k in range(b):
    r0 = (5 * k + off) * rows % max(rows, meta.n_rows - rows) // rows * rows
    os.sync()  # every block from an empty page cache
    if drop:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    else:
        for path in {os.path.join(url, "trajectory", "c", str(r0 // grid.chunk_rows), str(c)) for c in cols}:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    io0 = read_bytes()
    t = time.perf_counter()
    x = grid.map_rows(r0, r0 + rows, cols)
    if x is None:
        raise SystemExit("the store's blocks cannot be mapped here")
    total = 0.0
    for c0 in range(0, rows, 512):
        total += float(x[:, c0 : c0 + 512].sum(dtype=np.float64))
    del x
    times.append(time.perf_counter() - t)
    nbytes.append(read_bytes() - io0)
print(json.dumps({"block": statistics.median(times), "block_read": statistics.median(nbytes)}))
"""


def read_all(store: Path) -> float:
    """Seconds to read every trajectory chunk file, by two threads."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(p for p in (store / "trajectory" / "c").rglob("*") if p.is_file())

    def read(paths: list[Path]) -> None:
        buf = bytearray(16 << 20)
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

    t = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(read, [files[0::2], files[1::2]]))
    return time.perf_counter() - t


def fit_child(store: Path, k: int, name: str, code: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.Popen(
        [sys.executable, "-c", FIT_CHILD, str(store), str(k), name], env=env, cwd=str(code),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    evict(store)  # (the child starts the clock once it reads the line below)
    out, err = proc.communicate("go\n")
    if proc.returncode:
        raise RuntimeError(f"the fit failed: {err[-2000:]}")
    return float(json.loads(out.strip().splitlines()[-1])["fit"])


#: empty the whole page cache (``--drop-caches``) instead of advising each file away
DROP_CACHES = False


def evict(store: Path) -> int:
    """Drop the store's trajectory chunk files from the page cache; the number of files.

    ``posix_fadvise(DONTNEED)`` needs no root but leaves pages behind that another process read
    just before (on another CPU, not yet on the kernel's page lists): an earlier version of
    this benchmark timed "cold" blocks at page-cache speed that way. ``--drop-caches`` (root)
    empties the whole page cache instead."""
    os.sync()
    if DROP_CACHES:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
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


def _table(title: str, head: list[str], rows: list[list[str]]) -> None:
    """Print a markdown table (after ``title``, when given)."""
    if title:
        print(title)
    for cells in [head, ["---"] * len(head), *rows]:
        print("| " + " | ".join(cells) + " |")


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
    ap.add_argument("--blocks", type=int, default=0, help="also time B mapped fit blocks from the evicted store")
    ap.add_argument("--fit", action="store_true", help="also time a whole fit from the evicted store")
    ap.add_argument("--drop-caches", action="store_true",
                    help="empty the whole page cache before each timed run (root; more reliable)")
    a = ap.parse_args(argv)
    global DROP_CACHES
    DROP_CACHES = a.drop_caches
    if a.drop_caches and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        ap.error("--drop-caches needs write access to /proc/sys/vm/drop_caches (root, Linux)")
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
            for v, (label, code) in enumerate(variants if a.blocks else ()):
                evict(store)
                off = 2 * v + 3 * len(variants) * r  # blocks no other run of this benchmark read
                env = {**os.environ, "PYTHONPATH": str(code)}
                got = subprocess.run(
                    [sys.executable, "-c", BLOCK_CHILD, str(store), str(a.blocks), str(off),
                     "1" if DROP_CACHES else "0"],
                    env=env, check=True, capture_output=True, text=True, cwd=str(code),
                )  # fmt: skip
                runs[label][-1].update(json.loads(got.stdout.strip().splitlines()[-1]))
                print(f"round {r} {label}: a mapped block from the evicted store "
                      f"{runs[label][-1]['block']:.3f} s, {runs[label][-1]['block_read'] / 1e6:.0f} MB "
                      "read from the disk", flush=True)
            if a.fit:
                evict(store)
                runs.setdefault("read", []).append({"read": read_all(store)})
                print(f"round {r} plain read, cold: {runs['read'][-1]['read']:.2f} s", flush=True)
                for label, code in variants:
                    s = fit_child(store, a.samples, f"cold-fit-{r}-{time.time_ns()}", code)
                    runs[label][-1]["fit"] = s
                    print(f"round {r} {label}: fit from the evicted store {s:.2f} s", flush=True)
    finally:
        if made and not a.keep:
            shutil.rmtree(store, ignore_errors=True)
    med = {
        k: {m: statistics.median(x[m] for x in v) for m in ("cold", "warm", "block", "block_read", "fit", "read") if m in v[0]}
        for k, v in runs.items()
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"medians": med, "runs": runs}, indent=2))
    values = a.samples * a.epochs
    print(f"\n{a.samples} rows x {a.epochs} epochs = {values:,} values, N = {a.n:.3g}; medians of {a.repeat}")
    _table("", ["code", "cold s", "warm s", "cold / warm"],
           [[k, f"{v['cold']:.2f}", f"{v['warm']:.3f}", f"{v['cold'] / v['warm']:.0f}"]
            for k, v in med.items() if "cold" in v])  # fmt: skip
    if a.blocks:
        _table(
            f"\na fit block (131,072 rows x {a.epochs} epochs) mapped from the evicted store and summed",
            ["code", f"s per block (median of {a.blocks})", "MB read from the disk per block"],
            [[k, f"{v['block']:.3f}", f"{v['block_read'] / 1e6:.0f}"] for k, v in med.items() if "block" in v],
        )
    if a.fit:
        read = med["read"]["read"]
        _table(
            f"\nfit from the evicted store (plain read of the whole store by 2 threads: {read:.2f} s)",
            ["code", "fit s", "fit / read"],
            [[k, f"{v['fit']:.2f}", f"{v['fit'] / read:.2f}"] for k, v in med.items() if "fit" in v],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Runtime benchmark: the same fit on each runtime, and the distributed scheduler's overhead.

On one synthetic trajectory store (planted modes plus noise; default N = 1e7, T = 50: 2 GB of
float32, read from the page cache after the first pass), the same ``pipeline.fit`` runs on:

- ``sync``: one thread in the client process (dask's synchronous scheduler);
- ``threads``: the threaded scheduler, one thread per core;
- ``local-1``: a LocalCluster with 1 single-threaded worker process;
- ``local-2``: a LocalCluster with 2 single-threaded worker processes (the default here);
- ``local-1x2``: a LocalCluster with 1 worker process of 2 threads: the same parallelism as
  ``threads``, so ``local-1x2 / threads`` is the distributed scheduler's overhead on this job.

Cluster start-up is not timed (a cluster serves many commands). Each configuration runs
``--repeats`` times, interleaved, and the median is reported. A second table times a graph of
``--tasks`` empty tasks on ``threads`` and ``local-1x2``: the per-task overhead of each
scheduler. Usage::

    .venv/bin/python benchmarks/bench_runtime.py --n 1e7 --epochs 50 --modes 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from dask import delayed

import pipeline
from pipeline.bench.common import synthetic_store
from pipeline.runtime import RuntimeOptions, runner

CONFIGS = {
    "sync": RuntimeOptions(mode="sync", progress=False),
    "threads": RuntimeOptions(mode="threads", progress=False),
    "local-1": RuntimeOptions(workers=1, progress=False),
    "local-2": RuntimeOptions(workers=2, progress=False),
    "local-1x2": RuntimeOptions(workers=1, threads_per_worker=2, progress=False),
}


def _noop(i: int) -> int:
    return i


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e7)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--store", default="bench-output/runtime-store.zarr")
    ap.add_argument("--out", default="bench-output/runtime.json")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic store")
    a = ap.parse_args(argv)
    n = int(a.n)
    store = Path(a.store)
    shutil.rmtree(store, ignore_errors=True)
    store.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing a synthetic store: N={n:,} x T={a.epochs} ({n * a.epochs * 4 / 1e9:.1f} GB)", flush=True)
    synthetic_store(str(store), n, a.epochs, a.modes)
    nbytes = n * a.epochs * 4
    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    overhead: dict[str, float] = {}
    with ExitStack() as stack:
        runners = {k: stack.enter_context(runner(o)) for k, o in CONFIGS.items()}
        # warm the page cache and every runtime once (imports, worker start-up)
        pipeline.fit(str(store), "warm", modes=a.modes, samples=a.samples, run=runners["threads"])
        for rep in range(a.repeats):
            for k, rt in runners.items():
                name = f"{k}-{rep}"
                t0 = time.perf_counter()
                pipeline.fit(str(store), name, modes=a.modes, samples=a.samples, run=rt)
                times[k].append(time.perf_counter() - t0)
                print(f"  {k:<10} run {rep}: {times[k][-1]:.2f} s", flush=True)
                pipeline.store.analysis.AnalysisGroup(str(store.resolve()), name).delete()
        for k in ("threads", "local-1x2"):
            rt = runners[k]
            runs = []
            for _ in range(a.repeats):
                tasks = [delayed(_noop, pure=False)(i) for i in range(a.tasks)]
                t0 = time.perf_counter()
                rt.compute(tasks, "noop")
                runs.append(time.perf_counter() - t0)
            overhead[k] = statistics.median(runs) / a.tasks
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["threads"]
    print()
    print(f"fit of N={n:,} x T={a.epochs} ({nbytes / 1e9:.1f} GB), M={a.modes}, K={a.samples}; "
          f"median of {a.repeats}")
    print("| runtime | time | throughput | time / threads |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} s | {nbytes / v / 1e9:.2f} GB/s | {v / base:.2f} |")
    print()
    print(f"scheduler overhead: {a.tasks} empty tasks")
    print("| scheduler | per task |")
    print("|---|---|")
    for k, v in overhead.items():
        print(f"| {k} | {v * 1e3:.3f} ms |")
    Path(a.out).write_text(
        json.dumps(
            {"n": n, "epochs": a.epochs, "modes": a.modes, "samples": a.samples, "bytes": nbytes,
             "times": times, "median": med, "per_task_overhead_s": overhead},
            indent=2,
        )
        + "\n"
    )
    if not a.keep:
        shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

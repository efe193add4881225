"""The end of the fit: the blocks' statistics gathered on the client against the tree of tasks.

On one synthetic store fitted with many small blocks (``--block-rows``), in one run and on one
LocalCluster (``--workers`` single-threaded processes), interleaved ``--repeat`` times:

- ``client``: what the previous release did once every block had run: read every block's
  ``block_stats`` row on the client (one chunk per block), fold and summarise;
- ``tree``: what the fit does now: :func:`pipeline.graph.fit.build_totals` on the cluster, its
  leaves reading the rows of finished blocks (the resume case; in a fresh fit the rows come
  straight from the fit tasks and nothing is read), the client gathering one vector;

both giving the same sums to rounding (checked). Prints seconds and milliseconds per block of each,
and the client-side time per block each leaves at a given number of blocks. Usage::

    .venv/bin/python benchmarks/bench_fit_end.py --n 2e6 --epochs 10 --block-rows 500 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

import pipeline
from pipeline.bench.common import synthetic_store
from pipeline.graph.fit import build_totals
from pipeline.ops.fit import summarise
from pipeline.plan.fit import StatsLayout
from pipeline.plan.layout import RowLayout
from pipeline.runtime import RuntimeOptions, runner
from pipeline.store.analysis import AnalysisGroup
from pipeline.store.trajectory import TrajectoryStore


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=2e6)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--modes", type=int, default=4)
    ap.add_argument("--block-rows", type=int, default=500, help="rows per fit task (a divisor of the store's chunk rows)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--store", default="bench-output/fit-end.zarr")
    ap.add_argument("--out", default="bench-output/fit-end.json")
    a = ap.parse_args(argv)
    n = int(a.n)
    url = str(Path(a.store).absolute())
    shutil.rmtree(url, ignore_errors=True)
    synthetic_store(url, n, a.epochs, a.modes)
    try:
        with runner(RuntimeOptions(workers=a.workers, progress=False)) as run:
            t = time.perf_counter()
            res = pipeline.fit(url, "end", modes=a.modes, block_rows=a.block_rows, run=run)
            fit_s = time.perf_counter() - t
            n_blocks = res.blocks_run
            print(f"N={n:.3g} T={a.epochs}: fit with {n_blocks} blocks of {a.block_rows} rows: {fit_s:.2f} s", flush=True)
            meta = TrajectoryStore.open(url).require_meta()
            names = list(RowLayout.from_entries([(e.name, e.offset, e.size) for e in meta.stored_tensors()]).names)
            ag = AnalysisGroup(url, "end")
            width = int(ag.array("block_stats").shape[1])
            ref_index = np.asarray(ag.array("ref_index")[...])
            epochs = list(res.epochs)
            n_modes = res.n_modes
            max_layers = (width - 3 * len(epochs) - StatsLayout.PER * n_modes) // (1 + StatsLayout.PER)
            layout = StatsLayout(n_modes, len(epochs), max_layers)
            assert layout.width == width
            times: dict[str, list[float]] = {"client": [], "tree": []}
            summaries = {}
            for _ in range(a.repeat):
                t = time.perf_counter()
                rows = np.asarray(ag.array("block_stats")[...])
                summaries["client"] = layout.fold(rows, len(names))
                summarise(summaries["client"], layout, names, epochs, ref_index)
                times["client"].append(time.perf_counter() - t)
                t = time.perf_counter()
                total = build_totals(url, "end", layout, len(names), n_blocks, {})
                totals = run.compute([], "totals", reduce=total)
                summaries["tree"] = np.asarray(totals)
                summarise(summaries["tree"], layout, names, epochs, ref_index)
                times["tree"].append(time.perf_counter() - t)
            # the same sums (to rounding: the tree adds them in another order)
            same = bool(np.allclose(summaries["client"], summaries["tree"], rtol=1e-12, atol=0))
    finally:
        shutil.rmtree(url, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"N": n, "T": a.epochs, "block_rows": a.block_rows, "blocks": n_blocks, "workers": a.workers,
           "fit_seconds": fit_s, "seconds": times, "median_seconds": med, "same_sums": same}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print("| end of the fit | median s | ms per block |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / n_blocks * 1e3:.3f} |")
    print(f"tree / client: {med['tree'] / med['client']:.2f}; same sums: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a fit task's time goes: each step of ``fit_task`` timed where the fit calls it.

On one synthetic trajectory store (planted modes plus noise, as ``bench_fit.py``), runs
``pipeline.fit`` ``--repeat`` times on the ``threads`` runtime (``--workers`` threads in this
process, so that the steps can be timed by wrapping the functions the task calls) and on the
synchronous runtime (one thread), and prints per fit task, in milliseconds:

- ``task``: the whole :func:`pipeline.graph.fit.fit_task`;
- ``block``: :meth:`ChunkGrid.rows_block` (the block mapped from the chunk files, or read);
- ``kernel``: the fused kernel :func:`pipeline.kernels.cmd_numba.fit_block_fused`;
- ``stored``: :func:`pipeline.kernels.cmd_numba.stored_coefficients_fused` (float32 a, level);
- ``sums``: :func:`pipeline.kernels.cmd_numba.group_sums_fused` (per mode, per layer);
- ``writes``: :func:`pipeline.store.analysis.write_result_chunk` (the result chunks and the
  block's statistics row);
- ``other``: the rest of the task;

and the fit's wall time with the share of it before the first task starts (sampling,
clustering, creating the study). With the threads runtime the steps of two tasks overlap in
time, so each is the time one task waited for it. Usage::

    .venv/bin/python benchmarks/bench_fit_breakdown.py --n 1e7 --epochs 100 --modes 10
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import pipeline
import pipeline.graph.fit as fit_graph
from pipeline.bench.common import synthetic_store
from pipeline.kernels import cmd_numba
from pipeline.runtime import RuntimeOptions, runner
from pipeline.store.analysis import AnalysisGroup
from pipeline.store.trajectory import ChunkGrid

STEPS = ("task", "block", "kernel", "stored", "sums", "writes")


class _Timers:
    """Wraps module attributes with timers (per label: total seconds, calls, first start)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self.first: dict[str, float] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.total[label] += time.perf_counter() - t
                    self.calls[label] += 1
                    self.first.setdefault(label, t)

        self._undo.append((owner, name, fn))
        setattr(owner, name, timed)

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()
        self.first.clear()

    def restore(self) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)


def _one_fit(url: str, mode: str, workers: int, modes: int, repeat: int, t: _Timers) -> list[dict[str, float]]:
    rows = []
    with runner(RuntimeOptions(mode=mode, workers=workers, progress=False)) as run:
        for i in range(repeat):
            t.reset()
            start = time.perf_counter()
            pipeline.fit(url, f"breakdown-{mode}-{i}", modes=modes, samples=1000, run=run)
            wall = time.perf_counter() - start
            AnalysisGroup(url, f"breakdown-{mode}-{i}").delete()
            n = max(t.calls["task"], 1)
            row = {k: 1e3 * t.total[k] / n for k in STEPS}
            row["other"] = row["task"] - sum(row[k] for k in STEPS[1:])
            row["tasks"] = t.calls["task"]
            row["wall_s"] = wall
            row["before_tasks_s"] = t.first.get("task", start) - start
            rows.append(row)
            print(f"  {mode} {i}: wall {wall:.2f} s, {n} tasks, {row['task']:.1f} ms per task", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e7)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2, help="threads of the threads runtime")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--store", default="bench-output/fit-breakdown.zarr")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic store")
    a = ap.parse_args(argv)
    url = os.path.abspath(a.store)
    if not os.path.exists(url):
        print(f"writing a synthetic float32 store N={a.n:.3g} x T={a.epochs} ...", flush=True)
        synthetic_store(url, int(a.n), a.epochs, a.modes)
    cmd_numba.warm_up(("float32",))
    timers = _Timers()
    wraps: list[tuple[Any, str, str]] = [
        (fit_graph, "fit_task", "task"),
        (ChunkGrid, "rows_block", "block"),
        (cmd_numba, "fit_block_fused", "kernel"),
        (cmd_numba, "stored_coefficients_fused", "stored"),
        (cmd_numba, "group_sums_fused", "sums"),
        (fit_graph, "write_result_chunk", "writes"),
    ]
    for owner, name, label in wraps:
        timers.wrap(owner, name, label)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        results["threads"] = _one_fit(url, "threads", a.workers, a.modes, a.repeat, timers)
        results["sync"] = _one_fit(url, "sync", 1, a.modes, a.repeat, timers)
    finally:
        timers.restore()
        if not a.keep:
            shutil.rmtree(url, ignore_errors=True)
    cols: list[tuple[str, Callable[[dict[str, float]], float]]] = [
        (k, lambda r, k=k: r[k]) for k in (*STEPS, "other")
    ]
    print(f"\nN={a.n:.3g}, T={a.epochs}, M={a.modes}: ms per fit task (medians of {a.repeat})")
    print("| runtime | " + " | ".join(c for c, _ in cols) + " | tasks | fit wall s | before the first task s |")
    print("|---" * (len(cols) + 4) + "|")
    for mode, rows in results.items():
        med = {c: statistics.median(f(r) for r in rows) for c, f in cols}
        wall = statistics.median(r["wall_s"] for r in rows)
        before = statistics.median(r["before_tasks_s"] for r in rows)
        label = f"threads x{a.workers}" if mode == "threads" else "sync"
        print(f"| {label} | " + " | ".join(f"{med[c]:.1f}" for c, _ in cols)
              + f" | {int(rows[0]['tasks'])} | {wall:.2f} | {before:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

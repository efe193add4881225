"""Scale model of ``pipeline.fit``: measured per-task costs -> wall time at 7B and 70B parameters.

In one run, on this machine:

1. **Measure** (in-process, single-threaded, on a calibration store of ``--cal-blocks`` row
   blocks of the fit's default block size; synthetic planted modes, T = ``--epochs``):
   - ``c_read``: seconds per byte of getting the block as ``fit_task`` does
     (``ChunkGrid.rows_block``: mapped from the chunk files where the store allows, else read
     into the reused time-major buffer);
   - ``c_kernel``: seconds per value of ``fit_block_fused`` on that block (float32 as stored;
     also on the block as bfloat16 bits, ``dtype_code="bfloat16"``);
   - ``c_write`` + ``c_write0``: the rest of ``fit_task`` (sums, 6 result chunks and the
     ``block_stats`` row): ``fit_task`` itself on a block of a real study minus the read and
     the kernel of the same block, at two block sizes (R and R/4) -> per row + per task;
   - ``t_sched``: LocalCluster (``--workers`` single-threaded processes), ``--noop-tasks``
     empty tasks: wall / tasks (as ``benchmarks/bench_runtime.py``);
   - fixed costs: sampling (the fit's ``draw_samples`` over ``read_scattered``) at K, K/2 and
     T, T/2 -> ``a_s + b_s K T``; clustering ``cluster_modes(pearson(profiles))`` at K/4..2K
     -> ``c_c K^p``; study creation (``AnalysisGroup.create`` + attributes); the end of the fit
     (fold the blocks' ``block_stats`` rows, which runs in tasks, and ``summarise``) at R and
     R/4 -> per fit (into ``t_create``) + per block ``c_fin``;
   - ``eff_W``: parallel efficiency of the ``--workers`` processes here: the calibration
     blocks' read+kernel as tasks on the LocalCluster, (sum of the in-process times) /
     (W x wall); and ``B_local``: the same cluster's aggregate read rate (read-only tasks).
2. **Model** (rows per task R = the fit's ``fit_block_rows`` for N and T; n = ceil(N/R);
   s = bytes per stored value, 4 float32, 2 bf16)::

       t_task  = R*T*(s*c_read + c_kernel) + R*c_write + c_write0 + t_sched        (CPU)
       t_task  = R*T*(s*c_read + s/H + 4/G) + R*c_write + c_write0 + t_sched        (GPU)
       fixed   = a_s + b_s*K*T + c_c*K^p + t_create
       wall    = fixed + max( N*T*s/B,  ceil(n/W)*(t_task + c_fin)/eff,  n*(1 + 1/63)*t_sched )
       worker-hours = W * wall / 3600

   The pass over all rows is limited by the slowest of three shared resources: storage
   (bandwidth B, shared by all workers), the workers (W run tasks in rounds; ``eff`` is their
   parallel efficiency, 1 for workers on their own cores), and the one scheduler (it
   dispatches tasks one after another). ``c_read`` is the CPU cost of a read (page cache);
   the storage limit is the B term. GPU: G = ``--gpu-kernel-gbps`` (float32 GB/s through the
   kernel) and H = ``--gpu-h2d-gbps`` (host-to-device copy) are ASSUMPTIONS, not measured
   here (this machine has no GPU); the read, the writes and the scheduler stay as measured.
   bf16 stores: the store reads float32 today; s = 2 models a bf16 trajectory (half the
   bytes read and copied; the CPU kernel's measured bf16 upcast path).
3. **Validate**: ``pipeline.fit`` on the LocalCluster (``--workers``) at ``--sizes`` (each a
   fresh synthetic store, flushed to disk with ``os.sync()`` and deleted after; cluster
   start-up not timed, kernel loaded on the workers first), predicted (W = workers, B = B_local, eff = eff_W) vs measured wall time.
4. **Predict**: 7e9 and 7e10 parameters at T, float32 and bf16, W = 8, 64, 512 CPU workers
   and 8, 64 GPU workers, B = 2, 10, 50 GB/s (eff = 1): wall time and worker-hours.

Output: JSON (``--out``) and markdown tables on stdout. Usage::

    .venv/bin/python benchmarks/scale_model.py --epochs 100 --sizes 2e6,1e7,3e7 --out bench-output/scale.json
    .venv/bin/python benchmarks/scale_model.py --quick --out /tmp/scale-quick.json   # tiny, for the test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GB = 1e9

# --------------------------------------------------------------------------- the model


def block_rows_for(n: int, t: int) -> int:
    """Rows per fit task for an N x T store written by the pipeline (default chunking)."""
    from pipeline.config import FIT_BLOCK_BYTES
    from pipeline.plan import fit_block_rows
    from pipeline.plan.layout import default_chunk_rows

    return fit_block_rows(default_chunk_rows(n, 1), t, raw=True, target_bytes=FIT_BLOCK_BYTES)


def predict(
    n: float,
    t: int,
    w: int,
    bandwidth: float,
    costs: dict[str, Any],
    *,
    rows: int,
    samples: int = 1000,
    bytes_per_value: int = 4,
    gpu: bool = False,
    gpu_kernel_gbps: float = 200.0,
    gpu_h2d_gbps: float = 20.0,
    efficiency: float = 1.0,
) -> dict[str, Any]:
    """Predicted wall time (s) and worker-hours of ``pipeline.fit`` on N x T values.

    ``costs``: ``c_read`` (s/byte), ``c_kernel`` (s/value; a dict by bytes per value, or a
    number), ``c_write`` (s/row), ``c_write0`` (s/task), ``t_sched`` (s/task), ``a_s`` (s),
    ``b_s`` (s per sampled value), ``c_c``, ``p`` (clustering c_c K^p s), ``t_create`` (s),
    ``c_fin`` (s/task). ``bandwidth``: storage bytes/s shared by all workers. ``rows``: rows
    per task. See the module docstring for the formula.
    """
    from pipeline.graph.fit import TOTALS_FAN_IN

    s = bytes_per_value
    n_tasks = math.ceil(n / rows)
    vals = rows * t
    if gpu:
        per_value = s * costs["c_read"] + s / (gpu_h2d_gbps * GB) + 4 / (gpu_kernel_gbps * GB)
    else:
        ck = costs["c_kernel"]
        if isinstance(ck, dict):
            ck = ck.get(str(s), ck.get(s, ck.get("4", ck.get(4))))
        per_value = s * costs["c_read"] + ck
    # c_fin: folding a block's stats row into the totals, in the tree's tasks (one per
    # TOTALS_FAN_IN blocks, and as many again above them, each one more scheduler task)
    t_task = (
        vals * per_value + rows * costs["c_write"] + costs["c_write0"] + costs["t_sched"]
        + costs["c_fin"]
    )  # fmt: skip
    sampling = costs["a_s"] + costs["b_s"] * samples * t
    clustering = costs["c_c"] * samples ** costs["p"]
    fixed = sampling + clustering + costs["t_create"]
    storage = n * t * s / bandwidth
    compute = math.ceil(n_tasks / w) * t_task / efficiency
    scheduler = n_tasks * (1 + 1 / (TOTALS_FAN_IN - 1)) * costs["t_sched"]
    pass_s = max(storage, compute, scheduler)
    bound = ("storage", "workers", "scheduler")[[storage, compute, scheduler].index(pass_s)]
    wall = fixed + pass_s
    return {
        "N": n, "T": t, "W": w, "B_GBps": bandwidth / GB, "bytes_per_value": s, "gpu": gpu,
        "rows_per_task": rows, "n_tasks": n_tasks, "t_task_s": t_task,
        "fixed_s": fixed, "sampling_s": sampling, "clustering_s": clustering,
        "storage_s": storage, "compute_s": compute, "scheduler_s": scheduler,
        "bound": bound, "wall_s": wall, "worker_hours": w * wall / 3600,
    }


# --------------------------------------------------------------------------- tasks


def _noop(i: int) -> int:
    return i


def _read_kernel_task(grid: Any, r0: int, r1: int, cols: np.ndarray, refs: Any) -> float:
    from pipeline.kernels import cmd_numba

    t0 = time.perf_counter()
    x, _ = grid.rows_block(r0, r1, cols, "fit-block")  # as the fit: mapped where it can be
    cmd_numba.fit_block_fused(x, refs)
    del x
    return time.perf_counter() - t0


def _read_task(grid: Any, r0: int, r1: int, cols: np.ndarray) -> int:
    from pipeline.graph.fit import _time_major

    x = _time_major(len(cols), r1 - r0)
    return grid.read_rows(r0, r1, cols, x)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even; finite data)."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _fit_power(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """``c, p`` of ``y = c x^p`` by least squares in log-log; a cost never falls as the size
    grows, so a negative exponent (timing noise over a small range) is taken as 0 (a constant:
    the mean)."""
    lx, ly = np.log(xs), np.log(ys)
    p, lc = np.polyfit(lx, ly, 1)
    if p < 0:
        return float(np.exp(ly.mean())), 0.0
    return float(math.exp(lc)), float(p)


# --------------------------------------------------------------------------- measurement


def measure(url: str, n_cal: int, t: int, modes: int, samples: int, run: Any, noop_tasks: int,
            log: Any) -> dict[str, Any]:
    from dask import delayed

    import pipeline
    from pipeline.graph.fit import fit_task
    from pipeline.kernels import cmd_numba
    from pipeline.kernels.cluster import cluster_modes
    from pipeline.kernels.cmd import References, pearson
    from pipeline.ops.fit import _sample, summarise
    from pipeline.plan import RowLayout, StatsLayout, plan_fit
    from pipeline.plan.layout import blocks
    from pipeline.runtime import Runner, RuntimeOptions
    from pipeline.store.analysis import AnalysisGroup
    from pipeline.store.trajectory import TrajectoryStore

    st = TrajectoryStore.open(url, writable=True)
    meta = st.require_meta()
    grid = st.chunk_grid()
    cols = np.arange(t)
    layout = RowLayout.from_entries([(e.name, e.offset, e.size) for e in meta.stored_tensors()])
    rows = block_rows_for(n_cal, t)
    cmd_numba.warm_up(("float32", "bfloat16"))
    out: dict[str, Any] = {"calibration_N": n_cal, "rows_per_task": rows}

    # a real study at R and R/4 rows per task (sync: in this process)
    small = max(1, rows // 4)
    names = {rows: "scale-probe", small: "scale-probe-q"}
    sync = RuntimeOptions(mode="sync", progress=False)
    for r, name in names.items():
        tt = time.perf_counter()
        pipeline.fit(url, name, modes=modes, samples=samples, block_rows=r, runtime=sync, force=True)
        out[f"sync_fit_s_R{r}"] = time.perf_counter() - tt
    log(f"  sync fits: {[round(out[k], 2) for k in out if k.startswith('sync_fit')]} s")

    rd, kn, kb, wr = [], [], [], {rows: [], small: []}
    layouts: dict[int, Any] = {}
    for r, name in names.items():
        ag = AnalysisGroup(st.url, name)
        refs = References.from_profiles(np.asarray(ag.array("refs")[...]))
        plan = plan_fit(meta, name, chunk_rows=grid.chunk_rows, raw=True, modes=modes, threshold=None,
                        samples=samples, seed=0, window=None, block_rows=r)
        plans = plan.block_plans(layout, np.asarray(ag.array("ref_index")[...]),
                                 np.asarray(ag.array("sample_index")[...]))
        n_modes = int(np.asarray(ag.array("refs")[...]).shape[0])
        sl = StatsLayout(n_modes, t, max(len(p.layers) for p in plans))
        layouts[r] = (sl, ag)
        for p in plans[:24]:
            t0 = time.perf_counter()
            # as fit_task gets its block: mapped from the chunk files where it can be (then
            # the kernel's time includes the page faults), else read into the reused buffer
            x, _ = grid.rows_block(p.r0, p.r1, cols, "fit-block")
            t1 = time.perf_counter()
            cmd_numba.fit_block_fused(x, refs)
            t2 = time.perf_counter()
            if r == rows:
                xb = _bf16_bits(np.ascontiguousarray(x))
                t3 = time.perf_counter()
                cmd_numba.fit_block_fused(xb, refs, dtype_code="bfloat16")
                kb.append((time.perf_counter() - t3) / x.size)
                rd.append((t1 - t0) / x.nbytes)
                kn.append((t2 - t1) / x.size)
            t4 = time.perf_counter()
            fit_task(grid, name, p, cols, refs, sl)
            total = time.perf_counter() - t4
            wr[r].append(total - (t2 - t0))  # fit_task minus its read and kernel
    out["c_read"] = statistics.median(rd)
    out["c_kernel"] = {"4": statistics.median(kn), "2": statistics.median(kb)}
    w_big, w_small = statistics.median(wr[rows]), statistics.median(wr[small])
    c_write = max(0.0, (w_big - w_small) / (rows - small)) if rows > small else 0.0
    out["c_write"] = c_write
    out["c_write0"] = max(0.0, w_big - c_write * rows)
    out["t_write_per_task_s"] = w_big
    out["t_read_per_task_s"] = out["c_read"] * rows * t * 4
    out["t_kernel_per_task_s"] = out["c_kernel"]["4"] * rows * t
    log(f"  per task of {rows} rows: read {out['t_read_per_task_s'] * 1e3:.1f} ms, kernel "
        f"{out['t_kernel_per_task_s'] * 1e3:.1f} ms, write+sums {w_big * 1e3:.1f} ms")

    # fixed costs: sampling (K, T), clustering (K), creation, the end of the fit (per block)
    seed = 0
    samp = []
    for k in (samples // 2, samples):
        for tc in (t // 2, t):
            c = cols[:tc]
            none = lambda: (_ for _ in ()).throw(RuntimeError("no scan"))  # noqa: E731
            # the sampling's gather tasks, in this process (the per-value read cost)
            sync = lambda: Runner(RuntimeOptions(mode="sync", progress=False))  # noqa: E731
            ts = []
            for rep in range(2):
                t0 = time.perf_counter()
                _sample(grid, layout, c, k, seed + rep + 1, none, sync)
                ts.append(time.perf_counter() - t0)
            samp.append((k * tc, min(ts)))
    b_s, a_s = np.polyfit([v for v, _ in samp], [s for _, s in samp], 1)
    out["sampling_points"] = samp
    out["a_s"], out["b_s"] = max(0.0, float(a_s)), max(0.0, float(b_s))
    drawn = _sample(grid, layout, cols, 2 * samples, 99, none, sync)
    clus = []
    for k in sorted({max(8, samples // 4), max(8, samples // 2), samples, 2 * samples}):
        prof = drawn.profiles[:k]
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            cluster_modes(pearson(prof), modes=modes)
            ts.append(time.perf_counter() - t0)
        clus.append((k, min(ts)))
    out["clustering_points"] = clus
    out["c_c"], out["p"] = _fit_power([k for k, _ in clus], [s for _, s in clus])
    ends = []  # the end of the fit: fold the blocks' stats rows (in tasks), summarise
    for r in (rows, small):
        sl, ag = layouts[r]
        stats = np.asarray(ag.array("block_stats")[...])
        ref_index = np.asarray(ag.array("ref_index")[...])
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            totals = sl.fold(stats, len(layout.names))
            summarise(totals, sl, list(layout.names), list(range(t)), ref_index)
            ts.append(time.perf_counter() - t0)
        ends.append((math.ceil(n_cal / r), min(ts)))
    (nb1, e1), (nb2, e2) = ends
    out["end_points"] = ends
    out["c_fin"] = max(0.0, (e2 - e1) / (nb2 - nb1)) if nb2 > nb1 else e1 / nb1
    out["t_end0"] = max(0.0, e1 - out["c_fin"] * nb1)
    n_blocks = math.ceil(n_cal / rows)
    tmp = AnalysisGroup(st.url, "scale-create")
    t0 = time.perf_counter()
    tmp.create(n_rows=n_cal, n_modes=modes, block_rows=rows, n_blocks=n_blocks,
               stats_width=stats.shape[1], small={"refs": np.zeros((modes, t))})
    tmp.set_attrs(config={}, status="running")
    out["t_create"] = time.perf_counter() - t0 + out["t_end0"]  # creation + end of the fit, per fit
    tmp.delete()
    log(f"  fixed: sampling {out['a_s']:.3f} s + {out['b_s'] * 1e6:.2f} us x K*T; clustering "
        f"{out['c_c']:.2e} K^{out['p']:.2f}; create {out['t_create']:.3f} s; end {out['c_fin'] * 1e3:.2f} ms/block")

    # scheduler overhead; parallel efficiency and aggregate read rate of the W workers
    client = run.client
    if client is not None:
        client.run(cmd_numba.warm_up, ("float32",))
    reps = []
    for _ in range(3):
        tasks = [delayed(_noop, pure=False)(i) for i in range(noop_tasks)]
        t0 = time.perf_counter()
        run.compute(tasks, "noop")
        reps.append((time.perf_counter() - t0) / noop_tasks)
    out["t_sched"] = statistics.median(reps)
    refs = References.from_profiles(np.asarray(AnalysisGroup(st.url, "scale-probe").array("refs")[...]))
    bl = list(blocks(n_cal, rows))
    single = []
    for r0, r1 in bl:
        single.append(_read_kernel_task(grid, r0, r1, cols, refs))
    tasks = [delayed(_read_kernel_task, pure=False)(grid, r0, r1, cols, refs) for r0, r1 in bl]
    run.compute(tasks[:2], "warm")
    t0 = time.perf_counter()
    in_worker = run.compute(tasks, "read+kernel")
    wall = time.perf_counter() - t0
    w = run.options.workers or 1
    out["workers"] = w
    out["eff"] = sum(single) / (w * wall)
    out["eff_in_task"] = statistics.median(single) / statistics.median(in_worker)
    tasks = [delayed(_read_task, pure=False)(grid, r0, r1, cols) for r0, r1 in bl]
    t0 = time.perf_counter()
    nb = sum(run.compute(tasks, "read"))
    out["B_local"] = nb / (time.perf_counter() - t0)
    log(f"  scheduler {out['t_sched'] * 1e3:.3f} ms/task; W={w} efficiency {out['eff']:.2f} "
        f"(in-task {out['eff_in_task']:.2f}); aggregate read {out['B_local'] / GB:.2f} GB/s")
    for name in (*names.values(),):
        AnalysisGroup(st.url, name).delete()
    return out


# --------------------------------------------------------------------------- main


def _fmt_t(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", default="2e6,1e7,3e7", help="validation sizes N, comma list")
    ap.add_argument("--cal-blocks", type=int, default=32,
                    help="calibration store size, in row blocks (a power of 2 keeps the block size)")
    ap.add_argument("--noop-tasks", type=int, default=2000)
    ap.add_argument("--gpu-kernel-gbps", type=float, default=200.0,
                    help="ASSUMED GPU kernel throughput, GB/s of float32 (not measured)")
    ap.add_argument("--gpu-h2d-gbps", type=float, default=20.0,
                    help="ASSUMED host-to-device copy rate, GB/s (not measured)")
    ap.add_argument("--alt-block-rows", type=int, default=262144,
                    help="also predict with this many rows per task (0: no)")
    ap.add_argument("--dir", default="bench-output", help="where the synthetic stores go")
    ap.add_argument("--out", default="bench-output/scale.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the test)")
    ap.add_argument("--no-validate", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.epochs, a.samples, a.noop_tasks, a.cal_blocks = 12, 120, 200, 6
        a.sizes = "2e4,4e4,8e4" if a.sizes == "2e6,1e7,3e7" else a.sizes
    t = a.epochs
    sizes = [int(float(x)) for x in a.sizes.split(",") if x.strip()]
    log = lambda m: print(m, flush=True)  # noqa: E731

    import pipeline
    from pipeline.bench.common import synthetic_store
    from pipeline.runtime import RuntimeOptions, runner
    from pipeline.store.analysis import AnalysisGroup

    base = Path(a.dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if a.quick:
        n_cal = 5000
        cal_rows = block_rows_for(n_cal, t)
    else:
        cal_rows = block_rows_for(10**9, t)  # the block size of a large store
        n_cal = a.cal_blocks * cal_rows
    result: dict[str, Any] = {"command": " ".join([sys.executable, *sys.argv]), "T": t, "modes": a.modes,
                              "samples": a.samples, "workers": a.workers, "assumptions": {
                                  "gpu_kernel_gbps": a.gpu_kernel_gbps, "gpu_h2d_gbps": a.gpu_h2d_gbps,
                                  "note": "GPU rates are assumptions, not measured; predictions use eff=1"}}
    with runner(RuntimeOptions(workers=a.workers, progress=False)) as run:
        cal = str(base / "scale-cal.zarr")
        shutil.rmtree(cal, ignore_errors=True)
        log(f"calibration store N={n_cal:,} x T={t} ({n_cal * t * 4 / GB:.2f} GB), {cal_rows} rows per task")
        try:
            synthetic_store(cal, n_cal, t, a.modes)
            os.sync()
            costs = measure(cal, n_cal, t, a.modes, a.samples, run, a.noop_tasks, log)
        finally:
            shutil.rmtree(cal, ignore_errors=True)
        result["costs"] = costs
        validation = []
        if not a.no_validate:
            for n in sizes:
                url = str(base / f"scale-val-{n}.zarr")
                shutil.rmtree(url, ignore_errors=True)
                try:
                    tw = time.perf_counter()
                    synthetic_store(url, n, t, a.modes)
                    write_s = time.perf_counter() - tw
                    os.sync()  # the fit reads a store at rest, not one still being written back
                    t0 = time.perf_counter()
                    res = pipeline.fit(url, "scale-val", modes=a.modes, samples=a.samples, run=run)
                    measured = time.perf_counter() - t0
                    AnalysisGroup(url, "scale-val").delete()
                finally:
                    shutil.rmtree(url, ignore_errors=True)
                pr = predict(n, t, a.workers, costs["B_local"], costs, rows=block_rows_for(n, t),
                             samples=a.samples, efficiency=costs["eff"])
                row = {"N": n, "store_write_s": write_s, "measured_s": measured, "predicted_s": pr["wall_s"],
                       "rel_error": (pr["wall_s"] - measured) / measured, "n_tasks": pr["n_tasks"],
                       "bound": pr["bound"], "fixed_s": pr["fixed_s"], "compute_s": pr["compute_s"],
                       "storage_s": pr["storage_s"], "modes_found": res.n_modes}
                validation.append(row)
                log(f"  N={n:.3g}: measured {measured:.2f} s, predicted {pr['wall_s']:.2f} s "
                    f"({100 * row['rel_error']:+.1f} %)")
        result["validation"] = validation
    preds = []
    for n in (7e9, 7e10):
        rows = block_rows_for(int(n), t)
        for s in (4, 2):
            for gpu, ws in ((False, (8, 64, 512)), (True, (8, 64))):
                for w in ws:
                    for b in (2, 10, 50):
                        preds.append(predict(n, t, w, b * GB, costs, rows=rows, samples=a.samples,
                                             bytes_per_value=s, gpu=gpu, gpu_kernel_gbps=a.gpu_kernel_gbps,
                                             gpu_h2d_gbps=a.gpu_h2d_gbps))
    result["predictions"] = preds
    alt = []  # the same pass with larger tasks (pipeline.fit's block_rows=): fewer scheduler round trips
    if a.alt_block_rows:
        for n in (7e9, 7e10):
            for gpu, w in ((False, 512), (True, 64)):
                for b in (10, 50):
                    alt.append(predict(n, t, w, b * GB, costs, rows=a.alt_block_rows, samples=a.samples,
                                       gpu=gpu, gpu_kernel_gbps=a.gpu_kernel_gbps, gpu_h2d_gbps=a.gpu_h2d_gbps))
    result["predictions_alt_block_rows"] = alt
    result["seconds"] = time.perf_counter() - t_start
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    c = costs
    print()
    print(f"measured costs (T={t}, {c['rows_per_task']} rows per task, {c['rows_per_task'] * t * 4 / 1e6:.1f} MB float32):")
    print("| cost | value |")
    print("|---|---|")
    print(f"| read (page cache, 1 process) | {1 / c['c_read'] / GB:.2f} GB/s = {c['t_read_per_task_s'] * 1e3:.1f} ms/task |")
    print(f"| fused kernel float32 | {4 / c['c_kernel']['4'] / GB:.2f} GB/s = {c['t_kernel_per_task_s'] * 1e3:.1f} ms/task |")
    print(f"| fused kernel bf16 (upcast) | {c['c_kernel']['2'] * 1e9:.2f} ns/value |")
    print(f"| sums + writes | {c['t_write_per_task_s'] * 1e3:.1f} ms/task ({c['c_write'] * 1e9:.1f} ns/row + {c['c_write0'] * 1e3:.2f} ms) |")
    print(f"| scheduler (LocalCluster, {c['workers']} workers) | {c['t_sched'] * 1e3:.3f} ms/task |")
    print(f"| sampling | {c['a_s']:.3f} s + {c['b_s'] * 1e6:.2f} us x K*T |")
    print(f"| clustering | {c['c_c']:.3g} x K^{c['p']:.2f} s |")
    print(f"| study creation / end of fit | {c['t_create']:.3f} s / {c['c_fin'] * 1e3:.2f} ms per block |")
    print(f"| W={c['workers']} efficiency here / aggregate read | {c['eff']:.2f} / {c['B_local'] / GB:.2f} GB/s |")
    if result["validation"]:
        print()
        print(f"validation: pipeline.fit on LocalCluster ({a.workers} workers), T={t}, M={a.modes}, K={a.samples}")
        print("| N | tasks | measured | predicted | error |")
        print("|---|---|---|---|---|")
        for r in result["validation"]:
            print(f"| {r['N']:.3g} | {r['n_tasks']} | {r['measured_s']:.2f} s | {r['predicted_s']:.2f} s | {100 * r['rel_error']:+.1f} % |")
    print()
    print(f"prediction, T={t}, K={a.samples}; GPU rows assume kernel {a.gpu_kernel_gbps:g} GB/s and "
          f"H2D {a.gpu_h2d_gbps:g} GB/s (NOT measured); wall (worker-hours), bound")
    print("| N | dtype | workers | B=2 GB/s | B=10 GB/s | B=50 GB/s |")
    print("|---|---|---|---|---|---|")
    for i in range(0, len(preds), 3):
        p3 = preds[i : i + 3]
        p = p3[0]
        kind = f"{p['W']} {'GPU' if p['gpu'] else 'CPU'}"
        cells = " | ".join(f"{_fmt_t(q['wall_s'])} ({q['worker_hours']:.3g} wh, {q['bound']})" for q in p3)
        print(f"| {p['N']:.0e} | {'f32' if p['bytes_per_value'] == 4 else 'bf16'} | {kind} | {cells} |")
    if alt:
        print()
        print(f"the same with block_rows={a.alt_block_rows} ({a.alt_block_rows * t * 4 / 1e6:.0f} MB float32 tasks), float32")
        print("| N | workers | B | tasks | wall | worker-hours | bound |")
        print("|---|---|---|---|---|---|---|")
        for q in alt:
            print(f"| {q['N']:.0e} | {q['W']} {'GPU' if q['gpu'] else 'CPU'} | {q['B_GBps']:g} GB/s | {q['n_tasks']} | "
                  f"{_fmt_t(q['wall_s'])} | {q['worker_hours']:.3g} | {q['bound']} |")
    print()
    print("wall = fixed + max(N*T*s/B, ceil(n/W)*(t_task + c_fin)/eff, n*(1 + 1/63)*t_sched); worker-hours = W*wall/3600")
    return 0


if __name__ == "__main__":
    sys.exit(main())

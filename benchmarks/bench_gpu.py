"""GPU fit benchmark: CMD fit on CuPy against the CPU kernel, on one store, in one run.

On one synthetic trajectory store (planted modes plus noise; default N = 2e7, T = 100, M = 10:
8 GB of float32 on disk), in this order:

1. ``read``: one plain read of every row block through the fit's I/O path
   (``ChunkGrid.read_rows`` into a time-major float32 block), on the CPU runtime;
2. ``fit-cpu``: ``pipeline.fit`` with the default CPU kernel (the fused numba kernel when numba
   imports; ``--cpu-kernel`` picks another) on the CPU runtime (LocalCluster);
3. ``transfer``: an instrumented call of the fit's GPU task body
   (:func:`pipeline.graph.fit._fit_on_gpu`) on one fit block in this process, ``--probe``
   times after one warm-up (which also compiles CuPy's kernels into its disk cache for the
   workers): pinned staging copy (host), host-to-device copy, kernel and device-to-host copy
   (CUDA events), and the whole call; the host-to-device share is H2D / call time;
4. ``fit-gpu``: ``pipeline.fit`` on the runtime of ``RuntimeOptions(gpu=True)`` (LocalCUDACluster,
   one worker per GPU; started before the clock, as the CPU cluster is) into a second study;

then the agreement of the GPU study with the CPU study: max |diff| of ``a``, ``b`` (relative to
the largest |value| of the CPU study) and ``corr`` (whose scale is 1), the fraction of rows with
the same mode, flags and references equal, and the two studies' error summaries.

``--stand-in`` runs the same code on the CPU with a stand-in ``cupy`` module made of numpy
arrays (pinned buffers, streams and events included) and the threaded runtime for both fits:
it exercises the benchmark where there is no GPU. Its figures are labelled ``stand-in``: they
are NOT GPU figures. Writes ``bench_gpu.json`` and ``bench_gpu.md`` into ``--out``; exits 1
when the agreement is outside ``--tol`` (or not exact with ``--stand-in`` and the numpy CPU
kernel: then per-row results must be bit-identical and the per-epoch sums equal to 1e-12).
Usage::

    python3 benchmarks/bench_gpu.py --n 4e6 --epochs 100 --modes 10 --out gpu-check
    .venv/bin/python benchmarks/bench_gpu.py --stand-in --n 2e5 --out bench-output/gpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
from dask import delayed

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402
from pipeline.bench.common import synthetic_store  # noqa: E402
from pipeline.config import FIT_KERNEL_ENV  # noqa: E402
from pipeline.kernels.cmd import References, fit_block  # noqa: E402
from pipeline.plan import blocks  # noqa: E402
from pipeline.runtime import RuntimeOptions, runner  # noqa: E402
from pipeline.store.analysis import AnalysisGroup  # noqa: E402
from pipeline.store.trajectory import ChunkGrid, TrajectoryStore  # noqa: E402

STAND_IN_LABEL = "stand-in (numpy on the CPU; not GPU figures)"


# --- the stand-in cupy module -----------------------------------------------------------------


class StandInArray(np.ndarray):
    """Marks arrays on the stand-in "device" (numpy memory)."""


class _Stream:
    def __init__(self, non_blocking: bool = False) -> None:
        self.non_blocking = non_blocking

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def synchronize(self) -> None:
        return None


class _Event:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.t = 0.0

    def record(self, stream: Any = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        return None


def stand_in_cupy(calls: list[str] | None = None) -> types.ModuleType:
    """A ``cupy`` stand-in: every function allocates :class:`StandInArray` (with CuPy's
    ``set``/``get``); ``cuda`` has pinned memory (a bytearray), streams and events (host
    timers). ``calls`` records the transfers and pinned allocations."""
    log = calls if calls is not None else []

    class Device(StandInArray):
        def set(self, arr: np.ndarray, stream: Any = None) -> None:
            log.append("set")
            np.copyto(self.view(np.ndarray), arr)

        def get(self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True) -> Any:
            log.append("get")
            host = self.view(np.ndarray)
            if out is None:
                return np.array(host, order=order)
            np.copyto(out, host)
            return out

    def asarray(x: Any, dtype: Any = None) -> Device:
        log.append("asarray")
        return np.array(x, dtype=dtype).view(Device)

    def asnumpy(x: Any) -> np.ndarray:
        log.append("asnumpy")
        return np.asarray(x).view(np.ndarray).copy()

    def pinned(nbytes: int) -> bytearray:
        log.append("alloc_pinned_memory")
        return bytearray(nbytes)

    def on_device(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            return out.view(Device) if isinstance(out, np.ndarray) else out

        return call

    def attr(name: str) -> Any:
        # functions allocate "device" arrays; types (float64, ...) and constants stay numpy's
        v = getattr(np, name)
        return v if isinstance(v, type) or not callable(v) else on_device(v)

    mod = types.ModuleType("cupy")
    mod.ndarray = Device  # type: ignore[attr-defined]
    mod.asarray = asarray  # type: ignore[attr-defined]
    mod.asnumpy = asnumpy  # type: ignore[attr-defined]
    mod.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        alloc_pinned_memory=pinned,
        Stream=_Stream,
        Event=_Event,
        get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
    )
    mod.__getattr__ = attr  # type: ignore[method-assign]
    return mod


# --- measurements -----------------------------------------------------------------------------


def _read_task(grid: ChunkGrid, r0: int, r1: int, cols: np.ndarray) -> int:
    out = np.empty((len(cols), r1 - r0), dtype=np.float32)
    return grid.read_rows(r0, r1, cols, out)


def _study(url: str, name: str) -> dict[str, np.ndarray]:
    ag = AnalysisGroup(url, name)
    keys = ("mode", "a", "level", "anchor", "corr", "residual", "flags", "refs", "ref_index", "block_stats")
    return {k: np.asarray(ag.array(k)[...]) for k in keys}


def _rel_diff(got: np.ndarray, want: np.ndarray, scale: float | None = None) -> float:
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.array_equal(np.isnan(g), np.isnan(w)):
        return float("inf")
    ok = np.isfinite(w) & np.isfinite(g)
    if not ok.any():
        return 0.0
    d = float(np.max(np.abs(g[ok] - w[ok])))
    s = float(np.max(np.abs(w[ok]))) if scale is None else scale
    return d / s if s > 0 else d


def agreement(gpu: dict[str, np.ndarray], cpu: dict[str, np.ndarray]) -> dict[str, Any]:
    """How far the GPU study is from the CPU study (0 / 1.0 / True: identical)."""
    return {
        "a_max_rel_diff": _rel_diff(gpu["a"], cpu["a"]),
        "level_max_rel_diff": _rel_diff(gpu["level"], cpu["level"]),
        "corr_max_abs_diff": _rel_diff(gpu["corr"], cpu["corr"], 1.0),
        "residual_max_rel_diff": _rel_diff(gpu["residual"], cpu["residual"]),
        "block_stats_max_rel_diff": _rel_diff(gpu["block_stats"], cpu["block_stats"]),
        "mode_agreement": float(np.mean(gpu["mode"] == cpu["mode"])),
        "flags_equal": bool(np.array_equal(gpu["flags"], cpu["flags"])),
        "refs_equal": bool(np.array_equal(gpu["refs"], cpu["refs"]) and np.array_equal(gpu["ref_index"], cpu["ref_index"])),
        # per-row results and references; block_stats (per-epoch sums) may differ by rounding:
        # the CuPy kernel sums a block in one pass, numpy in sub-blocks of rows
        "rows_bit_identical": all(
            np.array_equal(gpu[k], cpu[k], equal_nan=True) for k in cpu if k != "block_stats"
        ),
    }


def transfer_probe(url: str, name: str, probes: int) -> dict[str, Any]:
    """Time the fit's GPU task body on the study's first block, in this process."""
    from pipeline.graph.fit import _fit_on_gpu

    st = TrajectoryStore.open(url)
    grid = st.chunk_grid()
    study = AnalysisGroup(url, name)
    a_arr = study.array("a")
    rows = min(int(a_arr.chunks[0]), int(a_arr.shape[0]))
    refs_raw = np.asarray(study.array("refs")[...], dtype=np.float64)
    ref_index = np.asarray(study.array("ref_index")[...], dtype=np.int64)
    meta = st.require_meta()
    cols = np.asarray([meta.column_of(int(e)) for e in np.asarray(study.array("epochs")[...])])
    x = np.empty((len(cols), rows), dtype=np.float32)
    grid.read_rows(0, rows, cols, x)
    refs = References.from_profiles(refs_raw)
    inside = ref_index < rows
    ref_rows = (ref_index[inside], np.flatnonzero(inside).astype(np.int64))
    want = fit_block(x.T, refs, ref_rows)
    runs = []
    for i in range(probes + 1):
        t: dict[str, float] = {}
        got = _fit_on_gpu(x, refs, ref_rows, timings=t)
        if i:
            runs.append(t)
    same = all(
        np.allclose(getattr(got, k), getattr(want, k), rtol=1e-10, atol=1e-12, equal_nan=True)
        for k in ("a", "b", "level", "corr", "residual", "energy", "spread")
    ) and np.array_equal(got.mode, want.mode) and np.array_equal(got.flags, want.flags)

    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if key in r]
        return statistics.median(vals) if vals else None

    out: dict[str, Any] = {"block_rows": rows, "block_MB": x.nbytes / 1e6, "probes": probes,
                           "matches_numpy_kernel": bool(same)}
    for key in ("stage_ms", "h2d_ms", "kernel_ms", "d2h_ms", "call_ms"):
        out[key] = med(key)
    if out["h2d_ms"] is not None and out["call_ms"]:
        out["h2d_share"] = out["h2d_ms"] / out["call_ms"]
        out["h2d_GBps"] = x.nbytes / 1e6 / out["h2d_ms"] if out["h2d_ms"] > 0 else None
        device = out["h2d_ms"] + out["kernel_ms"] + out["d2h_ms"]
        out["h2d_share_of_device_time"] = out["h2d_ms"] / device if device > 0 else None
    return out


def device_name(stand_in: bool) -> str:
    if stand_in:
        return STAND_IN_LABEL
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def markdown(r: dict[str, Any]) -> str:
    label = "stand-in" if r["stand_in"] else "GPU"
    gb = r["GB"]
    lines = [
        f"# GPU fit benchmark ({label})",
        "",
        f"Device: {r['device']}. Command: `{r['command']}`",
        "",
        f"N={r['N']:.3g}, T={r['T']}, M={r['modes']}, K={r['samples']}, {gb:.2f} GB float32; "
        f"CPU kernel {r['cpu_kernel']}, CPU runtime {r['cpu_runtime']}, GPU runtime {r['gpu_runtime']}.",
        "",
        "| run | time s | GB/s | time / read |",
        "|---|---|---|---|",
    ]
    rd = r["read"]["seconds"]
    for k in ("read", "fit-cpu", "fit-gpu"):
        s = r[k]["seconds"]
        lines.append(f"| {k}{' (stand-in)' if r['stand_in'] and k == 'fit-gpu' else ''} | {s:.2f} | {gb / s:.2f} | {s / rd:.2f} |")
    lines += ["", f"fit-gpu / fit-cpu speed: {r['gpu_speedup']:.2f}x" + (" (stand-in: numpy on the CPU)" if r["stand_in"] else ""), ""]
    ag = r["agreement"]
    lines += [
        "| agreement GPU vs CPU study | value |",
        "|---|---|",
        *(f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in ag.items()),
        "",
    ]
    tp = r["transfer"]

    def ms(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines += [
        f"Transfer probe: one block of {tp['block_rows']} rows ({tp['block_MB']:.1f} MB), median of {tp['probes']}:",
        "",
        "| staging ms | H2D ms | kernel ms | D2H ms | call ms | H2D share of call | H2D share of device time | H2D GB/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {ms(tp['stage_ms'])} | {ms(tp['h2d_ms'])} | {ms(tp['kernel_ms'])} | {ms(tp['d2h_ms'])} | {ms(tp['call_ms'])} "
        f"| {ms(tp.get('h2d_share'))} | {ms(tp.get('h2d_share_of_device_time'))} | {ms(tp.get('h2d_GBps'))} |",
        "",
        f"Agreement {'OK' if r['ok'] else 'FAILED'} (tolerance {r['tol']:g}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=2e7)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=None, help="CPU LocalCluster workers (default: one per core)")
    ap.add_argument("--cpu-kernel", default="auto", choices=("auto", "numba", "numpy"))
    ap.add_argument("--probe", type=int, default=5, help="timed calls of the transfer probe")
    ap.add_argument("--tol", type=float, default=1e-6, help="largest accepted relative difference")
    ap.add_argument("--store", default="bench-output/gpu-store.zarr")
    ap.add_argument("--out", default="bench-output/gpu", help="folder for bench_gpu.json and bench_gpu.md")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic store")
    ap.add_argument("--stand-in", action="store_true", help="no GPU: a numpy stand-in for cupy (not GPU figures)")
    a = ap.parse_args(argv)
    if a.stand_in:
        sys.modules["cupy"] = stand_in_cupy()
    os.environ[FIT_KERNEL_ENV] = a.cpu_kernel  # the workers of the CPU cluster inherit it
    n = int(a.n)
    gb = n * a.epochs * 4 / 1e9
    url = os.path.abspath(a.store)
    shutil.rmtree(url, ignore_errors=True)
    # the stand-in lives in this process only: both fits then run on threads here
    cpu_rt = RuntimeOptions(mode="threads" if a.stand_in else "local", workers=a.workers, progress=False)
    gpu_rt = RuntimeOptions(mode="threads" if a.stand_in else "local", gpu=True, progress=False)
    result: dict[str, Any] = {
        "command": " ".join(["python3", "benchmarks/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "stand_in": a.stand_in, "device": device_name(a.stand_in), "N": n, "T": a.epochs, "GB": gb,
        "modes": a.modes, "samples": a.samples, "cpu_kernel": a.cpu_kernel,
        "cpu_runtime": cpu_rt.mode, "gpu_runtime": "threads (stand-in)" if a.stand_in else "LocalCUDACluster",
        "tol": a.tol,
    }
    print(f"device: {result['device']}", flush=True)
    try:
        t = time.perf_counter()
        print(f"writing a synthetic store N={n:.3g} x T={a.epochs} ({gb:.2f} GB) ...", flush=True)
        synthetic_store(url, n, a.epochs, a.modes)
        print(f"  {time.perf_counter() - t:.1f} s", flush=True)
        grid = TrajectoryStore.open(url).chunk_grid()
        cols = np.arange(a.epochs)
        with runner(cpu_rt) as run:
            if run.client is not None:
                run.client.run(os.environ.__setitem__, FIT_KERNEL_ENV, a.cpu_kernel)
            from pipeline.kernels import cmd_numba

            if cmd_numba.use_fused():  # compile once; workers load numba's disk cache
                cmd_numba.warm_up(("float32",))
                if run.client is not None:
                    run.client.run(cmd_numba.warm_up, ("float32",))
            rows = grid.chunk_rows
            tasks = [delayed(_read_task, pure=False)(grid, r0, r1, cols) for r0, r1 in blocks(n, rows)]
            t = time.perf_counter()
            nbytes = sum(run.compute(tasks, "read"))
            result["read"] = {"seconds": time.perf_counter() - t, "bytes": nbytes}
            print(f"  read: {result['read']['seconds']:.2f} s", flush=True)
            t = time.perf_counter()
            res = pipeline.fit(
                url, "bench-cpu", modes=a.modes, samples=a.samples, diagnostics=True, run=run
            )
            result["fit-cpu"] = {"seconds": time.perf_counter() - t, "modes_found": res.n_modes,
                                 "dynamics_error": res.summary["dynamics_error"],
                                 "relative_error": res.summary["relative_error"]}
            print(f"  fit cpu ({a.cpu_kernel}): {result['fit-cpu']['seconds']:.2f} s", flush=True)
        result["transfer"] = transfer_probe(url, "bench-cpu", a.probe)
        print(f"  transfer probe: {result['transfer']}", flush=True)
        t = time.perf_counter()
        with runner(gpu_rt) as grun:  # started before the clock, as the CPU cluster was
            result["gpu_runtime_start_seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            res = pipeline.fit(
                url, "bench-gpu", modes=a.modes, samples=a.samples, diagnostics=True, run=grun
            )
            result["fit-gpu"] = {"seconds": time.perf_counter() - t, "modes_found": res.n_modes,
                                 "dynamics_error": res.summary["dynamics_error"],
                                 "relative_error": res.summary["relative_error"]}
        print(f"  fit gpu{' (stand-in)' if a.stand_in else ''}: {result['fit-gpu']['seconds']:.2f} s", flush=True)
        cpu, gpu = _study(url, "bench-cpu"), _study(url, "bench-gpu")
        result["agreement"] = agreement(gpu, cpu)
    finally:
        if not a.keep:
            shutil.rmtree(url, ignore_errors=True)
    for k in ("read", "fit-cpu", "fit-gpu"):
        result[k]["GBps"] = gb / result[k]["seconds"]
    result["gpu_speedup"] = result["fit-cpu"]["seconds"] / result["fit-gpu"]["seconds"]
    ag = result["agreement"]
    exact = a.stand_in and a.cpu_kernel == "numpy"
    ok = (ag["rows_bit_identical"] and ag["block_stats_max_rel_diff"] <= 1e-12 if exact else (
        max(ag["a_max_rel_diff"], ag["level_max_rel_diff"], ag["corr_max_abs_diff"]) <= a.tol
        and ag["mode_agreement"] >= 1 - 1e-4 and ag["flags_equal"] and ag["refs_equal"]))
    result["ok"] = bool(ok and result["transfer"]["matches_numpy_kernel"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (out / "bench_gpu.md").write_text(md)
    print(md)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-block CMD kernel benchmark: numpy ``fit_block`` against numba ``fit_block_fused``.

On one time-major float32 block (Tw, S) of planted modes plus noise, single-threaded
(``threadpoolctl.threadpool_limits(1)``), warm (compiled, buffers touched), median of
``--repeat`` runs each, interleaved so that both see the same machine load:

- ``read``: ``xt.sum()`` of the block (a plain read: the memory baseline);
- ``numpy``: :func:`pipeline.kernels.cmd.fit_block` of ``xt.T``;
- ``fused``: :func:`pipeline.kernels.cmd_numba.fit_block_fused` of ``xt``;
- ``stored``: :func:`pipeline.kernels.cmd_numba.stored_coefficients_fused` of its result (the
  float32 ``a`` and level a study stores, searched per row whose line crosses zero);
- with ``--old CHECKOUT`` (a ``git worktree`` of an earlier commit), ``old-fused`` and
  ``old-stored``: the same two functions of that checkout's ``cmd_numba.py``, loaded beside
  this one, in the same rounds.

Throughput is float32 input bytes (Tw x S x 4) per second, from the median wall time and from
the median CPU time of the calling thread (``time.thread_time``: what a loaded machine, where
other jobs share the cores, does not inflate). Usage::

    .venv/bin/python benchmarks/bench_kernel.py                 # T = 100 and 50, M = 10
    .venv/bin/python benchmarks/bench_kernel.py --epochs 100 --modes 10 --rows 65536 --repeat 5
    .venv/bin/python benchmarks/bench_kernel.py --epochs 100 --rows 131072 --repeat 15 --old /tmp/old
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.kernels.cmd import References, fit_block
from pipeline.kernels.cmd_numba import fit_block_fused, stored_coefficients_fused, warm_up


def _old_kernels(checkout: str) -> ModuleType:
    """``cmd_numba.py`` of another checkout, as a module of its own (it imports the rest of
    ``pipeline`` from this one: the kernel module is self-contained apart from ``cmd``),
    compiled afresh (numba's disk cache cannot reload a module loaded this way)."""
    path = Path(checkout, "pipeline", "kernels", "cmd_numba.py")
    if not path.is_file():
        raise SystemExit(f"--old: no {path}")
    mod = ModuleType("old_cmd_numba")
    mod.__file__ = str(path)
    sys.modules[mod.__name__] = mod
    source = path.read_text().replace("cache=True", "cache=False")
    exec(compile(source, str(path), "exec"), mod.__dict__)
    return mod


def _block(n_t: int, n_s: int, n_m: int, seed: int = 0) -> tuple[np.ndarray, References]:
    rng = np.random.default_rng(seed)
    refs = np.cumsum(rng.standard_normal((n_m, n_t)), axis=1) * 1e-2 + 1.0
    m = rng.integers(0, n_m, n_s)
    a = rng.standard_normal(n_s)
    b = rng.standard_normal(n_s)
    x = a[None, :] * refs[m].T + b[None, :] + 1e-3 * rng.standard_normal((n_t, n_s))
    return np.ascontiguousarray(x, dtype=np.float32), References.from_profiles(refs)


def _heap_only() -> bool:
    """Serve every allocation from the heap (glibc ``mallopt(M_MMAP_THRESHOLD, 1 GiB)``;
    Linux only): otherwise whether a kernel's 1 MB result arrays come from fresh ``mmap``
    pages, faulted in on every call, depends on what ran before (glibc's threshold moves with
    the sizes freed), and two copies of the same kernel measured 29 and 35 ms in one run."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _time(fn) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w0, time.thread_time() - c0


def run(
    n_t: int, n_s: int, n_m: int, repeat: int, old: ModuleType | None = None
) -> dict[str, float]:
    xt, refs = _block(n_t, n_s, n_m)
    gb = xt.nbytes / 1e9
    fit = fit_block_fused(xt, refs)
    line = (fit.mode, fit.a, fit.level, fit.anchor, refs)
    fns: dict[str, Any] = {
        "read": lambda: xt.sum(),
        "numpy": lambda: fit_block(xt.T, refs),
        "fused": lambda: fit_block_fused(xt, refs),
        "stored": lambda: stored_coefficients_fused(*line),
    }
    if old is not None:
        fns["old-fused"] = lambda: old.fit_block_fused(xt, refs)
        fns["old-stored"] = lambda: old.stored_coefficients_fused(*line)
    for fn in fns.values():  # warm: compiled, scratch buffers allocated and touched
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(repeat):  # interleaved: each round sees the same load on every kernel
        # and rotated: each runs after every other one as often (a kernel that runs right
        # after the numpy one gets its output pages fresh from the OS, page faults included)
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            w, c = _time(fns[k])
            wall[k].append(w)
            cpu[k].append(c)
    res: dict[str, float] = {"epochs": n_t, "rows": n_s, "modes": n_m, "gb": gb}
    for k in fns:
        res[f"{k}_s"] = statistics.median(wall[k])
        res[f"{k}_cpu_s"] = statistics.median(cpu[k])
        res[f"{k}_gbps"] = gb / res[f"{k}_s"]
        res[f"{k}_cpu_gbps"] = gb / res[f"{k}_cpu_s"]
    res["fused_over_numpy"] = res["numpy_s"] / res["fused_s"]
    res["fused_over_numpy_cpu"] = res["numpy_cpu_s"] / res["fused_cpu_s"]
    if old is not None:
        res["old_over_new"] = res["old-fused_s"] / res["fused_s"]
        res["old_over_new_cpu"] = res["old-fused_cpu_s"] / res["fused_cpu_s"]
        res["rows_crossing_zero"] = float(_crossing(fit, refs))
    return res


def _crossing(fit: Any, refs: References) -> float:
    """The share of rows whose stored line crosses zero (the rows ``stored`` searches)."""
    r0 = refs.raw[fit.mode, fit.anchor]
    lo = fit.level + fit.a * (refs.sorted[fit.mode, 0] - r0)
    hi = fit.level + fit.a * (refs.sorted[fit.mode, -1] - r0)
    return float(np.mean(((lo < 0) & (hi > 0)) | ((lo > 0) & (hi < 0))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=int, nargs="+", default=[100, 50])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON line per case")
    ap.add_argument("--old", metavar="CHECKOUT", help="also time an earlier checkout's kernel")
    a = ap.parse_args(argv)
    old = _old_kernels(a.old) if a.old else None
    if not _heap_only():
        print("(could not set malloc's mmap threshold: results may depend on allocation state)")
    with threadpool_limits(1):
        warm_up()
        if old is not None:
            old.warm_up()
        for n_t in a.epochs:
            r = run(n_t, a.rows, a.modes, a.repeat, old)
            if a.json:
                print(json.dumps(r))
                continue
            print(
                f"T={n_t} M={a.modes} S={a.rows} ({r['gb'] * 1e3:.1f} MB float32), 1 thread, "
                f"median of {a.repeat}:        wall               thread CPU"
            )
            labels = [
                ("read", "read  (xt.sum)       "),
                ("numpy", "numpy fit_block      "),
                ("fused", "numba fit_block_fused"),
                ("stored", "stored coefficients  "),
            ]
            if old is not None:
                labels += [("old-fused", "old fit_block_fused  "), ("old-stored", "old stored coeffs    ")]
            for k, label in labels:
                print(
                    f"  {label} {r[f'{k}_s'] * 1e3:8.2f} ms {r[f'{k}_gbps']:6.2f} GB/s"
                    f"   {r[f'{k}_cpu_s'] * 1e3:8.2f} ms {r[f'{k}_cpu_gbps']:6.2f} GB/s"
                )
            print(
                f"  fused / numpy speed-up: {r['fused_over_numpy']:.2f}x wall, "
                f"{r['fused_over_numpy_cpu']:.2f}x CPU"
            )
            if old is not None:
                print(
                    f"  old / new fused kernel: {r['old_over_new']:.2f}x wall, "
                    f"{r['old_over_new_cpu']:.2f}x CPU; rows whose line crosses zero: "
                    f"{r['rows_crossing_zero']:.1%}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

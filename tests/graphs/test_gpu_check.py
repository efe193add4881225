"""The GPU check without a GPU: the fit's GPU task body with a stand-in ``cupy`` (pinned
buffers, streams and events included) gives bit-identical results with one copy each way;
``benchmarks/bench_gpu.py --stand-in`` and ``benchmarks/gpu_check.sh`` (``make gpu-check``)
with ``STAND_IN=1`` run and write their files. (On a GPU, ``make gpu-check`` runs the same
script on the device.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script

from pipeline.compat import to_numpy
from pipeline.graph import fit as graph_fit
from pipeline.kernels.cmd import BlockFit, References, fit_block

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--n", "3e4", "--epochs", "12", "--modes", "3", "--samples", "60", "--probe", "2"]


def _bench() -> types.ModuleType:
    return load_script(ROOT / "benchmarks" / "bench_gpu.py")


def _block(rows: int, t: int = 13, m: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    prof = rng.standard_normal((m, t)).cumsum(axis=1)
    mode = rng.integers(m, size=rows)
    x = rng.uniform(-2, 2, rows)[:, None] * prof[mode] + 0.1 * rng.standard_normal((rows, t))
    x = x.astype(np.float32)
    x[5:9] = x[5:9, :1]  # constant rows
    x[11, 3] = np.nan
    pos = np.array([2, rows // 2, rows - 1])
    ids = np.array([0, 1, 3])
    prof[ids] = x[pos]
    xt = np.ascontiguousarray(x.T)  # time-major, as the fit task reads it
    return xt, References.from_profiles(prof), (pos, ids)


def _equal(got: BlockFit, want: BlockFit) -> None:
    for f in fields(BlockFit):
        g, w = getattr(got, f.name), getattr(want, f.name)
        assert type(g) is np.ndarray, f.name  # back on the host
        assert g.dtype == w.dtype and g.shape == w.shape, f.name
        assert np.array_equal(g, w, equal_nan=True), f.name


def _per_array_transfer(cupy, x, refs, ref_rows) -> BlockFit:
    """The GPU task body before pinned buffers: one copy per array each way."""
    got = fit_block(cupy.asarray(x).T, refs.to(cupy), (cupy.asarray(ref_rows[0]), cupy.asarray(ref_rows[1])))
    return BlockFit(**{f.name: to_numpy(getattr(got, f.name)) for f in fields(BlockFit)})


def test_fit_on_gpu_pinned_path_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    cupy = _bench().stand_in_cupy(calls)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    # a block under the numpy kernel's sub-block size: bit-identical to the numpy kernel
    x, refs, ref_rows = _block(3000)
    _equal(graph_fit._fit_on_gpu(x, refs, ref_rows), fit_block(x.T, refs, ref_rows))
    assert calls.count("set") == 1 and calls.count("get") == 1 and "asnumpy" not in calls
    # a larger block (the CuPy kernel sums it in one pass): identical to per-array copies
    x, refs, ref_rows = _block(40_000, seed=1)
    calls.clear()
    timings: dict[str, float] = {}
    got = graph_fit._fit_on_gpu(x, refs, ref_rows, timings=timings)
    assert calls.count("set") == 1 and calls.count("get") == 1
    assert calls.count("alloc_pinned_memory") == 2  # grown once each way
    _equal(got, _per_array_transfer(cupy, x, refs, ref_rows))
    assert {"stage_ms", "h2d_ms", "kernel_ms", "d2h_ms", "call_ms"} <= set(timings)
    # buffers, stream and device references are reused by the thread's next task
    calls.clear()
    again = graph_fit._fit_on_gpu(x, refs, ref_rows)
    # no new pinned memory, no copy of the references (6 arrays): ref_rows only (2 copies, and
    # the kernel's own asarray of them, a no-op on device arrays)
    assert "alloc_pinned_memory" not in calls and calls.count("asarray") <= 4
    _equal(again, got)
    got.flags[:] = 255  # results own their memory: the next task does not overwrite them
    graph_fit._fit_on_gpu(*_block(40_000, seed=2))
    _equal(again, _per_array_transfer(cupy, x, refs, ref_rows))


def test_fit_on_gpu_without_pinned_memory_or_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    cupy = _bench().stand_in_cupy(calls)
    del cupy.cuda  # a cupy-like module with arrays only: plain copies, still one back
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    x, refs, ref_rows = _block(3000, seed=3)
    _equal(graph_fit._fit_on_gpu(x, refs, ref_rows), fit_block(x.T, refs, ref_rows))
    assert calls.count("asnumpy") == 1 and "set" not in calls and "get" not in calls


def _check_bench(out: Path, *, stand_in: bool) -> dict:
    r = json.loads((out / "bench_gpu.json").read_text())
    md = (out / "bench_gpu.md").read_text()
    assert r["stand_in"] is stand_in and r["ok"] is True
    assert "stand-in" in r["device"] and "not GPU figures" in md
    for k in ("read", "fit-cpu", "fit-gpu"):
        assert r[k]["seconds"] > 0 and r[k]["GBps"] > 0
    assert r["gpu_speedup"] > 0
    ag = r["agreement"]
    assert ag["rows_bit_identical"] and ag["flags_equal"] and ag["refs_equal"]
    assert ag["a_max_rel_diff"] == ag["level_max_rel_diff"] == ag["corr_max_abs_diff"] == 0.0
    assert ag["mode_agreement"] == 1.0 and ag["block_stats_max_rel_diff"] <= 1e-12
    tp = r["transfer"]
    assert tp["matches_numpy_kernel"] and 0 < tp["h2d_share"] < 1 and tp["h2d_ms"] > 0
    assert r["fit-cpu"]["modes_found"] == r["fit-gpu"]["modes_found"]
    assert "| fit-gpu (stand-in) |" in md and "H2D share" in md
    return r


def test_bench_gpu_stand_in(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--stand-in", "--cpu-kernel", "numpy",
           *TINY, "--store", str(tmp_path / "s.zarr"), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    _check_bench(out, stand_in=True)
    assert not (tmp_path / "s.zarr").exists()  # the store is removed


def test_gpu_check_script_stand_in(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    env = {**os.environ, "STAND_IN": "1", "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out),
           "BENCH_N": "3e4", "BENCH_EPOCHS": "12", "BENCH_MODES": "3", "BENCH_SAMPLES": "60",
           "TMPDIR": str(tmp_path)}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    log = (out / "gpu-check.log").read_text()
    assert "STAND_IN=1" in log and "pytest -m gpu" in log and "GPU CHECK PASSED (STAND-IN" in log
    assert (out / "pytest.xml").exists()
    _check_bench(out, stand_in=True)
    assert not list(tmp_path.glob("cmd-gpu-check-*.zarr"))


def test_gpu_check_script_fails_when_the_benchmark_fails(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    env = {**os.environ, "STAND_IN": "1", "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out),
           "BENCH_N": "not-a-number", "TMPDIR": str(tmp_path), "GPU_CHECK_TESTS": "0"}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    log = (out / "gpu-check.log").read_text()
    assert "GPU CHECK FAILED: bench_gpu.py exited" in log and "pytest -m gpu" not in log

"""The ``--gpu`` path without a GPU: a stand-in ``cupy`` module (numpy arrays of a subclass)
proves that fit moves each block to the "device", runs the kernel there and brings every
result back, bit-identical to the CPU path. Without CuPy, ``--gpu`` fails with a clear error.
(On a real GPU, tests/unit/test_cmd_gpu.py compares the CuPy kernels with numpy.)"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import SYNC, read_analysis

import pipeline
from pipeline.cli import main


class _DeviceArray(np.ndarray):
    """Marks arrays that live on the stand-in device."""


def _fake_cupy(calls: list[str]) -> types.ModuleType:
    mod = types.ModuleType("cupy")
    mod.ndarray = _DeviceArray  # type: ignore[attr-defined]

    def asarray(x, dtype=None):
        calls.append("asarray")
        return np.asarray(x, dtype=dtype).view(_DeviceArray)

    def asnumpy(x):
        calls.append("asnumpy")
        return np.asarray(x).view(np.ndarray).copy()

    mod.asarray = asarray  # type: ignore[attr-defined]
    mod.asnumpy = asnumpy  # type: ignore[attr-defined]
    def on_device(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            return out.view(_DeviceArray) if isinstance(out, np.ndarray) else out

        return call

    def attr(name: str):
        # functions allocate "device" arrays; types (float64, ...) and constants stay numpy's
        v = getattr(np, name)
        return v if isinstance(v, type) or not callable(v) else on_device(v)

    mod.__getattr__ = attr  # type: ignore[method-assign]
    return mod


def _store(tmp_path: Path, run5) -> Path:
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(run5.root)], str(store), runtime=SYNC)
    return store


def test_gpu_fit_equals_cpu_fit(tmp_path: Path, run5, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import FIT_KERNEL_ENV

    store = _store(tmp_path, run5)
    # the GPU path runs the array kernel (numpy's code on CuPy): compare it with that kernel
    # on the CPU, bit for bit (the fused numba kernel agrees to rounding, tested elsewhere)
    monkeypatch.setenv(FIT_KERNEL_ENV, "numpy")
    pipeline.fit(str(store), "cpu", modes=3, samples=50, runtime=SYNC, diagnostics=True)
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(calls))
    gpu = pipeline.RuntimeOptions(mode="sync", progress=False, gpu=True)
    pipeline.fit(str(store), "gpu", modes=3, samples=50, runtime=gpu, diagnostics=True)
    pipeline.fit(str(store), "gpu-default", modes=3, samples=50, runtime=gpu)
    assert calls.count("asarray") >= 3 and "asnumpy" in calls  # block and references moved
    a, b = read_analysis(store, "cpu"), read_analysis(store, "gpu")
    keys = ("mode", "a", "level", "anchor", "corr", "residual", "flags", "refs", "block_stats")
    for key in keys:
        assert a[key].dtype == b[key].dtype, key
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    # the GPU path writes the study's dtypes: float32 a and level, no diagnostics by default
    c = read_analysis(store, "gpu-default")
    assert c["a"].dtype == c["level"].dtype == np.float32 and "corr" not in c
    for key in ("mode", "a", "level", "anchor", "flags"):
        assert np.array_equal(a[key], c[key], equal_nan=True), key


def test_gpu_without_cupy_is_a_clear_error(tmp_path: Path, run5, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path, run5)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    r = CliRunner().invoke(main, ["fit", "-s", str(store), "-n", "g", "-m", "2", "--gpu", "--sync"])
    assert r.exit_code != 0
    assert "--gpu needs CuPy" in r.output and "cmd-pipeline[gpu]" in r.output
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    r = CliRunner().invoke(main, ["fit", "-s", str(store), "-n", "g", "-m", "2", "--gpu"])
    assert r.exit_code != 0 and "dask-cuda" in r.output

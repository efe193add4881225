"""One executor x chunking matrix of ``fit`` against the dense float64 reference
(tests/helpers.py: :func:`dense_cmd`).

Executors: the synchronous scheduler, the threaded one, an embedded LocalCluster of 2 worker
processes and a real scheduler (``dask scheduler`` + 2 ``dask worker`` processes on loopback);
the two clusters are started once per module and passed to every fit as an open runner
(``run=``). Chunkings: three store layouts (chunk rows dividing N, not dividing N, one chunk
holding every row; time chunks 1, 5 and 3; raw and lz4) times two fit block sizes (the default
and a divisor of the chunk rows). Every cell matches the dense reference, and every executor
writes the same results as the synchronous one, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import torch
from dask_cluster_helpers import dask_cli, start_cluster
from helpers import (
    F_CONSTANT,
    F_REFERENCE,
    PER_ROW_ARRAYS,
    SYNC,
    THREADS,
    DenseCMD,
    assert_matches_dense,
    dense_cmd,
    mode_profiles,
    planted_rows,
    read_analysis,
    rows_to_state_dicts,
    stored_model,
    window_of,
    write_safetensors_run,
)

import pipeline
from pipeline.runtime import Runner, RuntimeOptions, runner

T = 12
N_MODES = 4
SAMPLES = 100
#: tensor -> shape; 600 + 36 + 80 + 4 = 720 rows
SHAPES = {"w1": (24, 25), "b1": (36,), "w2": (8, 10), "frozen": (2, 2)}
N = 720

#: store layouts: name -> ingest settings, and the fit block rows tried on each (None: default)
LAYOUTS: dict[str, tuple[dict[str, Any], int]] = {
    "div120-t1-raw": ({"chunk_rows": 120, "time_chunk": 1, "codec": "none"}, 40),
    "ragged100-t5-lz4": ({"chunk_rows": 100, "time_chunk": 5, "codec": "lz4"}, 25),
    # more chunk rows than rows: the store keeps one chunk of N rows
    "one-chunk-t3-raw": ({"chunk_rows": 1000, "time_chunk": 3, "codec": "none"}, 180),
}
CHUNKINGS = [
    pytest.param(layout, block, id=f"{layout}-block{block or 'default'}")
    for layout, (_kw, divisor) in LAYOUTS.items()
    for block in (None, divisor)
]
EXECUTORS = [
    pytest.param("sync", id="sync"),
    pytest.param("threads", id="threads"),
    pytest.param("local", id="local"),
    pytest.param("scheduler", id="scheduler"),
]
#: every array of a study that must be equal across executors
ALL_ARRAYS = (*PER_ROW_ARRAYS, "sample_index", "ref_index", "sample_mode", "refs", "block_stats")


# --------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """T epochs of 4 planted modes (float32 and one float64 tensor) plus a frozen tensor."""
    rng = np.random.default_rng(11)
    p = mode_profiles(T)

    def rows(shape: tuple[int, ...], b_scale: float = 1.0) -> np.ndarray:
        n = int(np.prod(shape))
        return planted_rows(n, p, rng, noise=1e-3, b_scale=b_scale).noisy

    spec = {
        "w1": (SHAPES["w1"], torch.float32, rows(SHAPES["w1"])),
        "b1": (SHAPES["b1"], torch.float64, rows(SHAPES["b1"], 0.1)),
        "w2": (SHAPES["w2"], torch.float32, rows(SHAPES["w2"])),
        "frozen": (SHAPES["frozen"], torch.float32, np.repeat(rng.standard_normal((4, 1)), T, 1)),
    }
    root = tmp_path_factory.mktemp("matrix") / "ckpts"
    write_safetensors_run(root, rows_to_state_dicts(spec))
    return root


@pytest.fixture(scope="module")
def stores(ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each layout ingested once (synchronously); the fits of every executor go side by side
    into its ``analyses/``."""
    out = {}
    for layout, (kw, _divisor) in LAYOUTS.items():
        store = tmp_path_factory.mktemp(layout) / "s.zarr"
        pipeline.ingest([str(ckpts)], str(store), runtime=SYNC, **kw)
        out[layout] = store
    return out


# --------------------------------------------------------------------------- executors
@pytest.fixture(scope="module")
def local_runner() -> Iterator[Runner]:
    """An embedded LocalCluster of 2 worker processes, started once for the module."""
    with runner(RuntimeOptions(mode="local", workers=2, progress=False)) as r:
        assert r.client is not None and len(r.client.scheduler_info()["workers"]) == 2
        yield r


@pytest.fixture(scope="module")
def scheduler_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """``dask scheduler`` + 2 ``dask worker`` processes on loopback, started once for the
    module, connected to as ``RuntimeOptions(scheduler=address)``."""
    if dask_cli() is None:
        pytest.skip("the dask CLI is missing")
    with start_cluster(tmp_path_factory.mktemp("cluster"), n_workers=2) as cluster:
        opts = RuntimeOptions(scheduler=cluster.address, progress=False)
        with runner(opts) as r:
            assert r.client is not None and r.client.scheduler.address == cluster.address
            yield r


def _where(executor: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """``fit``'s keyword for the executor: options for sync/threads, an open runner else."""
    if executor == "sync":
        return {"runtime": SYNC}
    if executor == "threads":
        return {"runtime": THREADS}
    if executor == "local":
        return {"run": request.getfixturevalue("local_runner")}
    assert executor == "scheduler", executor
    return {"run": request.getfixturevalue("scheduler_runner")}


# --------------------------------------------------------------------------- helpers
_DENSE: dict[bytes, DenseCMD] = {}


def _fit(store: Path, layout: str, name: str, block: int | None, **where: Any) -> dict[str, Any]:
    """Fit (or find fitted: a re-run changes nothing) and read the study back."""
    res = pipeline.fit(str(store), name, modes=N_MODES, samples=SAMPLES, block_rows=block, **where)
    assert res.n_modes == N_MODES, res
    got = read_analysis(store, name)
    rows = block or min(LAYOUTS[layout][0]["chunk_rows"], N)
    assert got["block_stats"].shape[0] == -(-N // rows)
    return got


def _dense_for(store: Path, name: str, got: dict[str, Any]) -> tuple[DenseCMD, np.ndarray]:
    """The dense reference on the study's window and samples (the same for every layout: the
    samples do not depend on the chunking; computed once)."""
    with dask.config.set(scheduler="sync"):  # not on a cluster client left as the default
        w = window_of(store, name)
    assert w.shape == (N, T) and w.dtype == np.float32
    key = got["sample_index"].tobytes() + w.tobytes()
    if key not in _DENSE:
        _DENSE[key] = dense_cmd(w, got["sample_index"], modes=N_MODES)
    return _DENSE[key], w


# --------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize(("layout", "block"), CHUNKINGS)
def test_fit_matrix_matches_dense_and_sync(
    stores: dict[str, Path],
    layout: str,
    block: int | None,
    executor: str,
    request: pytest.FixtureRequest,
) -> None:
    store = stores[layout]
    name = f"{executor}-b{block or 'default'}"
    got = _fit(store, layout, name, block, **_where(executor, request))
    for k in PER_ROW_ARRAYS:
        assert got[k].shape == (N,), k
    dense, w = _dense_for(store, name, got)
    assert dense.n_modes == N_MODES
    # the data are what the test means: 4 references, the frozen rows constant
    assert int(((got["flags"] & F_REFERENCE) != 0).sum()) == N_MODES
    assert int(((got["flags"] & F_CONSTANT) != 0).sum()) == 4
    assert_matches_dense(got, dense, w)
    # the same bits as the synchronous scheduler on the same chunking (idempotent if done)
    want = _fit(store, layout, f"sync-b{block or 'default'}", block, runtime=SYNC)
    for k in ALL_ARRAYS:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        if np.issubdtype(got[k].dtype, np.floating):
            # bit for bit, NaN payloads included
            same = np.array_equal(
                got[k].view(f"u{got[k].itemsize}"), want[k].view(f"u{got[k].itemsize}")
            )
        else:
            same = np.array_equal(got[k], want[k])
        assert same, (k, np.flatnonzero(np.ravel(got[k] != want[k]))[:10])
    assert got["attrs"]["summary"] == want["attrs"]["summary"]


# --------------------------------------------------------------------------- the kernels
@pytest.mark.parametrize("kernel", ["numpy", "numba"])
@pytest.mark.parametrize("layout", ["div120-t1-raw", "ragged100-t5-lz4"])
def test_both_cpu_kernels_match_dense(
    stores: dict[str, Path], layout: str, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fit's two CPU kernels (the fused numba one, the default, and numpy's) through the
    whole pass: each against the dense reference, and each other's floats to rounding."""
    from pipeline.config import FIT_KERNEL_ENV

    store = stores[layout]
    monkeypatch.setenv(FIT_KERNEL_ENV, kernel)
    got = _fit(store, layout, f"kernel-{kernel}", None, runtime=SYNC)
    dense, w = _dense_for(store, f"kernel-{kernel}", got)
    assert_matches_dense(got, dense, w)
    monkeypatch.setenv(FIT_KERNEL_ENV, "numpy" if kernel == "numba" else "numba")
    other = _fit(store, layout, f"kernel-other-{kernel}", None, runtime=SYNC)
    for k in ("flags", "sample_index", "ref_index"):
        assert np.array_equal(got[k], other[k]), k
    # a, and the stored model at every epoch (the anchors of the two kernels may differ
    # where two epochs' fitted values tie in magnitude: the lines are the same)
    pairs = {"a": (got["a"], other["a"]), "model": (stored_model(got), stored_model(other))}
    for k, (x, y) in pairs.items():
        ok = np.isfinite(x)
        assert np.array_equal(ok, np.isfinite(y)), k
        scale = float(np.abs(x[ok]).max()) or 1.0
        np.testing.assert_allclose(x[ok], y[ok], rtol=1e-6, atol=1e-9 * scale, err_msg=k)

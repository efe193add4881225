"""Task functions and graph builders of the baseline passes over row blocks: the float64 Gram
matrix ``G = W^T W`` of a window (used by ``compare``'s principal coordinates and by the POD and
DMD baselines of the benchmark suite), and the error passes of DMD and of a CMD study.

Each task reads its block's rows at the window's epochs (each trajectory byte once) into a
time-major float64 buffer, zeroes the rows holding a NaN/Inf, and hands the block to a kernel
of :mod:`pipeline.kernels.baselines`. The builders create tasks (one per row block, named
``gram-i``, ``dmd-error-i``, ``cmd-error-i``) and their progress labels; they never compute.
The ``combine_*`` functions sum the tasks' results in block order, so the sums do not depend on
the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from dask import delayed

from pipeline.buffers import scratch
from pipeline.config import BASELINE_BLOCK_BYTES
from pipeline.errors import PipelineError
from pipeline.kernels.baselines import (
    cmd_block_errors,
    dmd_block_errors,
    partial_gram,
    zero_nonfinite,
)
from pipeline.plan import blocks, fit_block_rows
from pipeline.store.analysis import StudyLayout, read_model_rows
from pipeline.store.trajectory import ChunkGrid

__all__ = [
    "build_cmd_error_tasks",
    "build_dmd_error_tasks",
    "build_gram_tasks",
    "cmd_error_task",
    "combine_errors",
    "combine_gram",
    "dmd_error_task",
    "gram_block_rows",
    "gram_task",
    "read_block64",
]

#: tasks and their progress labels, as :meth:`pipeline.runtime.Runner.compute` takes them
Tasks = tuple[list[Any], list[str]]


def _f64(key: str, n: int) -> np.ndarray:
    return scratch(key, n, np.float64)


# ---------------------------------------------------------------------------- tasks
def read_block64(
    grid: ChunkGrid, r0: int, r1: int, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows ``[r0, r1)`` at ``cols`` as a time-major float64 (T, rows) buffer (the task's
    reused scratch), rows with a NaN/Inf zeroed; which rows those are (a boolean mask), the
    bytes read."""
    rows, t = r1 - r0, len(cols)
    x, nbytes = grid.rows_block(r0, r1, cols, "baseline-block")  # mapped where it can be
    x64 = scratch("baseline-block64", t * rows, np.float64).reshape(t, rows)
    np.copyto(x64, x)  # exact from every stored dtype
    del x
    bad = zero_nonfinite(x64)
    return x64, bad, nbytes


def gram_task(grid: ChunkGrid, r0: int, r1: int, cols: np.ndarray) -> tuple[np.ndarray, int, int]:
    """One block's float64 partial Gram ``X_b^T X_b`` (T x T) over its finite rows, the number
    of rows left out, the bytes read."""
    x64, bad, nbytes = read_block64(grid, r0, r1, cols)
    return partial_gram(x64), int(np.count_nonzero(bad)), nbytes


def cmd_error_task(
    grid: ChunkGrid,
    url: str,
    study: str,
    r0: int,
    r1: int,
    cols: np.ndarray,
    refs: np.ndarray,
    layout: StudyLayout,
) -> tuple[np.ndarray, int, int]:
    """One block's squared CMD errors ``[stored float32 form, float64 fit, ||X||^2]`` over its
    finite rows (:func:`pipeline.kernels.baselines.cmd_block_errors`), the number of rows left
    out, the bytes read. ``study`` names the study in the store ``url`` (its model's arrays,
    ``layout.model``, are read for the block's rows, read-only), ``refs`` the (M, T) float64
    references."""
    x64, bad, nbytes = read_block64(grid, r0, r1, cols)
    mode, a, b, *anchor = read_model_rows(url, study, layout, r0, r1)
    out = cmd_block_errors(
        x64, bad, mode, a, b, refs, anchor=anchor[0] if anchor else None, buffers=_f64
    )
    return out, int(np.count_nonzero(bad)), nbytes


def dmd_error_task(
    grid: ChunkGrid,
    r0: int,
    r1: int,
    cols: np.ndarray,
    at: np.ndarray,
    bt: np.ndarray,
    offsets: tuple[int, ...],
) -> tuple[np.ndarray, int]:
    """Squared DMD reconstruction errors of one block for every rank
    (:func:`pipeline.kernels.baselines.dmd_block_errors`), and the bytes read."""
    x64, _bad, nbytes = read_block64(grid, r0, r1, cols)
    return dmd_block_errors(x64, at, bt, offsets, buffers=_f64), nbytes


# ---------------------------------------------------------------------------- planning
def gram_block_rows(grid: ChunkGrid, n_cols: int, block_rows: int | None) -> int:
    """Rows per task: ``block_rows``, or a divisor of the store's chunk rows whose float32
    block is at most :data:`pipeline.config.BASELINE_BLOCK_BYTES` (each task also holds its
    float64 copy)."""
    if block_rows is not None:
        if block_rows < 1:
            raise PipelineError("block_rows must be at least 1")
        return block_rows
    return fit_block_rows(
        grid.chunk_rows, n_cols, raw=grid.local_root is not None, target_bytes=BASELINE_BLOCK_BYTES
    )


# ---------------------------------------------------------------------------- builders
def build_gram_tasks(grid: ChunkGrid, n_rows: int, rows: int, cols: Sequence[int]) -> Tasks:
    """One :func:`gram_task` per block of ``rows`` rows, over the window columns ``cols``."""
    c = np.asarray(list(cols), dtype=np.int64)
    cols_d = delayed(c, traverse=False)
    spans = list(blocks(n_rows, rows))
    tasks = [
        delayed(gram_task, pure=False)(grid, r0, r1, cols_d, dask_key_name=f"gram-{i}")
        for i, (r0, r1) in enumerate(spans)
    ]
    labels = [f"gram block {i}: rows {r0}-{r1}" for i, (r0, r1) in enumerate(spans)]
    return tasks, labels


def build_cmd_error_tasks(
    grid: ChunkGrid,
    url: str,
    study: str,
    n_rows: int,
    rows: int,
    cols: np.ndarray,
    refs: np.ndarray,
    layout: StudyLayout,
) -> Tasks:
    """One :func:`cmd_error_task` per block of ``rows`` rows for the study named ``study``
    (whose arrays are laid out as ``layout``)."""
    cols_d = delayed(cols, traverse=False)
    refs_d = delayed(refs, traverse=False)
    spans = list(blocks(n_rows, rows))
    tasks = [
        delayed(cmd_error_task, pure=False)(
            grid, url, study, r0, r1, cols_d, refs_d, layout, dask_key_name=f"cmd-error-{i}"
        )
        for i, (r0, r1) in enumerate(spans)
    ]
    labels = [f"cmd error block {i}: rows {r0}-{r1}" for i, (r0, r1) in enumerate(spans)]
    return tasks, labels


def build_dmd_error_tasks(
    grid: ChunkGrid,
    n_rows: int,
    rows: int,
    cols: Sequence[int],
    at: np.ndarray,
    bt: np.ndarray,
    offsets: tuple[int, ...],
) -> Tasks:
    """One :func:`dmd_error_task` per block of ``rows`` rows, every rank's factors shared."""
    c = np.asarray(list(cols), dtype=np.int64)
    cols_d = delayed(c, traverse=False)
    at_d = delayed(at, traverse=False)
    bt_d = delayed(bt, traverse=False)
    spans = list(blocks(n_rows, rows))
    tasks = [
        delayed(dmd_error_task, pure=False)(
            grid, r0, r1, cols_d, at_d, bt_d, offsets, dask_key_name=f"dmd-error-{i}"
        )
        for i, (r0, r1) in enumerate(spans)
    ]
    labels = [f"dmd error block {i}: rows {r0}-{r1}" for i, (r0, r1) in enumerate(spans)]
    return tasks, labels


# ---------------------------------------------------------------------------- combine
def combine_gram(
    results: Sequence[tuple[np.ndarray, int, int]], t: int
) -> tuple[np.ndarray, int, int]:
    """The Gram (T x T, made exactly symmetric), the rows left out and the bytes read, summed
    over the :func:`gram_task` results in block order."""
    g = np.zeros((t, t))
    n_bad = 0
    nbytes = 0
    for part, bad, nb in results:
        g += part
        n_bad += int(bad)
        nbytes += int(nb)
    return (g + g.T) / 2, n_bad, nbytes


def combine_errors(
    results: Sequence[tuple[np.ndarray, int, int]], n: int
) -> tuple[np.ndarray, int, int]:
    """The ``n`` squared-error sums, the rows left out and the bytes read, summed over
    :func:`cmd_error_task` results in block order."""
    sums = np.zeros(n)
    n_bad = 0
    nbytes = 0
    for part, bad, nb in results:
        sums += part
        n_bad += int(bad)
        nbytes += int(nb)
    return sums, n_bad, nbytes

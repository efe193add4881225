"""Task functions and graph builders of store-backed Online CMD (one task per row block).

:func:`build_init_tasks`: after the warm-up's post-hoc fit, each task reads its rows of the
warm-up trajectory and of the study's ``mode``/``flags``, and writes the rows' initial running
sums into ``online/`` (:func:`init_task`). :func:`build_update_tasks`: each epoch, each task
reads ``current`` and the previous parity's sums of its rows and writes the new parity's
(:func:`update_task`). The builders only create tasks; the caller computes them. I/O goes
through :mod:`pipeline.store` (no Zarr here), the math through :mod:`pipeline.kernels.online`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dask import delayed

from pipeline.kernels.cmd import FLAG_NONFINITE
from pipeline.kernels.online import init_rows, nonfinite_rows, update_rows
from pipeline.plan import blocks
from pipeline.store.online import OnlineGroup
from pipeline.store.trajectory import TrajectoryStore

__all__ = ["build_init_tasks", "build_update_tasks", "init_task", "update_task"]


def init_task(
    url: str, study: str, r0: int, r1: int, rc: np.ndarray, t: int
) -> tuple[np.ndarray, np.ndarray]:
    """Write the warm-up's sums of rows ``[r0, r1)`` (window of ``t`` epochs, slot ``t % 2``).

    Parameters
    ----------
    url
        The store.
    study
        The post-hoc study of the warm-up (its ``mode`` and ``flags``).
    r0, r1
        The row block.
    rc
        (M, t) float64: the references over the warm-up, centred.
    t
        The warm-up's epochs (the trajectory's first ``t`` columns).

    Returns
    -------
    rows, last
        The rows with NaN/Inf in the warm-up (global indices, int64) and each one's last finite
        value: they get zero sums, never updated, and are flagged ``FLAG_NONFINITE``.
    """
    st = TrajectoryStore.open(url)
    grid = st.chunk_grid()
    x = np.empty((t, r1 - r0), dtype=np.float32)
    grid.read_rows(r0, r1, np.arange(t, dtype=np.int64), x)
    online = OnlineGroup(url)
    mode, flags = online.read_study_rows(study, r0, r1)
    bad, last = nonfinite_rows(x.T)
    if bad.size:  # no fit over the warm-up: zero sums, never updated (the client holds them)
        x[:, bad] = 0.0
        flags[bad] |= FLAG_NONFINITE
    mean_w, c_rw = init_rows(x.T, rc, mode.astype(np.int64))
    # the sums of a window of t epochs live in slot t % 2, the slot the readers and the next
    # update pick by the parity of the epoch count
    online.write_rows(r0, r1, mode=mode, flags=flags)
    online.write_sums(t, r0, r1, mean_w, c_rw)
    return r0 + bad, last


def update_task(url: str, r0: int, r1: int, dr: np.ndarray, n1: int) -> None:
    """Add ``current`` to the sums of rows ``[r0, r1)``: read slot ``(n1 - 1) % 2``, write slot
    ``n1 % 2``. Rows that are NaN/Inf now are flagged ``FLAG_NONFINITE`` for good; flagged rows'
    sums are copied unchanged.

    Parameters
    ----------
    url
        The store.
    r0, r1
        The row block.
    dr
        Per mode, the references' step (:func:`pipeline.kernels.online.step_references`).
    n1
        The window's epoch count after this update.
    """
    online = OnlineGroup(url)
    mean_w, c_rw = online.read_sums(n1 - 1, r0, r1)
    mode = online.read_mode(r0, r1)
    w = online.read_current(r0, r1)
    flags = online.read_flags(r0, r1)
    held = (flags & FLAG_NONFINITE) != 0
    bad = ~np.isfinite(w)
    if (bad & ~held).any():  # newly non-finite rows: flagged for good
        flags[bad] |= FLAG_NONFINITE
        online.write_rows(r0, r1, flags=flags)
        held |= bad
    update_rows(mean_w, c_rw, mode, w, dr, n1, held if held.any() else None)
    online.write_sums(n1, r0, r1, mean_w, c_rw)


def build_init_tasks(
    url: str, study: str, n_rows: int, block_rows: int, rc: np.ndarray, t: int
) -> list[Any]:
    """One :func:`init_task` per row block (``online-init-<r0>``); each returns its
    ``(rows, last)``. Nothing is computed."""
    rc_d = delayed(rc, traverse=False)
    return [
        delayed(init_task, pure=False)(
            url, study, r0, r1, rc_d, t, dask_key_name=f"online-init-{r0}"
        )
        for r0, r1 in blocks(n_rows, block_rows)
    ]


def build_update_tasks(
    url: str, n_rows: int, block_rows: int, dr: np.ndarray, n1: int
) -> list[Any]:
    """One :func:`update_task` per row block (``online-<n1>-<r0>``). Nothing is computed."""
    dr_d = delayed(dr, traverse=False)
    return [
        delayed(update_task, pure=False)(url, r0, r1, dr_d, n1, dask_key_name=f"online-{n1}-{r0}")
        for r0, r1 in blocks(n_rows, block_rows)
    ]

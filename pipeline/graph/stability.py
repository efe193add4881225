"""Task functions and graph builder of basis stability (:mod:`pipeline.ops.stability`).

One task per (layer, epoch) reads that layer at that one epoch (``ChunkGrid.read_rows`` of
the layer's row range and one column) and returns its factors ``(U_r, s, V_r^T)``
(:func:`pipeline.kernels.svd.matrix_factors`); one task per (layer, pair of epochs ``stride``
window positions apart) compares two such factor sets
(:func:`pipeline.kernels.svd.compare_factors`). No task reads more than one layer at one
epoch, and each epoch's SVD is computed once. The builder only creates tasks; the caller
computes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask import delayed
from dask.delayed import Delayed

from pipeline.kernels.svd import Factors, Method, compare_factors, matrix_factors
from pipeline.store.trajectory import ChunkGrid

__all__ = ["N_TOP", "LayerSVD", "build_stability_tasks", "pair_task", "svd_task"]

#: top singular values reported per epoch
N_TOP = 8


@dataclass(frozen=True)
class LayerSVD:
    """One weight matrix to follow: its trajectory rows and how its SVD is taken."""

    index: int  # position among the stored tensors (task keys)
    name: str
    offset: int  # first trajectory row
    shape: tuple[int, int]  # (out, in') the SVD is taken of
    method: Method
    rank: int

    @property
    def rows(self) -> tuple[int, int]:
        return self.offset, self.offset + self.shape[0] * self.shape[1]


def svd_task(
    grid: ChunkGrid,
    r0: int,
    r1: int,
    col: int,
    shape: tuple[int, int],
    method: Method,
    rank: int,
    seed: int,
) -> Factors | None:
    """Read one layer at one epoch and return its (truncated) SVD factors, or None when the
    layer holds NaN/Inf at that epoch."""
    buf = np.empty((1, r1 - r0), dtype=np.float32)
    grid.read_rows(r0, r1, np.array([col], dtype=np.int64), buf)
    a = buf[0].astype(np.float64).reshape(shape)
    del buf
    return matrix_factors(a, method, rank, seed=seed)


def pair_task(prev: Factors | None, cur: Factors | None) -> dict[str, Any]:
    """Stability and singular-value drift between two epochs' factors, and the top
    :data:`N_TOP` singular values of each."""
    out: dict[str, Any] = {
        "stability": None,
        "sv_drift": None,
        "top_prev": None if prev is None else prev[1][:N_TOP].tolist(),
        "top": None if cur is None else cur[1][:N_TOP].tolist(),
    }
    if prev is None or cur is None:
        return out
    out["stability"], out["sv_drift"] = compare_factors(prev, cur)
    return out


def build_stability_tasks(
    grid: ChunkGrid,
    layers: Sequence[LayerSVD],
    cols: Sequence[int],
    window: Sequence[int],
    *,
    stride: int,
    seed: int,
) -> tuple[list[Delayed], list[str]]:
    """The pair tasks of every layer, layer after layer (``len(cols) - stride`` each, in
    window order), and a progress label per task; nothing is computed.

    ``cols`` are the trajectory columns of the window, ``window`` their epoch numbers.
    """
    tasks: list[Delayed] = []
    labels: list[str] = []
    for lay in layers:
        r0, r1 = lay.rows
        svds = [
            delayed(svd_task, pure=True)(
                grid,
                r0,
                r1,
                c,
                lay.shape,
                lay.method,
                lay.rank,
                seed,
                dask_key_name=f"stability-svd-{lay.index}-{c}",
            )
            for c in cols
        ]
        for j in range(stride, len(cols)):
            tasks.append(
                delayed(pair_task, pure=True)(
                    svds[j - stride],
                    svds[j],
                    dask_key_name=f"stability-pair-{lay.index}-{cols[j]}",
                )
            )
            labels.append(f"{lay.name} epochs {window[j - stride]}-{window[j]}")
    return tasks, labels

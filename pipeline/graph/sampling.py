"""Task functions and graph builder of the sampling's reads: the profiles of K rows.

The rows are grouped by chunk-row block; one task per block reads only its rows at the
window's columns (a local raw store: one ``pread`` per value; a remote raw store: ranged
reads of the rows; a compressed store: the block's chunks, decoded inside the task) and
returns their profiles. The client only places the pieces: no chunk is read on the client.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from dask import delayed

from pipeline.store.trajectory import ChunkGrid

__all__ = ["assemble_gathered", "build_gather_tasks", "gather_rows"]


def gather_rows(grid: ChunkGrid, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, int]:
    """(Task) the profiles of ``rows`` (all in one chunk-row block) at ``cols``: float32
    (len(rows), len(cols)), and the bytes read from storage."""
    return grid.read_scattered(rows, cols)


def build_gather_tasks(
    grid: ChunkGrid, rows: np.ndarray, cols: np.ndarray
) -> tuple[list[object], list[str], list[np.ndarray]]:
    """One :func:`gather_rows` task per chunk-row block holding some of ``rows``.

    Returns the tasks, a label for each, and for each the positions in ``rows`` of the rows it
    reads (for :func:`assemble_gathered`).
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    block = rows // grid.chunk_rows
    order = np.argsort(block, kind="stable")
    bounds = np.flatnonzero(np.diff(block[order])) + 1
    tasks: list[object] = []
    labels: list[str] = []
    where: list[np.ndarray] = []
    for pos in np.split(order, bounds) if rows.size else []:
        i = int(block[pos[0]])
        tasks.append(
            delayed(gather_rows, pure=False)(
                grid, rows[pos], cols, dask_key_name=f"gather-{i}-{_digest(rows[pos], cols)}"
            )
        )
        labels.append(f"sampled rows of row block {i} ({pos.size} row(s))")
        where.append(pos)
    return tasks, labels, where


def assemble_gathered(
    found: Sequence[tuple[np.ndarray, int]], where: Sequence[np.ndarray], n_rows: int, n_cols: int
) -> tuple[np.ndarray, int]:
    """The tasks' pieces in the order of the rows asked for, and the bytes read in all.

    >>> a = (np.array([[1.0], [2.0]], np.float32), 8)
    >>> b = (np.array([[3.0]], np.float32), 4)
    >>> prof, nb = assemble_gathered([a, b], [np.array([0, 2]), np.array([1])], 3, 1)
    >>> prof.ravel().tolist(), nb
    ([1.0, 3.0, 2.0], 12)
    """
    out = np.empty((n_rows, n_cols), dtype=np.float32)
    nbytes = 0
    for (profiles, nb), pos in zip(found, where, strict=True):
        out[pos] = profiles
        nbytes += int(nb)
    return out, nbytes


def _digest(rows: np.ndarray, cols: np.ndarray) -> str:
    """A short name for the rows and columns of a task (keys differ between rounds)."""
    import hashlib

    h = hashlib.sha1(rows.tobytes(), usedforsecurity=False)
    h.update(cols.tobytes())
    return h.hexdigest()[:12]

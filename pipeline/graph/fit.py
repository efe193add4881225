"""Task functions and graph builder of the CMD pass over all N parameters.

One task per row block: it reads the block's rows at the window's epochs (each trajectory
byte once), runs the fused kernel :func:`pipeline.kernels.cmd_numba.fit_block_fused` (or
:func:`pipeline.kernels.cmd.fit_block`: numpy without numba, CuPy with ``gpu``), writes its whole chunk of every
result array, and finally its row of ``block_stats``, which marks the block finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import numpy as np
from dask import delayed

from pipeline.buffers import scratch
from pipeline.compat import to_numpy
from pipeline.kernels.cmd import (
    FLAG_CONSTANT,
    FLAG_NONFINITE,
    FLAG_SAMPLED,
    BlockFit,
    References,
    fit_block,
    varying_rows,
)
from pipeline.kernels.sampling import Pool
from pipeline.plan.fit import BlockPlan, StatsLayout
from pipeline.store.analysis import mode_dtype, write_result_chunk
from pipeline.store.trajectory import ChunkGrid

__all__ = ["build_fit_tasks", "build_scan_tasks", "fit_task", "scan_task"]


def _time_major(n_cols: int, n_rows: int) -> np.ndarray:
    """The task's reused (window epochs, rows) float32 input buffer."""
    return scratch("fit-block", n_cols * n_rows).reshape(n_cols, n_rows)


def _sums(
    mask_groups: np.ndarray,
    n: int,
    valid: np.ndarray,
    abscorr: np.ndarray,
    residual: np.ndarray,
    energy: np.ndarray,
    nonfinite: np.ndarray,
    spread: np.ndarray,
) -> np.ndarray:
    """(n, PER) sums per group id in ``mask_groups`` (see :class:`StatsLayout`)."""
    out = np.zeros((n, StatsLayout.PER))
    out[:, 0] = np.bincount(mask_groups, minlength=n)
    out[:, 1] = np.bincount(mask_groups, weights=valid.astype(np.float64), minlength=n)
    out[:, 2] = np.bincount(mask_groups, weights=np.where(valid, abscorr, 0.0), minlength=n)
    out[:, 3] = np.bincount(mask_groups, weights=residual, minlength=n)
    out[:, 4] = np.bincount(mask_groups, weights=energy, minlength=n)
    out[:, 5] = np.bincount(mask_groups, weights=nonfinite.astype(np.float64), minlength=n)
    out[:, 6] = np.bincount(mask_groups, weights=spread, minlength=n)
    return out


def fit_task(
    grid: ChunkGrid,
    name: str,
    plan: BlockPlan,
    cols: np.ndarray,
    refs: References,
    layout: StatsLayout,
    gpu: bool = False,
) -> np.ndarray:
    """Fit one row block and write its results; returns its ``block_stats`` row.

    With ``gpu``, the block is copied to the device and the kernel runs on CuPy; the results
    come back to the host for the (small) sums and the writes.
    """
    rows = plan.r1 - plan.r0
    x = _time_major(len(cols), rows)
    grid.read_rows(plan.r0, plan.r1, cols, x)
    ref_rows = (np.asarray(plan.ref_pos, dtype=np.int64), np.asarray(plan.ref_ids, dtype=np.int64))
    fit = _fit_on_gpu(x, refs, ref_rows) if gpu else _fit_on_cpu(x, refs, ref_rows)
    flags = fit.flags
    if plan.sample_pos:
        flags[np.asarray(plan.sample_pos)] |= FLAG_SAMPLED
    valid = (flags & (FLAG_CONSTANT | FLAG_NONFINITE)) == 0
    nonfinite = (flags & FLAG_NONFINITE) != 0
    abscorr = np.abs(fit.corr)
    stats = np.zeros(layout.width)
    stats[layout.modes] = _sums(
        fit.mode, layout.n_modes, valid, abscorr, fit.residual, fit.energy, nonfinite, fit.spread
    ).ravel()
    stats[layout.residual_t] = fit.residual_t
    stats[layout.energy_t] = fit.energy_t
    stats[layout.spread_t] = fit.spread_t
    ids = np.full(layout.max_layers, -1.0)
    ids[: len(plan.layers)] = [lid for lid, _lo, _hi in plan.layers]
    stats[layout.layer_ids] = ids
    layer_of = np.empty(rows, dtype=np.int64)
    for k, (_lid, lo, hi) in enumerate(plan.layers):
        layer_of[lo:hi] = k
    per_layer = _sums(
        layer_of, len(plan.layers), valid, abscorr, fit.residual, fit.energy, nonfinite, fit.spread
    )
    stats[layout.layers][: per_layer.size] = per_layer.ravel()
    url = grid.url
    values = {
        "mode": fit.mode.astype(mode_dtype(layout.n_modes)),
        "a": fit.a,
        "b": fit.b,
        "corr": fit.corr.astype(np.float32),
        "residual": fit.residual.astype(np.float32),
        "flags": flags,
    }
    block = plan.r1 - plan.r0 if plan.chunk_rows is None else plan.chunk_rows
    for array, v in values.items():
        write_result_chunk(url, name, array, (plan.index,), v, (block,))
    # last: the block's statistics row marks the block finished
    write_result_chunk(url, name, "block_stats", (plan.index, 0), stats[None, :], (1, layout.width))
    return stats


def _fit_on_cpu(
    x: np.ndarray, refs: References, ref_rows: tuple[np.ndarray, np.ndarray]
) -> BlockFit:
    """The fused numba kernel on the time-major block as read, or the numpy kernel
    (:data:`pipeline.config.FIT_KERNEL`)."""
    from pipeline.kernels import cmd_numba

    if cmd_numba.use_fused():
        return cmd_numba.fit_block_fused(x, refs, ref_rows)
    return fit_block(x.T, refs, ref_rows)


def _fit_on_gpu(
    x: np.ndarray, refs: References, ref_rows: tuple[np.ndarray, np.ndarray]
) -> BlockFit:
    import cupy

    xd = cupy.asarray(x)  # (Tw, rows) time-major, as read
    got = fit_block(xd.T, refs.to(cupy), (cupy.asarray(ref_rows[0]), cupy.asarray(ref_rows[1])))
    return BlockFit(**{f.name: to_numpy(getattr(got, f.name)) for f in fields(BlockFit)})


def build_fit_tasks(
    grid: ChunkGrid,
    name: str,
    plans: Sequence[BlockPlan],
    cols: np.ndarray,
    refs: References,
    layout: StatsLayout,
    *,
    gpu: bool = False,
) -> list[object]:
    """One delayed :func:`fit_task` per block plan (the caller leaves out finished blocks)."""
    refs_d = delayed(refs, traverse=False)
    cols_d = delayed(cols, traverse=False)
    return [
        delayed(fit_task, pure=False)(
            grid, name, p, cols_d, refs_d, layout, gpu, dask_key_name=f"fit-{name}-{p.index}"
        )
        for p in plans
    ]


def scan_task(
    grid: ChunkGrid, plan: BlockPlan, cols: np.ndarray, k: int, seed: int
) -> tuple[list[Pool], int]:
    """The varying rows of one block, per layer piece: exact counts and up to ``k`` of them in
    an order drawn from a generator seeded by ``(seed, block index)`` (the same whatever
    worker runs it); and the bytes read."""
    rows = plan.r1 - plan.r0
    x = _time_major(len(cols), rows)
    nbytes = grid.read_rows(plan.r0, plan.r1, cols, x)
    ok = varying_rows(x)
    rng = np.random.default_rng([seed, 2, plan.index])
    pools = []
    for lid, lo, hi in plan.layers:
        found = plan.r0 + lo + np.flatnonzero(ok[lo:hi])
        take = min(k, found.size)
        pools.append(Pool(lid, int(found.size), rng.permutation(found)[:take].astype(np.int64)))
    return pools, nbytes


def build_scan_tasks(
    grid: ChunkGrid, plans: Sequence[BlockPlan], cols: np.ndarray, k: int, seed: int
) -> list[object]:
    """One delayed :func:`scan_task` per block: the pass that finds the varying rows when
    sampling by rejection falls short (most parameters frozen)."""
    cols_d = delayed(cols, traverse=False)
    return [
        delayed(scan_task, pure=False)(grid, p, cols_d, k, seed, dask_key_name=f"scan-{p.index}")
        for p in plans
    ]

"""Task functions and graph builder of the CMD pass over all N parameters.

One task per row block: it reads the block's rows at the window's epochs (each trajectory
byte once), runs the fused kernel :func:`pipeline.kernels.cmd_numba.fit_block_fused` (or
:func:`pipeline.kernels.cmd.fit_block`: numpy without numba, CuPy with ``gpu``), writes its whole chunk of every
result array (in the study's dtypes: :class:`pipeline.store.analysis.StudyLayout`), and finally
its row of ``block_stats``, which marks the block finished.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np
from dask import delayed

from pipeline.buffers import scratch
from pipeline.compat import to_numpy
from pipeline.graph.packed import Packed, call_packed
from pipeline.kernels.cmd import (
    FLAG_CONSTANT,
    FLAG_SAMPLED,
    BlockFit,
    References,
    fit_block,
    group_sums,
    stored_coefficients,
    varying_rows,
)
from pipeline.kernels.sampling import Pool
from pipeline.plan.fit import BlockPlan, StatsLayout
from pipeline.store.analysis import (
    ANALYSIS_VERSION,
    StudyLayout,
    read_block_rows,
    write_result_chunk,
)
from pipeline.store.trajectory import ChunkGrid

__all__ = [
    "TOTALS_FAN_IN",
    "build_fit_tasks",
    "build_scan_tasks",
    "build_totals",
    "fit_task",
    "scan_task",
]

#: blocks per leaf of the totals tree, and totals per node above it
TOTALS_FAN_IN = 64


def _time_major(n_cols: int, n_rows: int, dtype: Any = np.float32) -> np.ndarray:
    """The task's reused (window epochs, rows) input buffer (float32, or the store's dtype)."""
    return scratch("fit-block", n_cols * n_rows, dtype).reshape(n_cols, n_rows)


def _sums(groups: np.ndarray, n: int, fit: BlockFit) -> np.ndarray:
    """(n, PER) sums per group id (see :class:`StatsLayout`): compiled when numba is there,
    else numpy's; the same bits either way."""
    from pipeline.kernels import cmd_numba

    args = (groups, n, fit.flags, fit.corr, fit.residual, fit.energy, fit.spread)
    if cmd_numba.available():
        return cmd_numba.group_sums_fused(*args)
    return group_sums(*args)


def fit_task(
    grid: ChunkGrid,
    name: str,
    plan: BlockPlan,
    cols: np.ndarray,
    refs: References,
    layout: StatsLayout,
    gpu: bool = False,
    diagnostics: bool = False,
) -> np.ndarray:
    """Fit one row block and write its results; returns its ``block_stats`` row.

    With ``gpu``, the block is copied to the device and the kernel runs on CuPy; the results
    come back to the host for the (small) sums and the writes. Whatever kernel ran, the
    per-row arrays are written in the study's dtypes (:class:`StudyLayout`): the anchored
    model in float32 (:func:`pipeline.kernels.cmd.stored_coefficients`, on the host), and
    ``corr`` and ``residual`` only with ``diagnostics``. The sums are taken from the kernel's
    float64 results before anything is rounded.
    """
    rows = plan.r1 - plan.r0
    fit = _fit_frozen(grid, plan, cols) if plan.frozen and not plan.ref_pos else None
    if fit is None:
        # a 16-bit trajectory is read as stored (half the bytes) and upcast inside the kernel;
        # local raw stores give the chunk files' pages themselves, mapped (no copy)
        x, _ = grid.rows_block(plan.r0, plan.r1, cols, "fit-block")
        ref_rows = (
            np.asarray(plan.ref_pos, dtype=np.int64),
            np.asarray(plan.ref_ids, dtype=np.int64),
        )
        fit = _fit_on_gpu(_as_float32(x), refs, ref_rows) if gpu else _fit_on_cpu(x, refs, ref_rows)
        del x  # a mapped block is unmapped here
    flags = fit.flags
    if plan.sample_pos:
        flags[np.asarray(plan.sample_pos)] |= FLAG_SAMPLED
    stats = np.zeros(layout.width)
    stats[layout.modes] = _sums(fit.mode, layout.n_modes, fit).ravel()
    stats[layout.residual_t] = fit.residual_t
    stats[layout.energy_t] = fit.energy_t
    stats[layout.spread_t] = fit.spread_t
    ids = np.full(layout.max_layers, -1.0)
    ids[: len(plan.layers)] = [lid for lid, _lo, _hi in plan.layers]
    stats[layout.layer_ids] = ids
    layer_of = scratch("fit-layer-of", rows, np.int64)
    for k, (_lid, lo, hi) in enumerate(plan.layers):
        layer_of[lo:hi] = k
    per_layer = _sums(layer_of, len(plan.layers), fit)
    stats[layout.layers][: per_layer.size] = per_layer.ravel()
    url = grid.url
    kinds = StudyLayout(ANALYSIS_VERSION, diagnostics).per_row(layout.n_modes, len(cols))
    a32, level32 = _stored(fit, refs)
    values = {"flags": flags, "a": a32, "level": level32}
    block = plan.r1 - plan.r0 if plan.chunk_rows is None else plan.chunk_rows
    for array, dt in kinds.items():
        v = values[array] if array in values else getattr(fit, array)
        write_result_chunk(url, name, array, (plan.index,), v.astype(dt, copy=False), (block,))
    # last: the block's statistics row marks the block finished
    write_result_chunk(url, name, "block_stats", (plan.index, 0), stats[None, :], (1, layout.width))
    return stats


def _stored(fit: BlockFit, refs: References) -> tuple[np.ndarray, np.ndarray]:
    """The float32 ``a`` and ``level`` the study stores (host arrays, whatever kernel ran):
    compiled when numba is there, else numpy's; the same bits either way."""
    from pipeline.kernels import cmd_numba

    if cmd_numba.available():
        return cmd_numba.stored_coefficients_fused(
            fit.mode, fit.a, fit.level, fit.anchor, refs, alloc=_reused
        )
    return stored_coefficients(fit.mode, fit.a, fit.level, fit.anchor, refs)


def _fit_frozen(grid: ChunkGrid, plan: BlockPlan, cols: np.ndarray) -> BlockFit | None:
    """The fit of a block whose tensors never change over the window (their ingest digests are
    equal at every epoch), from one epoch's values: what the kernel gives a constant row
    (mode 0, a = 0, b = the value, corr 0, residual 0, flag constant), without reading the
    other epochs. None when a value is NaN/Inf (then the kernel runs, to flag them as such)."""
    rows = plan.r1 - plan.r0
    x0 = _time_major(1, rows)
    grid.read_rows(plan.r0, plan.r1, cols[:1], x0)
    if not np.isfinite(x0).all():
        return None
    b = x0[0].astype(np.float64)
    n_t = len(cols)
    zeros = np.zeros(rows)
    sq = float(np.einsum("i,i->", b, b))  # not BLAS: the same bits on any thread count
    return BlockFit(
        mode=np.zeros(rows, dtype=np.int64),
        a=zeros,
        b=b,
        anchor=np.zeros(rows, dtype=np.int64),
        level=b,
        corr=zeros.copy(),
        residual=zeros.copy(),
        energy=n_t * b * b,
        spread=zeros.copy(),
        flags=np.full(rows, FLAG_CONSTANT, dtype=np.uint8),
        residual_t=np.zeros(n_t),
        energy_t=np.full(n_t, sq),
        spread_t=np.zeros(n_t),
    )


def _fit_on_cpu(
    x: np.ndarray, refs: References, ref_rows: tuple[np.ndarray, np.ndarray]
) -> BlockFit:
    """The fused numba kernel on the time-major block as read, or the numpy kernel
    (:data:`pipeline.config.FIT_KERNEL`)."""
    from pipeline.kernels import cmd_numba

    if cmd_numba.use_fused():
        return cmd_numba.fit_block_fused(x, refs, ref_rows, alloc=_reused)
    return fit_block(_as_float32(x).T, refs, ref_rows)


def _reused(field: str, n: int, dtype: Any) -> np.ndarray:
    """The kernel's per-row result array ``field``, in this thread's reused buffer (a task's
    results are written before the thread runs its next task)."""
    return scratch(f"fit-out-{field}", n, dtype)


def _as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 (16-bit values upcast exactly, into a reused buffer)."""
    if x.dtype == np.float32:
        return x
    out = scratch("fit-block-f32", x.size).reshape(x.shape)
    out[...] = x
    return out


_gpu_local = threading.local()


def _gpu_state(cupy: Any) -> dict[str, Any]:
    """The calling thread's reused GPU-task state (pinned and device buffers, stream, device
    references) for the module ``cupy``; started afresh if the module changes (tests)."""
    state = getattr(_gpu_local, "state", None)
    if state is None or state["module"] is not cupy:
        state = _gpu_local.state = {"module": cupy}
    return state


def _pinned(cupy: Any, key: str, nbytes: int) -> np.ndarray | None:
    """A page-locked host buffer of ``nbytes`` owned by the calling thread and reused across
    calls (like :func:`pipeline.buffers.scratch`), grown when too small; None when ``cupy``
    has no pinned allocator (then the copies go through pageable memory)."""
    alloc = getattr(getattr(cupy, "cuda", None), "alloc_pinned_memory", None)
    if alloc is None:
        return None
    state = _gpu_state(cupy)
    buf = state.get(key)
    if buf is None or buf.size < nbytes:
        mem = alloc(max(nbytes, 1))
        buf = np.frombuffer(mem, dtype=np.uint8, count=max(nbytes, 1))  # keeps ``mem`` alive
        state[key] = buf
    return buf[:nbytes]


def _stream(cupy: Any) -> Any:
    """The calling thread's non-blocking CUDA stream, or None without stream support."""
    make = getattr(getattr(cupy, "cuda", None), "Stream", None)
    if make is None:
        return None
    state = _gpu_state(cupy)
    if "stream" not in state:
        state["stream"] = make(non_blocking=True)
    return state["stream"]


def _device_refs(cupy: Any, refs: References) -> References:
    """``refs`` on the device, copied once per thread and reference set (a worker gets the
    same ``References`` object for every task of a fit)."""
    state = _gpu_state(cupy)
    held = state.get("refs")
    if held is not None and held[0] is refs:
        return held[1]
    dev = refs.to(cupy)
    state["refs"] = (refs, dev)  # the host object is held so that its id is never reused
    return dev


def _fit_on_gpu(
    x: np.ndarray,
    refs: References,
    ref_rows: tuple[np.ndarray, np.ndarray],
    timings: dict[str, float] | None = None,
) -> BlockFit:
    """The CuPy kernel on the time-major block ``x`` (Tw, rows) float32.

    The block goes to the device in one asynchronous copy on the thread's stream from a
    reused page-locked staging buffer, into a reused device buffer; the kernel runs on that
    stream; every result array is packed, byte for byte, into one device buffer that comes
    back in one copy into another reused page-locked buffer; one stream synchronisation ends
    the task (the kernel's own data-dependent branches, e.g. "any non-finite row?", sync as
    they must). The results are bit-identical to copying each array back on its own.

    ``timings`` (opt-in, for the GPU benchmark): filled with milliseconds of the staging copy
    into pinned memory (host), the host-to-device copy, the kernel and the device-to-host copy
    (CUDA events, no extra synchronisation), and the whole call.
    """
    import cupy

    t_call = time.perf_counter()
    stream = _stream(cupy)
    staging = _pinned(cupy, "fit-h2d", x.nbytes)
    pinned = stream is not None and staging is not None and hasattr(cupy.ndarray, "set")
    events = None
    if timings is not None and pinned and hasattr(cupy.cuda, "Event"):
        events = [cupy.cuda.Event() for _ in range(4)]
    with stream if stream is not None else contextlib.nullcontext():
        if pinned:
            assert staging is not None
            t0 = time.perf_counter()
            host = staging.view(np.float32).reshape(x.shape)
            np.copyto(host, x)
            t_stage = time.perf_counter() - t0
            xd = scratch("fit-block-device", x.size, np.float32, cupy).reshape(x.shape)
            if events:
                events[0].record(stream)
            xd.set(host, stream=stream)  # async: the source is page-locked
            if events:
                events[1].record(stream)
        else:  # no pinned memory or streams (e.g. a stand-in module): one plain copy
            t_stage = 0.0
            xd = cupy.asarray(x)
        dev_refs = _device_refs(cupy, refs)
        got = fit_block(xd.T, dev_refs, (cupy.asarray(ref_rows[0]), cupy.asarray(ref_rows[1])))
        if events:
            events[2].record(stream)
        parts = [getattr(got, f.name) for f in fields(BlockFit)]
        sizes = [int(p.size) * p.dtype.itemsize for p in parts]
        packed = cupy.empty(sum(sizes), dtype=cupy.uint8)
        off = 0
        for p, n in zip(parts, sizes, strict=True):
            packed[off : off + n] = cupy.ascontiguousarray(p).ravel().view(cupy.uint8)
            off += n
        out = _pinned(cupy, "fit-d2h", off) if pinned else None
        if out is not None:
            try:  # async into page-locked memory
                packed.get(stream=stream, out=out, blocking=False)
            except TypeError:  # CuPy < 13: a get() on a stream is asynchronous anyway
                packed.get(stream=stream, out=out)
            if events:
                events[3].record(stream)
            stream.synchronize()  # the one synchronisation that the copies need
            host_out = out.copy()  # the buffer is reused by the thread's next task
        else:
            host_out = to_numpy(packed)
    result = {}
    off = 0
    for f, p, n in zip(fields(BlockFit), parts, sizes, strict=True):
        result[f.name] = host_out[off : off + n].view(np.dtype(p.dtype)).reshape(p.shape)
        off += n
    if timings is not None:
        timings["stage_ms"] = t_stage * 1e3
        if events:
            elapsed = cupy.cuda.get_elapsed_time
            timings["h2d_ms"] = float(elapsed(events[0], events[1]))
            timings["kernel_ms"] = float(elapsed(events[1], events[2]))
            timings["d2h_ms"] = float(elapsed(events[2], events[3]))
        timings["call_ms"] = (time.perf_counter() - t_call) * 1e3
    return BlockFit(**result)


def build_fit_tasks(
    grid: ChunkGrid,
    name: str,
    plans: Sequence[BlockPlan],
    cols: np.ndarray,
    refs: References,
    layout: StatsLayout,
    *,
    gpu: bool = False,
    diagnostics: bool = False,
) -> list[object]:
    """One delayed :func:`fit_task` per block plan (the caller leaves out finished blocks).

    The columns and references are one graph key each, shared by every task; the rest of a
    task's arguments go in a :class:`~pipeline.graph.packed.Packed` (dask would otherwise
    walk each block plan's layers in the client)."""
    refs_d = delayed(refs, traverse=False)
    cols_d = delayed(cols, traverse=False)
    return [
        delayed(call_packed, pure=False)(
            _fit_packed,
            Packed((grid, name, p, layout, gpu, diagnostics)),
            cols_d,
            refs_d,
            dask_key_name=f"fit-{name}-{p.index}",
        )
        for p in plans
    ]


def _fit_packed(
    grid: ChunkGrid,
    name: str,
    plan: BlockPlan,
    layout: StatsLayout,
    gpu: bool,
    diagnostics: bool,
    cols: np.ndarray,
    refs: References,
) -> np.ndarray:
    """:func:`fit_task` with the shared arguments last (:func:`build_fit_tasks`)."""
    return fit_task(grid, name, plan, cols, refs, layout, gpu, diagnostics)


def totals_leaf(
    url: str,
    name: str,
    layout: StatsLayout,
    n_layers: int,
    indices: tuple[int, ...],
    computed: tuple[int, ...],
    *rows: np.ndarray,
) -> np.ndarray:
    """The totals (:meth:`StatsLayout.fold`) of the consecutive blocks ``indices``: the rows
    of the blocks in ``computed`` are ``rows`` (their fit tasks' results, in that order), the
    others are read from the store (blocks finished by an earlier run). Folded in block order
    whichever blocks ran now, so a resumed fit gives the same bits as one run."""
    width = layout.width
    got = dict(zip(computed, rows, strict=True))
    stored = [i for i in indices if i not in got]
    read = read_block_rows(url, name, stored, width)
    for i, row in zip(stored, read, strict=True):
        got[i] = row
    return layout.fold(np.stack([np.asarray(got[i]).reshape(width) for i in indices]), n_layers)


def totals_node(*parts: np.ndarray) -> np.ndarray:
    """The sum of totals vectors, in the order given (a fixed tree: reproducible bits)."""
    return np.sum(np.stack(parts), axis=0)


def build_totals(
    url: str,
    name: str,
    layout: StatsLayout,
    n_layers: int,
    n_blocks: int,
    fit_tasks: dict[int, object],
    fan_in: int | None = None,
) -> object:
    """One delayed totals vector of all ``n_blocks`` blocks: a tree of sums over groups of
    ``fan_in`` consecutive blocks, whose leaves take the rows of ``fit_tasks`` (block index
    -> delayed :func:`fit_task`) as they finish and read the others' rows from the store.
    The client gathers this one vector (a few KB), not one row per block. ``fan_in``:
    :data:`TOTALS_FAN_IN` by default."""
    fan_in = max(2, int(fan_in or TOTALS_FAN_IN))
    if n_blocks < 1:
        return delayed(np.zeros, pure=True)(layout.totals_width(n_layers))
    level: list[object] = []
    for g0 in range(0, n_blocks, fan_in):
        idx = tuple(range(g0, min(g0 + fan_in, n_blocks)))
        computed = tuple(i for i in idx if i in fit_tasks)
        level.append(
            delayed(totals_leaf, pure=False)(
                url, name, layout, n_layers, idx, computed,
                *(fit_tasks[i] for i in computed),
                dask_key_name=f"totals-{name}-0-{g0 // fan_in}",
            )
        )  # fmt: skip
    depth = 1
    while len(level) > 1:
        level = [
            delayed(totals_node, pure=True)(
                *level[k : k + fan_in], dask_key_name=f"totals-{name}-{depth}-{k // fan_in}"
            )
            for k in range(0, len(level), fan_in)
        ]
        depth += 1
    return level[0]


def scan_task(
    grid: ChunkGrid, plan: BlockPlan, cols: np.ndarray, k: int, seed: int
) -> tuple[list[Pool], int]:
    """The varying rows of one block, per layer piece: exact counts and up to ``k`` of them in
    an order drawn from a generator seeded by ``(seed, block index)`` (the same whatever
    worker runs it); and the bytes read."""
    x, nbytes = grid.rows_block(plan.r0, plan.r1, cols, "fit-block", np.float32)
    ok = varying_rows(x)
    del x  # a mapped block is unmapped here
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
        delayed(call_packed, pure=False)(
            _scan_packed, Packed((grid, p, k, seed)), cols_d, dask_key_name=f"scan-{p.index}"
        )
        for p in plans
    ]


def _scan_packed(
    grid: ChunkGrid, plan: BlockPlan, k: int, seed: int, cols: np.ndarray
) -> tuple[list[Pool], int]:
    """:func:`scan_task` with the shared columns last (:func:`build_scan_tasks`)."""
    return scan_task(grid, plan, cols, k, seed)

"""``reconstruct``: CMD trajectories ``a * r_mode(t) + b``, computed in float64, one block at a time.

The full reconstruction is written to ``analyses/<name>/reconstructed`` (N, Tw) float32; one
epoch of it can be exported as a state_dict without writing anything (see
:func:`analysis_column` and ``cmd-pipeline export --analysis``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import zarr
from dask import delayed

from pipeline.errors import PipelineError
from pipeline.plan import blocks
from pipeline.runtime import Runner, RuntimeOptions, using
from pipeline.store.analysis import complete_study, open_result
from pipeline.store.trajectory import TrajectoryStore

__all__ = ["ReconstructResult", "analysis_column", "reconstruct", "reconstruct_block"]

RECONSTRUCTED = "reconstructed"


def reconstruct_block(
    mode: np.ndarray, a: np.ndarray, b: np.ndarray, refs: np.ndarray, cols: slice | np.ndarray
) -> np.ndarray:
    """``a * refs[mode, cols] + b`` in float64 (rows x len(cols)). A reference row (a=1, b=0)
    gives back its own profile exactly."""
    r = refs[:, cols]
    return a[:, None] * r[mode.astype(np.int64)] + b[:, None]


@dataclass
class ReconstructResult:
    store: str
    name: str
    shape: tuple[int, int]
    blocks_written: int
    blocks_kept: int

    def summary(self) -> str:
        return (
            f"analysis {self.name!r}: reconstructed ({self.shape[0]:,} x {self.shape[1]}) float32; "
            f"{self.blocks_written} block(s) written, {self.blocks_kept} kept"
        )


def _block_task(url: str, name: str, r0: int, r1: int, refs: np.ndarray) -> None:
    mode = np.asarray(open_result(url, name, "mode")[r0:r1])
    a = np.asarray(open_result(url, name, "a")[r0:r1])
    b = np.asarray(open_result(url, name, "b")[r0:r1])
    rec = reconstruct_block(mode, a, b, refs, slice(None)).astype(np.float32)
    open_result(url, name, RECONSTRUCTED)[r0:r1, :] = rec


def reconstruct(
    store: str | os.PathLike[str],
    name: str,
    *,
    runtime: RuntimeOptions | None = None,
    run: Runner | None = None,
) -> ReconstructResult:
    """Write ``analyses/<name>/reconstructed`` (N, Tw) float32; resumable, idempotent."""
    st = TrajectoryStore.open(store, writable=True)
    meta = st.require_meta()
    ag, _ = complete_study(st, name)
    refs = np.asarray(ag.array("refs")[...])
    block_rows = int(ag.array("mode").chunks[0])
    shape = (meta.n_rows, refs.shape[1])
    g = ag.group()
    if RECONSTRUCTED not in g.array_keys():
        g.create_array(
            RECONSTRUCTED,
            shape=shape,
            chunks=(block_rows, shape[1]),
            dtype="float32",
            fill_value=np.float32("nan"),
            compressors=None,
            config={"write_empty_chunks": True},
        )
    arr = g[RECONSTRUCTED]
    ag.remove_partials()  # temporary files of writes that an interruption cut off
    prefix = f"{ag.path}/{RECONSTRUCTED}/c/"
    done = {k[len(prefix) :] for k in _keys(st, prefix)}
    todo = [
        (r0, r1) for r0, r1 in blocks(shape[0], block_rows) if f"{r0 // block_rows}/0" not in done
    ]
    refs_d = delayed(refs, traverse=False)
    tasks = [
        delayed(_block_task, pure=False)(
            st.url, name, r0, r1, refs_d, dask_key_name=f"reconstruct-{name}-{r0}"
        )
        for r0, r1 in todo
    ]
    labels = [f"reconstructed rows {r0}-{r1}" for r0, r1 in todo]
    try:
        with using(run, runtime, cpu_only="reconstruct") as r:
            r.compute(tasks, f"reconstruct {name}", labels)
    finally:
        ag.remove_partials()  # left by a worker killed mid-write
    del arr
    n_blocks = -(-shape[0] // block_rows)
    return ReconstructResult(st.url, name, shape, len(todo), n_blocks - len(todo))


def _keys(st: TrajectoryStore, prefix: str) -> list[str]:
    from zarr.core.sync import sync

    async def _ls() -> list[str]:
        return [k async for k in st.root.store.list_prefix(prefix)]

    return sync(_ls())


def analysis_column(
    st: TrajectoryStore, name: str, epoch: int
) -> Callable[[], Iterator[tuple[int, np.ndarray]]]:
    """A column source (see :mod:`pipeline.ops.export`) of the CMD weights at ``epoch``."""
    ag, _ = complete_study(st, name)
    epochs = [int(e) for e in np.asarray(ag.array("epochs")[...])]
    if epoch not in epochs:
        raise PipelineError(
            f"epoch {epoch} is not in analysis {name!r}'s window ({epochs[0]}..{epochs[-1]})"
        )
    k = epochs.index(epoch)
    refs = np.asarray(ag.array("refs")[...])
    n = st.require_meta().n_rows
    rows = int(ag.array("mode").chunks[0])
    arrays = {
        a: zarr.open_array(st.url, path=f"{ag.path}/{a}", mode="r") for a in ("mode", "a", "b")
    }

    def gen() -> Iterator[tuple[int, np.ndarray]]:
        for r0, r1 in blocks(n, rows):
            m, a, b = (np.asarray(arrays[x][r0:r1]) for x in ("mode", "a", "b"))
            yield r0, reconstruct_block(m, a, b, refs, np.array([k]))[:, 0].astype(np.float32)

    return gen

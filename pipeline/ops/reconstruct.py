"""``reconstruct``: CMD trajectories ``a * r_mode(t) + b``, computed in float64, one block at a time.

The study stores each line anchored (``level + a (r_mode(t) - r_mode(anchor))``, float32;
version-1 studies: ``a`` and ``b`` in float64); :class:`pipeline.store.analysis.StudyLayout`
says which.

Owns the operation: which blocks of ``analyses/<name>/reconstructed`` (N, Tw) float32 are
still to write (resume), running their tasks (:mod:`pipeline.graph.reconstruct`) on a runtime,
and the result. One epoch of the reconstruction can be exported as a state_dict without
writing anything (see :func:`analysis_column` and ``cmd-pipeline export --analysis``). The
math is :func:`pipeline.kernels.reconstruct.reconstruct_block` (re-exported here); the Zarr
I/O is :mod:`pipeline.store.analysis`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError
from pipeline.graph.reconstruct import RECONSTRUCTED, build_reconstruct_tasks
from pipeline.kernels.reconstruct import reconstruct_block
from pipeline.plan import blocks
from pipeline.runtime import Runner, RuntimeOptions, using
from pipeline.store.analysis import complete_study, read_result
from pipeline.store.remote import StorageOptions, with_storage_options
from pipeline.store.trajectory import TrajectoryStore

__all__ = ["ReconstructResult", "analysis_column", "reconstruct", "reconstruct_block"]


@dataclass
class ReconstructResult:
    store: str
    name: str
    shape: tuple[int, int]
    blocks_written: int
    blocks_kept: int

    def text(self) -> str:
        """The result in words (every result type has this method; ``summary()`` is the
        same text)."""
        return self.summary()

    def summary(self) -> str:
        return (
            f"analysis {self.name!r}: reconstructed ({self.shape[0]:,} x {self.shape[1]}) float32; "
            f"{self.blocks_written} block(s) written, {self.blocks_kept} kept"
        )


@with_storage_options("store")
def reconstruct(
    store: str | os.PathLike[str],
    name: str,
    *,
    storage_options: StorageOptions | None = None,
    runtime: RuntimeOptions | None = None,
    run: Runner | None = None,
) -> ReconstructResult:
    """Write ``analyses/<name>/reconstructed`` (N, Tw) float32; resumable, idempotent
    (``storage_options``: fsspec options for a store on object storage)."""
    st = TrajectoryStore.open(store, writable=True)
    meta = st.require_meta()
    ag, _ = complete_study(st, name)
    layout = ag.layout()
    refs = np.asarray(ag.array("refs")[...])
    block_rows = int(ag.array("mode").chunks[0])
    shape = (meta.n_rows, refs.shape[1])
    ag.require_array(
        RECONSTRUCTED,
        shape=shape,
        chunks=(block_rows, shape[1]),
        dtype="float32",
        fill_value=np.float32("nan"),
    )
    ag.remove_partials()  # temporary files of writes that an interruption cut off
    done = ag.written_chunks(RECONSTRUCTED)
    todo = [
        (r0, r1) for r0, r1 in blocks(shape[0], block_rows) if f"{r0 // block_rows}/0" not in done
    ]
    tasks, labels = build_reconstruct_tasks(st.url, name, todo, refs, layout)
    try:
        with using(run, runtime, cpu_only="reconstruct") as r:
            r.compute(tasks, f"reconstruct {name}", labels)
    finally:
        ag.remove_partials()  # left by a worker killed mid-write
    n_blocks = -(-shape[0] // block_rows)
    return ReconstructResult(st.url, name, shape, len(todo), n_blocks - len(todo))


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
    arrays = [read_result(st.url, name, a) for a in ag.layout().model]

    def gen() -> Iterator[tuple[int, np.ndarray]]:
        for r0, r1 in blocks(n, rows):
            m, a, b, *anchor = (np.asarray(arr[r0:r1]) for arr in arrays)
            rec = reconstruct_block(m, a, b, refs, np.array([k]), *anchor)
            yield r0, rec[:, 0].astype(np.float32)

    return gen

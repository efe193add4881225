"""Online CMD for models too large for one machine, client side: the running sums live in a store.

The training process holds only the model and the per-mode statistics. The warm-up epochs are
written to the store as a trajectory (``trajectory``, float32 (N, F), the usual layout, so
``info``/``export``/``fit`` work on it); post-hoc CMD on it (:func:`pipeline.ops.fit.fit`, study
``online-warmup``) fixes the modes and references. The per-parameter sums then live in
``online/`` (layout, schema and I/O: :mod:`pipeline.store.online`), and each epoch's update is a
Dask graph of one task per row block (:mod:`pipeline.graph.online`): read ``current`` and the
previous parity's sums, write the new parity's. The per-mode statistics and the epoch count are
committed to the group's attributes only after every task succeeded, so an interrupted update
leaves the previous epoch's sums intact and is simply run again.

NaN/Inf (the policy of :mod:`pipeline.online`): a row whose ``current`` value is non-finite is
flagged FLAG_NONFINITE in ``flags`` (for good; an interrupted update may already have flagged
the rows of its finished blocks, which the re-run flags again) and a flagged row's sums are
never updated again; rows with NaN/Inf in the warm-up get zero sums. The fit of a flagged row
(its last finite one) is held by the client, which finds the row's ``(a, b)`` with
:meth:`StoreRunningFit.coefficients_of` before the update that flags it.

This module owns the client's sequence (record, fit the warm-up, start and commit the tasks);
it imports neither Zarr nor builds graphs itself.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

from pipeline._version import __version__
from pipeline.errors import PipelineError
from pipeline.graph.online import build_init_tasks, build_update_tasks
from pipeline.kernels.online import coefficients_rows, reference_stats, step_references
from pipeline.ops.fit import fit
from pipeline.plan import blocks, default_chunk_rows
from pipeline.runtime import Runner, RuntimeOptions, runner
from pipeline.store.analysis import AnalysisGroup
from pipeline.store.online import OnlineGroup, OnlineMeta
from pipeline.store.schema import EpochEntry, IngestSettings, SourceFile, StoreMeta, TensorEntry
from pipeline.store.trajectory import TrajectoryStore

__all__ = ["WARMUP_STUDY", "StoreRunningFit"]

#: the post-hoc study of the warm-up, ``analyses/online-warmup``
WARMUP_STUDY = "online-warmup"


class StoreRunningFit:
    """The store side of :class:`pipeline.online.OnlineCMD` (``store=`` given).

    Parameters
    ----------
    url
        A new store (one without a trajectory).
    names, shapes, offsets, sizes
        The model's floating-point parameters: names, shapes, first rows and sizes.
    warmup
        The warm-up's epochs.
    runtime, run
        How the Dask graphs run: an open runner, or options for one started on first use.
    """

    def __init__(
        self,
        url: str,
        names: Sequence[str],
        shapes: Sequence[tuple[int, ...]],
        offsets: Sequence[int],
        sizes: Sequence[int],
        warmup: int,
        runtime: RuntimeOptions | None,
        run: Runner | None = None,
    ) -> None:
        st = TrajectoryStore.open_or_create(url)
        if st.meta is not None or OnlineGroup(st.url).exists():
            raise PipelineError(
                f"{st.url} already holds a trajectory: Online CMD needs a new store"
            )
        self.url = st.url
        self.online = OnlineGroup(self.url)
        self.n = int(sum(sizes))
        self.warmup = warmup
        self.runtime = runtime or RuntimeOptions()
        self._run = run
        self._stack = contextlib.ExitStack()
        self.tensors = tuple(
            TensorEntry(name, tuple(shape), "float32", "parameter", int(off))
            for name, shape, off in zip(names, shapes, offsets, strict=True)
        )
        self.settings = IngestSettings(
            chunk_rows=default_chunk_rows(self.n, 1), time_chunk=1, codec="none"
        )
        self.block_rows = self.settings.chunk_rows
        self.epochs: list[EpochEntry] = []
        self.mean_r: np.ndarray | None = None
        self.m2_r: np.ndarray | None = None
        self.count = 0

    def runner(self) -> Runner:
        """The runner given, or one started on first use and kept until :meth:`close`."""
        if self._run is None:
            self._run = self._stack.enter_context(runner(self.runtime))
        return self._run

    def close(self) -> None:
        """Close the runtime this object started (a LocalCluster), if any."""
        self._stack.close()

    # ------------------------------------------------------------------ warm-up
    def record(self, w: np.ndarray, e: int) -> None:
        """Write warm-up epoch ``e`` as trajectory column ``e`` (client side, chunk by chunk);
        writing the same epoch again (after a failure) replaces it."""
        del self.epochs[e:]
        st = (
            TrajectoryStore.open(self.url, writable=True)
            if e
            else TrajectoryStore.open_or_create(self.url)
        )
        if e == 0 and not st.has_trajectory():
            st.write_meta(StoreMeta(self.settings, self.tensors, self.n, (), None, __version__))
            st.create_trajectory(self.n, self.warmup, self.settings)
        grid = st.chunk_grid()
        for r0, r1 in blocks(self.n, grid.chunk_rows):
            grid.write(r0, e, w[r0:r1, None])
        digest = hashlib.sha256(w.tobytes()).hexdigest()
        self.epochs.append(EpochEntry(e, (SourceFile(f"online://epoch_{e}", w.nbytes, digest),)))
        st.write_meta(
            StoreMeta(self.settings, self.tensors, self.n, tuple(self.epochs), None, __version__)
        )

    def finish_warmup(
        self, modes: int | None, threshold: float | None, samples: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Post-hoc CMD on the warm-up, then the running sums; returns ``(ref_index, r at the
        last warm-up epoch, rows with NaN/Inf in the warm-up, their last finite values)``."""
        rt = self.runner()
        fit(
            self.url,
            WARMUP_STUDY,
            modes=modes,
            threshold=threshold,
            samples=samples,
            seed=seed,
            run=rt,
        )
        ag = AnalysisGroup(self.url, WARMUP_STUDY)
        refs = np.asarray(ag.array("refs")[...], dtype=np.float64)
        ref_index = np.asarray(ag.array("ref_index")[...]).astype(np.int64)
        self.mean_r, self.m2_r, rc = reference_stats(refs)
        self.online.create(self.n, self.block_rows, refs.shape[0])
        t = refs.shape[1]
        tasks = build_init_tasks(self.url, WARMUP_STUDY, self.n, self.block_rows, rc, t)
        found = rt.compute(tasks, "online CMD: running sums")
        self.count = t
        self._commit()
        bad = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in found])
        last = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in found])
        return ref_index, refs[:, -1].copy(), bad, last

    def _commit(self) -> None:
        assert self.mean_r is not None and self.m2_r is not None
        self.online.commit(OnlineMeta.from_arrays(self.count, self.mean_r, self.m2_r))

    # ------------------------------------------------------------------ after the warm-up
    def update(self, w: np.ndarray, r: np.ndarray) -> None:
        """Add one epoch; the sums of the previous epoch stay intact until every block is done.
        ``r`` (the references) must be finite; rows of ``w`` that are NaN/Inf are flagged and
        skipped (module docstring)."""
        assert self.mean_r is not None and self.m2_r is not None
        self.online.write_current(w, self.block_rows)
        dr, new_mean, new_m2 = step_references(self.mean_r, self.m2_r, self.count, r)
        n1 = self.count + 1
        tasks = build_update_tasks(self.url, self.n, self.block_rows, dr, n1)
        self.runner().compute(tasks, f"online CMD: epoch {n1}")
        self.mean_r, self.m2_r, self.count = new_mean, new_m2, n1
        self._commit()

    def coefficient_blocks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(row start, mode, a, b)`` block by block (client side)."""
        assert self.mean_r is not None and self.m2_r is not None
        for r0, r1 in blocks(self.n, self.block_rows):
            mean_w, c_rw = self.online.read_sums(self.count, r0, r1)
            mode = self.online.read_mode(r0, r1)
            a, b = coefficients_rows(mean_w, c_rw, mode, self.mean_r, self.m2_r)
            yield r0, mode, a, b

    def coefficients_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` of the given rows (sorted int64) from the committed sums (client side)."""
        assert self.mean_r is not None and self.m2_r is not None
        mean_w, c_rw = self.online.take_sums(self.count, rows)
        a, b = coefficients_rows(mean_w, c_rw, self.mode_of(rows), self.mean_r, self.m2_r)
        return np.asarray(a), np.asarray(b)

    def mode_of(self, rows: np.ndarray) -> np.ndarray:
        """The modes of the given rows (int64)."""
        return self.online.take_mode(rows)

"""Online CMD for models too large for one machine: the running sums live in a Zarr store.

The training process holds only the model. The warm-up epochs are written to the store as a
trajectory (``trajectory``, float32 (N, F), the usual layout, so ``info``/``export``/``fit``
work on it); post-hoc CMD on it (:func:`pipeline.fit`, study ``online-warmup``) fixes the modes
and references. The per-parameter sums then live in ``online/``:

    current            (N,)  float32   the parameters of the epoch being added
    mode               (N,)  uint8...  each parameter's mode (fixed by the warm-up)
    flags              (N,)  uint8     the warm-up fit's flags, plus FLAG_NONFINITE when a
                                       parameter turns NaN/Inf after the warm-up
    mean_w_0, mean_w_1 (N,)  float64   running mean, double-buffered by the epoch count's parity
    c_rw_0,   c_rw_1   (N,)  float64   co-moment with the mode's reference, double-buffered

The sums over a window of ``n`` epochs live in slot ``n % 2`` (the warm-up's, too, whatever the
parity of the warm-up), and each epoch's update is a Dask graph of one task per row block: read
``current`` and the previous parity's sums, write the new parity's. The per-mode statistics (M
numbers) and the epoch count are committed to the group's attributes only after every task
succeeded, so an interrupted update leaves the previous epoch's sums intact and is simply run
again.

NaN/Inf (the policy of :mod:`pipeline.online`): a row whose ``current`` value is non-finite is
flagged FLAG_NONFINITE in ``flags`` (for good; an interrupted update may already have flagged
the rows of its finished blocks, which the re-run flags again) and a flagged row's sums are
never updated again; rows with NaN/Inf in the warm-up get zero sums. The fit of a flagged row
(its last finite one) is held by the client, which finds the row's ``(a, b)`` with
:meth:`StoreRunningFit.coefficients_of` before the update that flags it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import zarr
from dask import delayed

from pipeline._version import __version__
from pipeline.errors import PipelineError
from pipeline.kernels.cmd import FLAG_NONFINITE
from pipeline.kernels.online import (
    coefficients_rows,
    init_rows,
    nonfinite_rows,
    reference_stats,
    update_rows,
)
from pipeline.plan import blocks, default_chunk_rows
from pipeline.runtime import Runner, RuntimeOptions, runner
from pipeline.store.analysis import AnalysisGroup, mode_dtype
from pipeline.store.schema import EpochEntry, IngestSettings, SourceFile, StoreMeta, TensorEntry
from pipeline.store.trajectory import TrajectoryStore

__all__ = ["StoreRunningFit"]

GROUP = "online"
WARMUP_STUDY = "online-warmup"
ATTR = "cmd_pipeline_online"


def _arr(url: str, name: str, mode: str = "r") -> Any:
    return zarr.open_array(url, path=f"{GROUP}/{name}", mode=mode)


def _init_task(url: str, r0: int, r1: int, rc: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """The warm-up's sums of rows ``[r0, r1)``; returns the rows with NaN/Inf in the warm-up
    (global indices) and each one's last finite value."""
    st = TrajectoryStore.open(url)
    grid = st.chunk_grid()
    x = np.empty((t, r1 - r0), dtype=np.float32)
    grid.read_rows(r0, r1, np.arange(t, dtype=np.int64), x)
    study = f"analyses/{WARMUP_STUDY}"
    mode = np.asarray(zarr.open_array(url, path=f"{study}/mode", mode="r")[r0:r1])
    flags = np.asarray(zarr.open_array(url, path=f"{study}/flags", mode="r")[r0:r1])
    bad, last = nonfinite_rows(x.T)
    if bad.size:  # no fit over the warm-up: zero sums, never updated (the client holds them)
        x[:, bad] = 0.0
        flags[bad] |= FLAG_NONFINITE
    mean_w, c_rw = init_rows(x.T, rc, mode.astype(np.int64))
    # the sums of a window of t epochs live in slot t % 2, the slot the readers and the next
    # update pick by the parity of the epoch count
    _arr(url, "mode", "r+")[r0:r1] = mode
    _arr(url, "flags", "r+")[r0:r1] = flags
    _arr(url, f"mean_w_{t % 2}", "r+")[r0:r1] = mean_w
    _arr(url, f"c_rw_{t % 2}", "r+")[r0:r1] = c_rw
    return r0 + bad, last


def _update_task(url: str, r0: int, r1: int, dr: np.ndarray, n1: int) -> None:
    src, dst = (n1 - 1) % 2, n1 % 2
    mean_w = np.asarray(_arr(url, f"mean_w_{src}")[r0:r1], dtype=np.float64)
    c_rw = np.asarray(_arr(url, f"c_rw_{src}")[r0:r1], dtype=np.float64)
    mode = np.asarray(_arr(url, "mode")[r0:r1]).astype(np.int64)
    w = np.asarray(_arr(url, "current")[r0:r1])
    flags = np.asarray(_arr(url, "flags")[r0:r1])
    held = (flags & FLAG_NONFINITE) != 0
    bad = ~np.isfinite(w)
    if (bad & ~held).any():  # newly non-finite rows: flagged for good
        flags[bad] |= FLAG_NONFINITE
        _arr(url, "flags", "r+")[r0:r1] = flags
        held |= bad
    update_rows(mean_w, c_rw, mode, w, dr, n1, held if held.any() else None)
    _arr(url, f"mean_w_{dst}", "r+")[r0:r1] = mean_w
    _arr(url, f"c_rw_{dst}", "r+")[r0:r1] = c_rw


class StoreRunningFit:
    """The store side of :class:`pipeline.online.OnlineCMD` (``store=`` given)."""

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
        if st.meta is not None or GROUP in st.root.group_keys():
            raise PipelineError(f"{st.url} already holds a trajectory: Online CMD needs a new store")
        self.url = st.url
        self.n = int(sum(sizes))
        self.warmup = warmup
        self.runtime = runtime or RuntimeOptions()
        self._run = run
        self._stack = contextlib.ExitStack()
        self.tensors = tuple(
            TensorEntry(name, tuple(shape), "float32", "parameter", int(off))
            for name, shape, off in zip(names, shapes, offsets, strict=True)
        )
        self.settings = IngestSettings(chunk_rows=default_chunk_rows(self.n, 1), time_chunk=1, codec="none")
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
        st = TrajectoryStore.open(self.url, writable=True) if e else TrajectoryStore.open_or_create(self.url)
        if e == 0 and not st.has_trajectory():
            st.write_meta(StoreMeta(self.settings, self.tensors, self.n, (), None, __version__))
            st.create_trajectory(self.n, self.warmup, self.settings)
        grid = st.chunk_grid()
        for r0, r1 in blocks(self.n, grid.chunk_rows):
            grid.write(r0, e, w[r0:r1, None])
        digest = hashlib.sha256(w.tobytes()).hexdigest()
        self.epochs.append(EpochEntry(e, (SourceFile(f"online://epoch_{e}", w.nbytes, digest),)))
        st.write_meta(StoreMeta(self.settings, self.tensors, self.n, tuple(self.epochs), None, __version__))

    def finish_warmup(
        self, modes: int | None, threshold: float | None, samples: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Post-hoc CMD on the warm-up, then the running sums; returns ``(ref_index, r at the
        last warm-up epoch, rows with NaN/Inf in the warm-up, their last finite values)``."""
        import pipeline

        rt = self.runner()
        pipeline.fit(self.url, WARMUP_STUDY, modes=modes, threshold=threshold, samples=samples,
                     seed=seed, run=rt)
        ag = AnalysisGroup(self.url, WARMUP_STUDY)
        refs = np.asarray(ag.array("refs")[...], dtype=np.float64)
        ref_index = np.asarray(ag.array("ref_index")[...]).astype(np.int64)
        self.mean_r, self.m2_r, rc = reference_stats(refs)
        root = zarr.open_group(self.url, mode="r+")
        g = root.require_group(GROUP)
        chunks = (self.block_rows,)
        for name, dt in (("current", "float32"), ("mode", mode_dtype(refs.shape[0])),
                         ("flags", "uint8"),
                         ("mean_w_0", "float64"), ("mean_w_1", "float64"),
                         ("c_rw_0", "float64"), ("c_rw_1", "float64")):
            g.create_array(name, shape=(self.n,), chunks=chunks, dtype=dt, fill_value=0,
                           compressors=None, config={"write_empty_chunks": True})
        t = refs.shape[1]
        rc_d = delayed(rc, traverse=False)
        tasks = [delayed(_init_task, pure=False)(self.url, r0, r1, rc_d, t, dask_key_name=f"online-init-{r0}")
                 for r0, r1 in blocks(self.n, self.block_rows)]
        found = rt.compute(tasks, "online CMD: running sums")
        self.count = t
        self._commit()
        bad = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in found])
        last = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in found])
        return ref_index, refs[:, -1].copy(), bad, last

    def _commit(self) -> None:
        assert self.mean_r is not None and self.m2_r is not None
        g = zarr.open_group(self.url, mode="r+")[GROUP]
        g.attrs[ATTR] = {"n": self.count, "mean_r": self.mean_r.tolist(), "m2_r": self.m2_r.tolist()}

    # ------------------------------------------------------------------ after the warm-up
    def update(self, w: np.ndarray, r: np.ndarray) -> None:
        """Add one epoch; the sums of the previous epoch stay intact until every block is done.
        ``r`` (the references) must be finite; rows of ``w`` that are NaN/Inf are flagged and
        skipped (module docstring)."""
        from pipeline.kernels.online import step_references

        assert self.mean_r is not None and self.m2_r is not None
        cur = _arr(self.url, "current", "r+")
        for r0, r1 in blocks(self.n, self.block_rows):
            cur[r0:r1] = w[r0:r1]
        dr, new_mean, new_m2 = step_references(self.mean_r, self.m2_r, self.count, r)
        n1 = self.count + 1
        dr_d = delayed(dr, traverse=False)
        tasks = [delayed(_update_task, pure=False)(self.url, r0, r1, dr_d, n1, dask_key_name=f"online-{n1}-{r0}")
                 for r0, r1 in blocks(self.n, self.block_rows)]
        self.runner().compute(tasks, f"online CMD: epoch {n1}")
        self.mean_r, self.m2_r, self.count = new_mean, new_m2, n1
        self._commit()

    def coefficient_blocks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(row start, mode, a, b)`` block by block (client side)."""
        assert self.mean_r is not None and self.m2_r is not None
        p = self.count % 2
        for r0, r1 in blocks(self.n, self.block_rows):
            mean_w = np.asarray(_arr(self.url, f"mean_w_{p}")[r0:r1])
            c_rw = np.asarray(_arr(self.url, f"c_rw_{p}")[r0:r1])
            mode = np.asarray(_arr(self.url, "mode")[r0:r1]).astype(np.int64)
            a, b = coefficients_rows(mean_w, c_rw, mode, self.mean_r, self.m2_r)
            yield r0, mode, a, b

    def coefficients_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` of the given rows (sorted int64) from the committed sums (client side)."""
        assert self.mean_r is not None and self.m2_r is not None
        p = self.count % 2
        mean_w = np.asarray(_arr(self.url, f"mean_w_{p}").oindex[rows])
        c_rw = np.asarray(_arr(self.url, f"c_rw_{p}").oindex[rows])
        a, b = coefficients_rows(mean_w, c_rw, self.mode_of(rows), self.mean_r, self.m2_r)
        return np.asarray(a), np.asarray(b)

    def mode_of(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(_arr(self.url, "mode").oindex[rows]).astype(np.int64)


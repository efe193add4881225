"""Out-of-core baselines for CMD on a trajectory store W (N x T float32): POD and exact DMD.

Both baselines are built on the T x T Gram matrix ``G = W^T W`` of the window's columns,
accumulated in float64 by one Dask pass over the row blocks (:func:`gram`): each task reads
its rows once, at the window's epochs, and returns its partial ``X_b^T X_b``; the client sums
them. Rows holding a NaN/Inf anywhere in the window are left out of every method (counted in
:attr:`GramResult.n_nonfinite`); ``N`` below is the number of finite rows.

This module runs the passes and reports their results; the math is in
:mod:`pipeline.kernels.baselines` (per block and on the Gram) and the tasks and graphs in
:mod:`pipeline.graph.baselines`.

Costs
-----
* Gram pass: reads N T float32 once, N T (T + 1) flops (a symmetric rank-k update per block),
  T^2 float64 of memory on the client, one float64 copy of its block per task.
* POD (:func:`pod_errors`): an eigendecomposition of G, O(T^3); no further pass.
* DMD (:func:`dmd_errors`): O(T^3) per rank from Gram blocks, then ONE more pass over the rows
  that measures the reconstruction error of every requested rank (about 4 N T r flops for
  rank r, the bytes read once for all ranks).

Where each wins
---------------
* POD / truncated SVD of rank r is the optimal rank-r approximation in Frobenius norm
  (Eckart-Young): no method storing a rank-r factorisation does better. It stores
  r (N + T) floats: U Sigma (N x r) and V (T x r).
* Exact DMD of rank r (Tu et al. 2014) constrains every time profile to a (complex)
  exponential lambda^t: it is exact for linear dynamics x_{t+1} = A x_t of rank r, extrapolates
  in time, and stores the modes plus r eigenvalues; on training trajectories (not linear
  dynamics) its error is at least POD's of the same rank.
* CMD stores per parameter a mode index and an affine map in float32 (a study stores it
  anchored: ``a``, ``level`` and the anchor's window position): 10 bytes per parameter
  whatever M is (9 for a version-1 study's a and b rounded to float32); rank-1/2 POD at
  about the same bytes is its close competitor. Compare reconstruction error against stored
  bytes, not against "number of modes". Its error at those bytes (:func:`cmd_errors`) is
  measured with the float32 model those bytes hold, not with the fit's float64 one.

Stored-bytes conventions (float32, 4 bytes per float)
-----------------------------------------------------
* CMD with M modes: ``10 N + 4 M T`` bytes: a and level as float32, a one-byte mode and a
  one-byte anchor per parameter (two bytes when M > 256 or T > 256), plus the M reference
  profiles (M T float32); the flags byte is not counted.
* POD rank r: ``r (N + T)`` floats.
* DMD rank r (effective rank r' after dropping zero singular values): ``r' (N + 1)`` floats,
  the compact real form. Atilde is real, so its eigenvalues and the modes come in conjugate
  pairs and real ones; the reconstruction Re(sum_k b_k phi_k lambda_k^t) needs, per conjugate
  pair, one complex mode with its amplitude folded in (2 N floats) and one complex eigenvalue
  (2 floats); per real eigenvalue a real mode (N floats) and the eigenvalue (1 float).
  Complex numbers count as 2 floats throughout. The naive count, every mode, eigenvalue and
  amplitude stored as a complex number, ``2 r' N + 4 r'``, is reported as
  ``stored_floats_complex``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.graph.baselines import (
    build_cmd_error_tasks,
    build_dmd_error_tasks,
    build_gram_tasks,
    combine_errors,
    combine_gram,
    gram_block_rows,
)
from pipeline.kernels.baselines import (
    DMD_RCOND,
    dmd_factors,
    dmd_model,
    eigen_tail,
    eigh_desc,
    gram_sqrt,
)
from pipeline.kernels.baselines import relative_error as _ratio
from pipeline.plan import parse_window
from pipeline.runtime import Runner, RuntimeOptions, using
from pipeline.store.trajectory import TrajectoryStore

__all__ = [
    "CMDError",
    "DMDError",
    "GramResult",
    "PODError",
    "cmd_errors",
    "dmd_errors",
    "gram",
    "gram_sqrt",
    "pod_errors",
]



# ---------------------------------------------------------------------------- results
@dataclass
class GramResult:
    """The T x T Gram matrix of a store's window and what its pass cost.

    ``gram`` is a list of rows (JSON-friendly); :attr:`matrix` gives it as a float64 array.
    """

    store: str
    cols: list[int]  # window columns (indices into the stored epochs)
    epochs: list[int]  # their epoch numbers
    gram: list[list[float]]  # G = W^T W over the finite rows, float64
    energy: float  # ||W||_F^2 = trace(G)
    n_rows: int  # finite rows (the N of the methods)
    n_nonfinite: int  # rows with a NaN/Inf in the window, left out
    n_total_rows: int
    block_rows: int
    n_blocks: int
    bytes_read: int
    seconds: float

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.gram, dtype=np.float64)

    @property
    def n_epochs(self) -> int:
        return len(self.cols)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PODError:
    """Rank-r POD (truncated SVD) of W: its optimal error and its size."""

    method: str
    rank: int  # requested
    effective_rank: int  # min(rank, T, N)
    relative_error: float | None  # ||W - W V_r V_r^T||_F / ||W||_F
    mse: float | None  # residual / (N T)
    residual: float  # ||W - W V_r V_r^T||_F^2
    stored_floats: int  # r (N + T)
    stored_bytes: int  # 4 stored_floats
    singular_value: float  # sigma_r (0 beyond the rank of W)
    seconds: float  # this call (eigh), the Gram pass excluded
    gram_seconds: float  # the shared Gram pass


@dataclass
class DMDError:
    """Rank-r exact DMD of W: its reconstruction error (measured by a pass) and its size."""

    method: str
    rank: int  # requested
    effective_rank: int  # after min(rank, T - 1) and dropping zero singular values of X1
    relative_error: float | None  # ||W - Re(Phi diag(Lambda^t) b)||_F / ||W||_F
    mse: float | None
    residual: float  # squared Frobenius error (from the pass, or the Gram when no pass)
    relative_error_gram: float | None  # the same error predicted from the Gram alone
    stored_floats: int  # r' (N + 1): compact real form (see the module docstring)
    stored_bytes: int  # 4 stored_floats
    stored_floats_complex: int  # 2 r' N + 4 r': modes, eigenvalues, amplitudes all complex
    eigenvalues_re: list[float] = field(default_factory=list)
    eigenvalues_im: list[float] = field(default_factory=list)
    amplitudes_abs: list[float] = field(default_factory=list)
    seconds: float = 0.0  # this call (small problems + the error pass, shared by its ranks)
    pass_seconds: float = 0.0  # the error pass alone (shared by the ranks of the call)
    bytes_read: int = 0  # by the error pass
    gram_seconds: float = 0.0  # the shared Gram pass


@dataclass
class CMDError:
    """A CMD study's reconstruction error at the bytes it is counted at (measured by a pass).

    ``relative_error`` is the error of the model in the float32 form that ``stored_bytes``
    counts: the study's anchored ``level + a (r_mode(t) - r_mode(anchor))`` as stored (a
    version-1 study: ``a r_mode(t) + b`` with its float64 a and b rounded to float32);
    ``relative_error_float64`` is the same pass's error of the float64 fit (refitted per row
    against its mode's reference; a version-1 study: its stored float64 a and b), the fit's
    own figure up to summation order. References are float32 data, so rounding them changes
    nothing.
    """

    method: str
    name: str  # the study
    rank: int  # M, the number of modes (the x of the Pareto chart, like POD's rank)
    n_modes: int
    relative_error: float | None  # ||W - W_float32 model||_F / ||W||_F over the finite rows
    relative_error_float64: float | None  # the same with the float64 fit
    mse: float | None  # residual / (N T), the float32 model
    residual: float  # squared Frobenius error, the float32 model
    residual_float64: float
    energy: float  # ||W||_F^2 over the finite rows of the study's window
    n_rows: int  # finite rows (the N of the byte count)
    n_nonfinite: int  # rows with a NaN/Inf in the window, left out (as the fit does)
    mode_bytes: int  # bytes of one stored mode index (1 up to 256 modes)
    stored_bytes: int  # (8 + mode_bytes + anchor_bytes) N + 4 M T
    bytes_read: int
    seconds: float  # the error pass


# ---------------------------------------------------------------------------- helpers
def _window(meta_epochs: list[int], cols: Sequence[int] | str | None) -> list[int]:
    if cols is None or isinstance(cols, str):
        try:
            return parse_window(cols, meta_epochs)
        except ValueError as e:
            raise PipelineError(str(e)) from None
    out = [int(c) for c in cols]
    if any(c < 0 or c >= len(meta_epochs) for c in out):
        raise PipelineError(f"window columns {out} out of range (0..{len(meta_epochs) - 1})")
    return out


def _compute(
    tasks: list[Any],
    desc: str,
    labels: list[str],
    run: Runner | None,
    runtime: RuntimeOptions | None,
) -> list[Any]:
    with using(run, runtime) as r:
        return r.compute(tasks, desc, labels)


# ---------------------------------------------------------------------------- Gram pass
def gram(
    url: str | os.PathLike[str],
    *,
    cols: Sequence[int] | str | None = None,
    block_rows: int | None = None,
    run: Runner | None = None,
    runtime: RuntimeOptions | None = None,
) -> GramResult:
    """One Dask pass: the float64 Gram matrix ``G = W^T W`` (T x T) of the window's columns.

    Parameters
    ----------
    url
        The trajectory store.
    cols
        Window columns (indices into the stored epochs), or a window ``START:END[:STEP]`` over
        the epoch numbers; default: every stored epoch.
    block_rows
        Rows per task (default: a divisor of the store's chunk rows whose float32 block is at
        most 16 MiB, so each byte is read once and a task's memory is its
        block: the float32 read buffer plus its float64 copy).

    Each task computes ``X_b^T X_b`` in float64 from its float32 block (products of float32
    values are exact in float64; only the sums round). Rows with a NaN/Inf anywhere in the
    window are left out and counted. Partial Grams are summed on the client in block order,
    so the result does not depend on the scheduler. Cost: N T (T + 1) flops, T^2 memory.
    """
    t0 = time.perf_counter()
    st = TrajectoryStore.open(url)
    meta = st.require_meta()
    cols_list = _window(meta.epoch_numbers, cols)
    if not cols_list:
        raise PipelineError("the window holds no epochs")
    grid = st.chunk_grid()
    rows = gram_block_rows(grid, len(cols_list), block_rows)
    tasks, labels = build_gram_tasks(grid, meta.n_rows, rows, cols_list)
    results = _compute(tasks, "gram", labels, run, runtime)
    g, n_bad, nbytes = combine_gram(results, len(cols_list))
    return GramResult(
        store=st.url,
        cols=cols_list,
        epochs=[meta.epochs[k].epoch for k in cols_list],
        gram=g.tolist(),
        energy=float(np.trace(g)),
        n_rows=meta.n_rows - n_bad,
        n_nonfinite=n_bad,
        n_total_rows=meta.n_rows,
        block_rows=rows,
        n_blocks=len(tasks),
        bytes_read=nbytes,
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------- POD
def pod_errors(g: GramResult, ranks: Sequence[int]) -> list[dict[str, Any]]:
    """Rank-r POD / truncated SVD errors of W from its Gram matrix, without another pass.

    ``W = U Sigma V^T``; ``G = V Sigma^2 V^T``, so ``eigh(G)`` (sorted descending, tiny
    negative eigenvalues clipped to 0) gives V and sigma^2. The optimal rank-r reconstruction
    ``W V_r V_r^T`` (Eckart-Young) has squared error ``sum_{k > r} sigma_k^2``: the tail of
    the eigenvalues, summed directly (``energy - sum of the top r`` would cancel
    catastrophically when the error is small). Accuracy: float64 eigenvalues of G carry an
    absolute error of about T 1e-16 lambda_max, so the squared error is known to about
    T 1e-16 ||W||_F^2 (a relative-error floor near sqrt(T 1e-16) ~ 1e-7).

    Returns one :class:`PODError` (as a dict) per rank; ``stored_floats = r (N + T)`` for
    U Sigma (N x r) and V (T x r), with r the effective rank ``min(rank, T, N)``.
    """
    t0 = time.perf_counter()
    lam, _vec = eigh_desc(g.matrix)
    t = g.n_epochs
    n = g.n_rows
    tail = eigen_tail(lam)  # tail[r] = sum_{k >= r} lam_k
    dt = time.perf_counter() - t0
    out = []
    for r in ranks:
        if r < 1:
            raise PipelineError(f"POD rank must be at least 1, got {r}")
        re = min(int(r), t, n)
        res = float(tail[re])
        out.append(
            asdict(
                PODError(
                    method="POD",
                    rank=int(r),
                    effective_rank=re,
                    relative_error=_ratio(res, g.energy),
                    mse=res / (n * t) if n > 0 else None,
                    residual=res,
                    stored_floats=re * (n + t),
                    stored_bytes=4 * re * (n + t),
                    singular_value=float(math.sqrt(lam[re - 1])) if re >= 1 else 0.0,
                    seconds=dt,
                    gram_seconds=g.seconds,
                )
            )
        )
    return out


# ---------------------------------------------------------------------------- CMD
def cmd_errors(
    url: str | os.PathLike[str],
    name: str,
    *,
    block_rows: int | None = None,
    run: Runner | None = None,
    runtime: RuntimeOptions | None = None,
) -> dict[str, Any]:
    """The reconstruction error of the CMD study ``name`` at the bytes it is counted at.

    One Dask pass over the row blocks (the study's blocks unless ``block_rows``) reads the
    study's window of W and the rows' model, and sums per block the squared error of the
    model twice: in the stored float32 form (the bytes of the stored-bytes count:
    ``relative_error``), and with the float64 fit (``relative_error_float64``, the fit's own
    error up to summation order; see :class:`CMDError`). Rows with a
    NaN/Inf in the window are left out, as the fit leaves them out of its error. The
    reconstruction is computed in float64 from the float32 rows. Cost: one read of the
    window, about 6 N T flops.

    Returns a :class:`CMDError` as a dict.
    """
    from pipeline.store.analysis import complete_study

    t0 = time.perf_counter()
    st = TrajectoryStore.open(url)
    meta = st.require_meta()
    ag, _attrs = complete_study(st, name)
    layout = ag.layout()
    epochs = [int(e) for e in np.asarray(ag.array("epochs")[...])]
    cols = np.asarray([meta.column_of(e) for e in epochs], dtype=np.int64)
    refs = np.asarray(ag.array("refs")[...], dtype=np.float64)
    # the references are rows of the float32 trajectory: rounding them to float32 is exact,
    # and keeps the model what the float32 storage holds if they ever are not
    refs = refs.astype(np.float32).astype(np.float64)
    mode_arr = ag.array("mode")
    mode_bytes = int(np.dtype(mode_arr.dtype).itemsize)
    anchor_bytes = int(np.dtype(ag.array("anchor").dtype).itemsize) if layout.anchored else 0
    rows = block_rows or int(mode_arr.chunks[0])
    if rows < 1:
        raise PipelineError("block_rows must be at least 1")
    grid = st.chunk_grid()
    tasks, labels = build_cmd_error_tasks(
        grid, st.url, name, meta.n_rows, rows, cols, refs, layout
    )
    results = _compute(tasks, f"cmd error {name}", labels, run, runtime)
    sums, n_bad, nbytes = combine_errors(results, 3)
    res32, res64, energy = (float(v) for v in sums)
    n = meta.n_rows - n_bad
    m, t = refs.shape
    return asdict(
        CMDError(
            method="CMD",
            name=name,
            rank=m,
            n_modes=m,
            relative_error=_ratio(res32, energy),
            relative_error_float64=_ratio(res64, energy),
            mse=res32 / (n * t) if n > 0 else None,
            residual=res32,
            residual_float64=res64,
            energy=energy,
            n_rows=n,
            n_nonfinite=n_bad,
            mode_bytes=mode_bytes,
            stored_bytes=(8 + mode_bytes + anchor_bytes) * n + 4 * m * t,
            bytes_read=nbytes,
            seconds=time.perf_counter() - t0,
        )
    )


# ---------------------------------------------------------------------------- DMD
def dmd_errors(
    url: str | os.PathLike[str],
    g: GramResult,
    ranks: Sequence[int],
    *,
    cols: Sequence[int] | str | None = None,
    block_rows: int | None = None,
    rcond: float = DMD_RCOND,
    error_pass: bool = True,
    run: Runner | None = None,
    runtime: RuntimeOptions | None = None,
) -> list[dict[str, Any]]:
    """Rank-r exact DMD (Tu et al. 2014) of W, out of core, and its reconstruction error.

    Snapshots X1 = W[:, :-1], X2 = W[:, 1:] (the window's columns in order). Everything r x r
    comes from the Gram ``g`` (see :func:`pipeline.kernels.baselines.dmd_model`); the reconstruction is
    ``x_t = Re(Phi diag(Lambda^t) b)``, t = 0..T-1. Ranks are capped at T - 1, and singular
    values of X1 with sigma^2 <= ``rcond`` sigma_1^2 are dropped (``effective_rank``).

    Then ONE more Dask pass over the row blocks (the Gram's blocks unless ``block_rows``)
    measures ``||W - recon||_F^2`` for every requested rank at once, each byte read once:
    per block, ``Phi_block = X2_block V S^-1 W_e`` and ``Re(Phi_block (b Lambda^t))`` are
    folded into real products ``X2_block A B`` with ``A B = Re(M D)`` (see
    :func:`pipeline.kernels.baselines.dmd_block_errors`), in float64 from the float32 rows. ``relative_error_gram`` is the same
    error predicted from the Gram alone (exact in exact arithmetic; its squared error is
    only known to about T 1e-16 ||W||_F^2); with ``error_pass=False`` no pass is made and it
    is the reported error.

    Returns one :class:`DMDError` (as a dict) per rank; stored floats ``r' (N + 1)`` in the
    compact real form, ``2 r' N + 4 r'`` as plain complex arrays (module docstring).
    """
    t0 = time.perf_counter()
    st = TrajectoryStore.open(url)
    meta = st.require_meta()
    cols_list = g.cols if cols is None else _window(meta.epoch_numbers, cols)
    if cols_list != g.cols:
        raise PipelineError(f"the Gram was computed on columns {g.cols}, not {cols_list}")
    t = g.n_epochs
    if t < 2:
        raise PipelineError("DMD needs at least 2 epochs in the window")
    for r in ranks:
        if r < 1:
            raise PipelineError(f"DMD rank must be at least 1, got {r}")
    gm = g.matrix
    lsq = gram_sqrt(gm)
    models = [dmd_model(gm, lsq, int(r), rcond) for r in ranks]
    residuals = np.array([m.residual_gram for m in models])
    nbytes = 0
    t_pass = 0.0
    if error_pass and models:
        tp = time.perf_counter()
        grid = st.chunk_grid()
        rows = block_rows or g.block_rows
        at, bt, offsets = dmd_factors(models)
        tasks, labels = build_dmd_error_tasks(grid, meta.n_rows, rows, cols_list, at, bt, offsets)
        results = _compute(tasks, "dmd error", labels, run, runtime)
        residuals = np.zeros(len(models))
        for part, nb in results:
            residuals += part
            nbytes += int(nb)
        t_pass = time.perf_counter() - tp
    dt = time.perf_counter() - t0
    n = g.n_rows
    out = []
    for m, res in zip(models, residuals.tolist(), strict=True):
        re = m.effective_rank
        out.append(
            asdict(
                DMDError(
                    method="DMD",
                    rank=m.rank,
                    effective_rank=re,
                    relative_error=_ratio(res, g.energy),
                    mse=res / (n * t) if n > 0 else None,
                    residual=float(res),
                    relative_error_gram=_ratio(m.residual_gram, g.energy),
                    stored_floats=re * (n + 1),
                    stored_bytes=4 * re * (n + 1),
                    stored_floats_complex=2 * re * n + 4 * re,
                    eigenvalues_re=m.lam.real.tolist(),
                    eigenvalues_im=m.lam.imag.tolist(),
                    amplitudes_abs=np.abs(m.b).tolist(),
                    seconds=dt,
                    pass_seconds=t_pass,
                    bytes_read=nbytes,
                    gram_seconds=g.seconds,
                )
            )
        )
    return out

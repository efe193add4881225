"""Out-of-core baselines for CMD on a trajectory store W (N x T float32): POD and exact DMD.

Both baselines are built on the T x T Gram matrix ``G = W^T W`` of the window's columns,
accumulated in float64 by one Dask pass over the row blocks (:func:`gram`): each task reads
its rows once, at the window's epochs, and returns its partial ``X_b^T X_b``; the client sums
them. Rows holding a NaN/Inf anywhere in the window are left out of every method (counted in
:attr:`GramResult.n_nonfinite`); ``N`` below is the number of finite rows.

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
* CMD stores per parameter a mode index and an affine map (a, b): 9 bytes per parameter
  whatever M is; rank-1/2 POD at about the same bytes is its close competitor. Compare
  reconstruction error against stored bytes, not against "number of modes". Its error at
  those bytes (:func:`cmd_errors`) is measured with a and b rounded to float32, what the
  9 bytes hold, not with the study's float64 a and b.

Stored-bytes conventions (float32, 4 bytes per float)
-----------------------------------------------------
* CMD with M modes: ``9 N + 4 M T`` bytes: a and b as float32 and a one-byte mode per
  parameter, plus the M reference profiles (M T float32).
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
from dask import delayed

from pipeline.buffers import scratch
from pipeline.config import FIT_BLOCK_BYTES
from pipeline.errors import PipelineError
from pipeline.plan import blocks, fit_block_rows, parse_window
from pipeline.runtime import Runner, RuntimeOptions, using
from pipeline.store.trajectory import ChunkGrid, TrajectoryStore

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

#: eigenvalues of X1^T X1 at or below ``DMD_RCOND`` times the largest are dropped (singular
#: values below 1e-6 of the largest): the Gram squares the singular values, and float64
#: eigenvalues of a T x T Gram carry an absolute error of about T 1e-16 lambda_max
DMD_RCOND = 1e-12


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

    ``relative_error`` is the error of ``a r_mode(t) + b`` with a and b rounded to float32,
    the stored form that ``stored_bytes`` counts; ``relative_error_float64`` is the same
    pass's error with the study's float64 a and b (the fit's own figure, up to summation
    order). References are float32 data, so rounding them changes nothing.
    """

    method: str
    name: str  # the study
    rank: int  # M, the number of modes (the x of the Pareto chart, like POD's rank)
    n_modes: int
    relative_error: float | None  # ||W - (a32 r + b32)||_F / ||W||_F over the finite rows
    relative_error_float64: float | None  # the same with float64 a and b
    mse: float | None  # residual / (N T), float32 a and b
    residual: float  # squared Frobenius error, float32 a and b
    residual_float64: float
    energy: float  # ||W||_F^2 over the finite rows of the study's window
    n_rows: int  # finite rows (the N of the byte count)
    n_nonfinite: int  # rows with a NaN/Inf in the window, left out (as the fit does)
    mode_bytes: int  # bytes of one stored mode index (1 up to 256 modes)
    stored_bytes: int  # (8 + mode_bytes) N + 4 M T
    bytes_read: int
    seconds: float  # the error pass


# ---------------------------------------------------------------------------- tasks
def _read_block64(
    grid: ChunkGrid, r0: int, r1: int, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows ``[r0, r1)`` at ``cols`` as a time-major float64 (T, rows) buffer (the task's
    reused scratch), rows with a NaN/Inf zeroed; which rows those are (a boolean mask), the
    bytes read."""
    rows, t = r1 - r0, len(cols)
    x = scratch("baseline-block", t * rows).reshape(t, rows)
    nbytes = grid.read_rows(r0, r1, cols, x)
    x64 = scratch("baseline-block64", t * rows, np.float64).reshape(t, rows)
    np.copyto(x64, x)
    # a sum of T finite float32 values stays finite in float64; NaN/Inf propagate
    bad = ~np.isfinite(x64.sum(axis=0))
    if bad.any():
        x64[:, bad] = 0.0
    return x64, bad, nbytes


def gram_task(grid: ChunkGrid, r0: int, r1: int, cols: np.ndarray) -> tuple[np.ndarray, int, int]:
    """One block's float64 partial Gram ``X_b^T X_b`` (T x T) over its finite rows, the number
    of rows left out, the bytes read."""
    x64, bad, nbytes = _read_block64(grid, r0, r1, cols)
    return x64 @ x64.T, int(np.count_nonzero(bad)), nbytes


def cmd_error_task(
    grid: ChunkGrid,
    url: str,
    study: str,
    r0: int,
    r1: int,
    cols: np.ndarray,
    refs: np.ndarray,
) -> tuple[np.ndarray, int, int]:
    """One block's squared CMD errors ``[float32 a and b, float64 a and b, ||X||^2]`` over its
    finite rows, the number of rows left out, the bytes read.

    ``study`` is the path of the study's group in the store ``url`` (its ``mode``, ``a``,
    ``b`` are read for the block's rows, read-only), ``refs`` the (M, T) float64 references.
    The reconstruction ``a r_mode(t) + b`` is computed in float64 per cache-sized sub-block
    of rows.
    """
    import zarr

    x64, bad, nbytes = _read_block64(grid, r0, r1, cols)
    t, rows = x64.shape

    def per_row(name: str) -> np.ndarray:
        return np.asarray(zarr.open_array(url, path=f"{study}/{name}", mode="r")[r0:r1])

    mode = per_row("mode").astype(np.int64)
    a64 = per_row("a").astype(np.float64)
    b64 = per_row("b").astype(np.float64)
    # NaN/Inf rows: zeroed data and a zero model give no error (they are left out)
    a64[bad] = 0.0
    b64[bad] = 0.0
    mode[bad] = 0
    coeffs = (
        (a64.astype(np.float32).astype(np.float64), b64.astype(np.float32).astype(np.float64)),
        (a64, b64),
    )
    out = np.zeros(3)
    out[2] = float(np.einsum("ij,ij->", x64, x64))
    sub = min(_SUB_ROWS, rows)
    r_buf = scratch("baseline-recon", t * sub, np.float64)
    for s0 in range(0, rows, sub):
        s1 = min(s0 + sub, rows)
        xs = x64[:, s0:s1]
        prof = refs[mode[s0:s1]].T  # (T, m)
        recon = r_buf[: t * (s1 - s0)].reshape(t, s1 - s0)
        for k, (a, b) in enumerate(coeffs):
            np.multiply(prof, a[None, s0:s1], out=recon)
            recon += b[None, s0:s1]
            recon -= xs
            flat = recon.reshape(-1)
            out[k] += float(np.dot(flat, flat))
    return out, int(np.count_nonzero(bad)), nbytes


#: rows per cache-sized sub-block of the DMD error task (T x 4096 float64 = 1.6 MB at T = 50)
_SUB_ROWS = 4096


def dmd_error_task(
    grid: ChunkGrid,
    r0: int,
    r1: int,
    cols: np.ndarray,
    at: np.ndarray,
    bt: np.ndarray,
    offsets: tuple[int, ...],
) -> tuple[np.ndarray, int]:
    """Squared reconstruction errors of one block for every rank, and the bytes read.

    The reconstruction of rank i is ``Re(Phi_block diag(lambda^t) b) = X2_block K_i`` with the
    real ``K_i = Re(M_i D_i)`` ((T-1) x T, X2 being real), and ``K_i = A_i B_i`` is its
    numerical-rank factorisation (at most 2 r columns, r for conjugate-symmetric amplitudes).
    ``at`` stacks every rank's ``A_i^T`` (Q x T-1), ``bt`` every ``B_i^T`` (T x Q); rank i
    owns columns ``offsets[i]:offsets[i+1]``. Per cache-sized sub-block of rows: one product
    ``Z = A^T X2^T`` for all ranks, then per rank ``B_i^T Z_i - X^T`` and its squared norm
    (4 T r flops per row and rank instead of 2 T^2 for the product with K).
    """
    x64, _bad, nbytes = _read_block64(grid, r0, r1, cols)
    t, rows = x64.shape
    n_ranks = len(offsets) - 1
    out = np.zeros(n_ranks)
    sub = min(_SUB_ROWS, rows)
    xs_buf = scratch("baseline-sub", t * sub, np.float64)
    z_buf = scratch("baseline-z", max(at.shape[0], 1) * sub, np.float64)
    r_buf = scratch("baseline-recon", t * sub, np.float64)
    for s0 in range(0, rows, sub):
        m = min(sub, rows - s0)
        xs = xs_buf[: t * m].reshape(t, m)
        np.copyto(xs, x64[:, s0 : s0 + m])
        z = z_buf[: at.shape[0] * m].reshape(at.shape[0], m)
        np.matmul(at, xs[1:], out=z)
        recon = r_buf[: t * m].reshape(t, m)
        for i in range(n_ranks):
            lo, hi = offsets[i], offsets[i + 1]
            if hi > lo:
                np.matmul(bt[:, lo:hi], z[lo:hi], out=recon)
                recon -= xs  # finite-row errors; zeroed NaN/Inf rows give 0 - 0
            else:
                np.negative(xs, out=recon)
            flat = recon.reshape(-1)
            out[i] += float(np.dot(flat, flat))
    return out, nbytes


def _factor(k: np.ndarray, tol: float = 1e-15) -> tuple[np.ndarray, np.ndarray]:
    """``K = A B`` at K's numerical rank: ``A^T`` (q x T-1) and ``B^T`` (T x q) from the SVD,
    singular values below ``tol`` times the largest dropped (changing the product by at most
    about ``tol ||K||`` per dropped value)."""
    if not np.any(k):
        return np.zeros((0, k.shape[0])), np.zeros((k.shape[1], 0))
    u, s, vh = np.linalg.svd(k, full_matrices=False)
    q = int(np.count_nonzero(s > tol * s[0]))
    return np.ascontiguousarray((u[:, :q] * s[None, :q]).T), np.ascontiguousarray(vh[:q].T)


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


def _ratio(num: float, den: float) -> float | None:
    return math.sqrt(max(num, 0.0) / den) if den > 0 else None


def _block_rows(grid: ChunkGrid, n_cols: int, block_rows: int | None) -> int:
    if block_rows is not None:
        if block_rows < 1:
            raise PipelineError("block_rows must be at least 1")
        return block_rows
    return fit_block_rows(
        grid.chunk_rows, n_cols, raw=grid.local_root is not None, target_bytes=FIT_BLOCK_BYTES
    )


def _eigh_desc(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, tiny negatives clipped to 0) and eigenvectors of symmetric a."""
    lam, vec = np.linalg.eigh((a + a.T) / 2)
    order = np.argsort(lam)[::-1]
    return np.clip(lam[order], 0.0, None), vec[:, order]


def gram_sqrt(g: np.ndarray) -> np.ndarray:
    """A T x T ``L`` with ``L^T L = G`` (``diag(sqrt(lambda)) V^T`` from ``eigh``).

    For any coefficient matrix C, ``||W C||_F = ||L C||_F``: least-squares problems and error
    norms of W's column space are solved on L (T rows) at the condition number of W, not of
    its square.
    """
    lam, vec = _eigh_desc(g)
    return np.sqrt(lam)[:, None] * vec.T


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
        most 16 MiB, as the fit does, so each byte is read once and a task's memory is its
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
    rows = _block_rows(grid, len(cols_list), block_rows)
    c = np.asarray(cols_list, dtype=np.int64)
    cols_d = delayed(c, traverse=False)
    spans = list(blocks(meta.n_rows, rows))
    tasks = [
        delayed(gram_task, pure=False)(grid, r0, r1, cols_d, dask_key_name=f"gram-{i}")
        for i, (r0, r1) in enumerate(spans)
    ]
    labels = [f"gram block {i}: rows {r0}-{r1}" for i, (r0, r1) in enumerate(spans)]
    results = _compute(tasks, "gram", labels, run, runtime)
    t = len(cols_list)
    g = np.zeros((t, t))
    n_bad = 0
    nbytes = 0
    for part, bad, nb in results:
        g += part
        n_bad += int(bad)
        nbytes += int(nb)
    g = (g + g.T) / 2  # exactly symmetric
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
        n_blocks=len(spans),
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
    lam, _vec = _eigh_desc(g.matrix)
    t = g.n_epochs
    n = g.n_rows
    tail = np.concatenate([np.cumsum(lam[::-1])[::-1], [0.0]])  # tail[r] = sum_{k >= r} lam_k
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
    study's window of W and the rows' mode, a and b, and sums per block the squared error
    of ``a r_mode(t) + b`` twice: with a and b rounded to float32 (the 9 bytes per parameter
    of the stored-bytes count: ``relative_error``), and with the study's float64 a and b
    (``relative_error_float64``, the fit's own error up to summation order). Rows with a
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
    epochs = [int(e) for e in np.asarray(ag.array("epochs")[...])]
    cols = np.asarray([meta.column_of(e) for e in epochs], dtype=np.int64)
    refs = np.asarray(ag.array("refs")[...], dtype=np.float64)
    # the references are rows of the float32 trajectory: rounding them to float32 is exact,
    # and keeps the model what the float32 storage holds if they ever are not
    refs = refs.astype(np.float32).astype(np.float64)
    mode_arr = ag.array("mode")
    mode_bytes = int(np.dtype(mode_arr.dtype).itemsize)
    rows = block_rows or int(mode_arr.chunks[0])
    if rows < 1:
        raise PipelineError("block_rows must be at least 1")
    grid = st.chunk_grid()
    cols_d = delayed(cols, traverse=False)
    refs_d = delayed(refs, traverse=False)
    spans = list(blocks(meta.n_rows, rows))
    tasks = [
        delayed(cmd_error_task, pure=False)(
            grid, st.url, ag.path, r0, r1, cols_d, refs_d, dask_key_name=f"cmd-error-{i}"
        )
        for i, (r0, r1) in enumerate(spans)
    ]
    labels = [f"cmd error block {i}: rows {r0}-{r1}" for i, (r0, r1) in enumerate(spans)]
    results = _compute(tasks, f"cmd error {name}", labels, run, runtime)
    sums = np.zeros(3)
    n_bad = 0
    nbytes = 0
    for part, bad, nb in results:
        sums += part
        n_bad += int(bad)
        nbytes += int(nb)
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
            stored_bytes=(8 + mode_bytes) * n + 4 * m * t,
            bytes_read=nbytes,
            seconds=time.perf_counter() - t0,
        )
    )


# ---------------------------------------------------------------------------- DMD
@dataclass
class _DMDModel:
    rank: int
    effective_rank: int
    lam: np.ndarray  # (r,) complex eigenvalues
    b: np.ndarray  # (r,) complex amplitudes
    k: np.ndarray  # (T-1, T) real: reconstruction = X2 @ k
    residual_gram: float


def _dmd_model(g: np.ndarray, lsq: np.ndarray, rank: int, rcond: float) -> _DMDModel:
    """Exact DMD of rank ``rank`` from the Gram G (T x T) and its square root ``lsq``.

    X1 = W[:, :-1] = U S V^T: V, S^2 from eigh(X1^T X1 = G[:-1, :-1]), zero singular values
    dropped; Atilde = U^T X2 V S^-1 = S^-1 V^T (X1^T X2) V S^-1 with X1^T X2 = G[:-1, 1:];
    eig(Atilde) = (Lambda, W_e); modes Phi = X2 M, M = V S^-1 W_e ((T-1) x r). The
    amplitudes b = argmin ||Phi b - x_0|| = argmin ||W (E2 M b - e_0)||, solved on L
    (L^T L = G) as lstsq(L[:, 1:] M, L[:, 0]): the normal equations (Phi^H Phi =
    M^H G[1:, 1:] M, Phi^H x_0 = M^H G[1:, 0]) in a form that does not square Phi's
    condition number. Reconstruction x_t = Phi diag(Lambda^t) b, so Re(recon) = X2 K with
    K = Re(M D), D = b Lambda^t (r x T); its squared error is ||L (I - E2 K)||_F^2.
    """
    t = g.shape[0]
    lam1, v1 = _eigh_desc(g[:-1, :-1])
    ok = int(np.count_nonzero(lam1 > rcond * lam1[0])) if lam1[0] > 0 else 0
    r = min(rank, t - 1, ok)
    if r == 0:
        k = np.zeros((t - 1, t))
        return _DMDModel(
            rank, 0, np.zeros(0, complex), np.zeros(0, complex), k, float(np.sum(lsq**2))
        )
    v = v1[:, :r]
    s = np.sqrt(lam1[:r])
    atilde = (v.T @ g[:-1, 1:] @ v) / s[:, None] / s[None, :]
    lam, we = np.linalg.eig(atilde)
    m = (v / s[None, :]) @ we  # (T-1, r)
    b = np.linalg.lstsq(lsq[:, 1:] @ m, lsq[:, 0].astype(complex), rcond=None)[0]
    d = b[:, None] * lam[:, None] ** np.arange(t)[None, :]
    k = (m @ d).real
    p = np.eye(t)
    p[1:, :] -= k
    lp = lsq @ p
    return _DMDModel(rank, r, lam, b, k, float(np.sum(lp * lp)))


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
    comes from the Gram ``g`` (see :func:`_dmd_model`); the reconstruction is
    ``x_t = Re(Phi diag(Lambda^t) b)``, t = 0..T-1. Ranks are capped at T - 1, and singular
    values of X1 with sigma^2 <= ``rcond`` sigma_1^2 are dropped (``effective_rank``).

    Then ONE more Dask pass over the row blocks (the Gram's blocks unless ``block_rows``)
    measures ``||W - recon||_F^2`` for every requested rank at once, each byte read once:
    per block, ``Phi_block = X2_block V S^-1 W_e`` and ``Re(Phi_block (b Lambda^t))`` are
    folded into real products ``X2_block A B`` with ``A B = Re(M D)`` (see
    :func:`dmd_error_task`), in float64 from the float32 rows. ``relative_error_gram`` is the same
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
    models = [_dmd_model(gm, lsq, int(r), rcond) for r in ranks]
    residuals = np.array([m.residual_gram for m in models])
    nbytes = 0
    t_pass = 0.0
    if error_pass and models:
        tp = time.perf_counter()
        grid = st.chunk_grid()
        rows = block_rows or g.block_rows
        c = np.asarray(cols_list, dtype=np.int64)
        factors = [_factor(m.k) for m in models]
        offsets = tuple(int(o) for o in np.cumsum([0] + [f[0].shape[0] for f in factors]))
        at = np.ascontiguousarray(np.concatenate([f[0] for f in factors]))  # (Q, T-1)
        bt = np.ascontiguousarray(np.concatenate([f[1] for f in factors], axis=1))  # (T, Q)
        cols_d = delayed(c, traverse=False)
        at_d = delayed(at, traverse=False)
        bt_d = delayed(bt, traverse=False)
        spans = list(blocks(meta.n_rows, rows))
        tasks = [
            delayed(dmd_error_task, pure=False)(
                grid, r0, r1, cols_d, at_d, bt_d, offsets, dask_key_name=f"dmd-error-{i}"
            )
            for i, (r0, r1) in enumerate(spans)
        ]
        labels = [f"dmd error block {i}: rows {r0}-{r1}" for i, (r0, r1) in enumerate(spans)]
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

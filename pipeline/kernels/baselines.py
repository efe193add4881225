"""Per-block and Gram-level math of the POD and exact-DMD baselines (and of CMD's error at its
stored bytes): arrays in, arrays out. No dask, no I/O.

Two kinds of function live here:

* **per row block** (numpy or cupy, by the input's type; the time-major float64 block is a
  (T, rows) array): :func:`zero_nonfinite`, :func:`partial_gram`, :func:`cmd_block_errors`,
  :func:`dmd_block_errors`. Their partial results (a T x T Gram, squared error sums) are
  summed over blocks by the caller.
* **on the T x T Gram** ``G = W^T W`` (small, numpy on the host): :func:`eigh_desc`,
  :func:`gram_sqrt`, :func:`eigen_tail` (POD / truncated-SVD errors), :func:`dmd_model` and
  :func:`dmd_factors` (exact DMD of rank r and its reconstruction operator in the factored
  form the error pass uses), :func:`relative_error`.

The conventions (what is stored, what each error means) are documented with the benchmark
suite that reports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.compat import namespace

__all__ = [
    "DMD_RCOND",
    "SUB_ROWS",
    "Buffers",
    "DMDModel",
    "cmd_block_errors",
    "dmd_block_errors",
    "dmd_factors",
    "dmd_model",
    "eigen_tail",
    "eigh_desc",
    "factor",
    "gram_sqrt",
    "partial_gram",
    "relative_error",
    "zero_nonfinite",
]

#: eigenvalues of X1^T X1 at or below ``DMD_RCOND`` times the largest are dropped (singular
#: values below 1e-6 of the largest): the Gram squares the singular values, and float64
#: eigenvalues of a T x T Gram carry an absolute error of about T 1e-16 lambda_max
DMD_RCOND = 1e-12

#: rows per cache-sized sub-block of the error kernels (T x 4096 float64 = 1.6 MB at T = 50)
SUB_ROWS = 4096

#: ``(key, n) -> a 1-D float64 array of n elements`` (contents undefined): where the error
#: kernels take their work buffers from (default: fresh arrays of the input's module)
Buffers = Callable[[str, int], Any]


def _fresh(xp: Any) -> Buffers:
    def get(_key: str, n: int) -> Any:
        return xp.empty(max(n, 1), dtype=xp.float64)[:n]

    return get


# ---------------------------------------------------------------------------- per block
def zero_nonfinite(x: Any) -> Any:
    """Zero, in place, the columns (rows of W) of the (T, rows) float64 block ``x`` that hold a
    NaN/Inf; return which (a boolean mask over the block's rows).

    A sum of T finite float32 values stays finite in float64; NaN/Inf propagate.

    >>> import numpy as np
    >>> x = np.array([[1.0, np.nan], [2.0, 3.0]])
    >>> zero_nonfinite(x).tolist(), x.tolist()
    ([False, True], [[1.0, 0.0], [2.0, 0.0]])
    """
    xp = namespace(x)
    bad = ~xp.isfinite(x.sum(axis=0))
    if bad.any():
        x[:, bad] = 0.0
    return bad


def partial_gram(x: Any) -> Any:
    """A block's partial Gram ``X_b^T X_b`` (T x T) from its time-major (T, rows) block."""
    return x @ x.T


def cmd_block_errors(
    x: Any,
    bad: Any,
    mode: Any,
    a: Any,
    b: Any,
    refs: Any,
    *,
    anchor: Any = None,
    sub_rows: int = SUB_ROWS,
    buffers: Buffers | None = None,
) -> np.ndarray:
    """Squared CMD errors of one block: ``[stored float32 form, float64 fit, ||X||^2]``.

    ``x`` is the (T, rows) float64 block with its NaN/Inf rows (``bad``) zeroed; ``mode``,
    ``a``, ``b`` the rows' mode index and affine map; ``refs`` the (M, T) float64 references.
    Rows in ``bad`` get a zero model, so they add no error. The reconstructions are computed
    in float64 per cache-sized sub-block of ``sub_rows`` rows.

    Without ``anchor`` (a version-1 study: float64 ``a`` and intercept ``b``), the model
    ``a r_mode(t) + b`` once with a and b rounded to float32 and once as given. With
    ``anchor`` (a study's anchored float32 form: ``b`` is the fitted value at the window
    position ``anchor``), the stored model ``b + a (r_mode(t) - r_mode(anchor))`` as given,
    and the float64 least-squares line of each row against its mode's reference, refitted
    from the block (what the fit computed before rounding, up to summation order).
    """
    xp = namespace(x)
    get = buffers or _fresh(xp)
    t, rows = x.shape
    mode = xp.where(bad, 0, xp.asarray(mode, dtype=xp.int64))
    a64 = xp.where(bad, 0.0, xp.asarray(a, dtype=xp.float64))
    b64 = xp.where(bad, 0.0, xp.asarray(b, dtype=xp.float64))
    out = np.zeros(3)
    out[2] = float(xp.einsum("ij,ij->", x, x))
    sub = min(sub_rows, rows)
    r_buf = get("baseline-recon", t * sub)
    if anchor is not None:
        at = xp.where(bad, 0, xp.asarray(anchor, dtype=xp.int64))
        rmean = refs.mean(axis=1)
        rc = refs - rmean[:, None]
        ssr = (rc * rc).sum(axis=1)
    for s0 in range(0, rows, sub):
        s1 = min(s0 + sub, rows)
        xs = x[:, s0:s1]
        ms = mode[s0:s1]
        recon = r_buf[: t * (s1 - s0)].reshape(t, s1 - s0)
        if anchor is None:
            prof = refs[ms].T  # (T, m)
            forms = [
                (a64[s0:s1].astype(xp.float32).astype(xp.float64), prof, b64[s0:s1].astype(xp.float32).astype(xp.float64)),
                (a64[s0:s1], prof, b64[s0:s1]),
            ]
        else:
            # stored: level + a (r - r(anchor)); float64: mean + a64 (r - mean r), refitted
            moved = refs[ms].T - refs[ms, at[s0:s1]][None, :]
            centred = rc[ms].T
            mean = xs.mean(axis=0)
            fit_a = ((xs - mean[None, :]) * centred).sum(axis=0) / ssr[ms]
            forms = [(a64[s0:s1], moved, b64[s0:s1]), (fit_a, centred, mean)]
        for k, (ak, prof_k, bk) in enumerate(forms):
            xp.multiply(prof_k, ak[None, :], out=recon)
            recon += bk[None, :]
            recon -= xs
            flat = recon.reshape(-1)
            out[k] += float(xp.einsum("i,i->", flat, flat))  # not BLAS: thread-independent bits
    return out


def dmd_block_errors(
    x: Any,
    at: Any,
    bt: Any,
    offsets: Sequence[int],
    *,
    sub_rows: int = SUB_ROWS,
    buffers: Buffers | None = None,
) -> np.ndarray:
    """Squared DMD reconstruction errors of one (T, rows) float64 block, one per rank.

    The reconstruction of rank i is ``X2_block K_i`` with ``K_i = A_i B_i`` (see
    :func:`dmd_factors`): ``at`` stacks every rank's ``A_i^T`` (Q x T-1), ``bt`` every
    ``B_i^T`` (T x Q); rank i owns columns ``offsets[i]:offsets[i+1]``. Per cache-sized
    sub-block of rows: one product ``Z = A^T X2^T`` for all ranks, then per rank
    ``B_i^T Z_i - X^T`` and its squared norm (4 T r flops per row and rank instead of
    2 T^2 for the product with K). Zeroed NaN/Inf rows give ``0 - 0``.
    """
    xp = namespace(x)
    get = buffers or _fresh(xp)
    t, rows = x.shape
    n_ranks = len(offsets) - 1
    out = np.zeros(n_ranks)
    sub = min(sub_rows, rows)
    xs_buf = get("baseline-sub", t * sub)
    z_buf = get("baseline-z", max(at.shape[0], 1) * sub)
    r_buf = get("baseline-recon", t * sub)
    for s0 in range(0, rows, sub):
        m = min(sub, rows - s0)
        xs = xs_buf[: t * m].reshape(t, m)
        xp.copyto(xs, x[:, s0 : s0 + m])
        z = z_buf[: at.shape[0] * m].reshape(at.shape[0], m)
        xp.matmul(at, xs[1:], out=z)
        recon = r_buf[: t * m].reshape(t, m)
        for i in range(n_ranks):
            lo, hi = offsets[i], offsets[i + 1]
            if hi > lo:
                xp.matmul(bt[:, lo:hi], z[lo:hi], out=recon)
                recon -= xs
            else:
                xp.negative(xs, out=recon)
            flat = recon.reshape(-1)
            out[i] += float(xp.einsum("i,i->", flat, flat))  # not BLAS: thread-independent bits
    return out


# ---------------------------------------------------------------------------- on the Gram
def relative_error(residual: float, energy: float) -> float | None:
    """``sqrt(residual / energy)`` (a negative residual clipped to 0); None when energy is 0.

    >>> relative_error(1.0, 4.0), relative_error(1.0, 0.0)
    (0.5, None)
    """
    return math.sqrt(max(residual, 0.0) / energy) if energy > 0 else None


def eigh_desc(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, tiny negatives clipped to 0) and eigenvectors of symmetric a.

    >>> lam, _ = eigh_desc(np.diag([1.0, 3.0, -1e-18]))
    >>> lam.tolist()
    [3.0, 1.0, 0.0]
    """
    lam, vec = np.linalg.eigh((a + a.T) / 2)
    order = np.argsort(lam)[::-1]
    return np.clip(lam[order], 0.0, None), vec[:, order]


def gram_sqrt(g: np.ndarray) -> np.ndarray:
    """A T x T ``L`` with ``L^T L = G`` (``diag(sqrt(lambda)) V^T`` from ``eigh``).

    For any coefficient matrix C, ``||W C||_F = ||L C||_F``: least-squares problems and error
    norms of W's column space are solved on L (T rows) at the condition number of W, not of
    its square.
    """
    lam, vec = eigh_desc(g)
    return np.sqrt(lam)[:, None] * vec.T


def eigen_tail(lam: np.ndarray) -> np.ndarray:
    """``tail[r] = sum_{k >= r} lam_k`` for r = 0..T (``tail[T] = 0``), of eigenvalues sorted
    descending: the squared error of the rank-r POD / truncated SVD (Eckart-Young), summed
    directly (``energy - sum of the top r`` would cancel catastrophically when it is small).

    >>> eigen_tail(np.array([4.0, 2.0, 1.0])).tolist()
    [7.0, 3.0, 1.0, 0.0]
    """
    return np.concatenate([np.cumsum(lam[::-1])[::-1], [0.0]])


@dataclass
class DMDModel:
    """Exact DMD of one rank, as :func:`dmd_model` builds it from the Gram."""

    rank: int  # requested
    effective_rank: int
    lam: np.ndarray  # (r,) complex eigenvalues
    b: np.ndarray  # (r,) complex amplitudes
    k: np.ndarray  # (T-1, T) real: reconstruction = X2 @ k
    residual_gram: float  # its squared error predicted from the Gram


def dmd_model(g: np.ndarray, lsq: np.ndarray, rank: int, rcond: float = DMD_RCOND) -> DMDModel:
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
    lam1, v1 = eigh_desc(g[:-1, :-1])
    ok = int(np.count_nonzero(lam1 > rcond * lam1[0])) if lam1[0] > 0 else 0
    r = min(rank, t - 1, ok)
    if r == 0:
        k = np.zeros((t - 1, t))
        return DMDModel(
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
    return DMDModel(rank, r, lam, b, k, float(np.sum(lp * lp)))


def factor(k: np.ndarray, tol: float = 1e-15) -> tuple[np.ndarray, np.ndarray]:
    """``K = A B`` at K's numerical rank: ``A^T`` (q x T-1) and ``B^T`` (T x q) from the SVD,
    singular values below ``tol`` times the largest dropped (changing the product by at most
    about ``tol ||K||`` per dropped value)."""
    if not np.any(k):
        return np.zeros((0, k.shape[0])), np.zeros((k.shape[1], 0))
    u, s, vh = np.linalg.svd(k, full_matrices=False)
    q = int(np.count_nonzero(s > tol * s[0]))
    return np.ascontiguousarray((u[:, :q] * s[None, :q]).T), np.ascontiguousarray(vh[:q].T)


def dmd_factors(
    models: Sequence[DMDModel],
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Every model's ``K = A B`` stacked for :func:`dmd_block_errors`: ``A^T`` (Q x T-1),
    ``B^T`` (T x Q) and the column offsets of each model (at most 2 r columns each, r for
    conjugate-symmetric amplitudes)."""
    factors = [factor(m.k) for m in models]
    offsets = tuple(int(o) for o in np.cumsum([0] + [f[0].shape[0] for f in factors]))
    at = np.ascontiguousarray(np.concatenate([f[0] for f in factors]))  # (Q, T-1)
    bt = np.ascontiguousarray(np.concatenate([f[1] for f in factors], axis=1))  # (T, Q)
    return at, bt, offsets

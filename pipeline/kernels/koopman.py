"""Koopman spectra of low-dimensional training dynamics (Redman et al. 2024, seed 003).

A run is first reduced to a few coordinates Y (d, T): the M CMD reference profiles, or the
top principal components of the trajectory (from its T x T Gram matrix, see
:func:`pc_coordinates`). A time-delay (Hankel) embedding with ``delays`` copies makes a linear
model of the dynamics expressive enough; exact DMD of the embedding approximates the Koopman
operator, and its eigenvalues are the Koopman eigenvalues. Two runs are compared by the
1-Wasserstein distance between their eigenvalue sets in the complex plane, with an optimal
matching (``scipy.optimize.linear_sum_assignment``).

Everything here is small (d x T); the only pass over the N x T trajectory is the Gram matrix
(:func:`pipeline.graph.baselines.build_gram_tasks`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["dmd_eigenvalues", "hankel", "koopman_eigenvalues", "pc_coordinates", "wasserstein"]


def hankel(y: np.ndarray, delays: int) -> np.ndarray:
    """The time-delay embedding of ``y`` (d, T): (d * delays, T - delays + 1), block k holding
    ``y[:, k : k + T - delays + 1]``."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    t = y.shape[1]
    if delays < 1 or delays > t - 1:
        raise ValueError(f"delays must be in 1..{t - 1} for {t} epochs, got {delays}")
    width = t - delays + 1
    return np.concatenate([y[:, k : k + width] for k in range(delays)], axis=0)


def dmd_eigenvalues(x: np.ndarray, rank: int | None = None, rcond: float = 1e-10) -> np.ndarray:
    """Exact-DMD eigenvalues of the snapshot matrix ``x`` (features, snapshots): the
    eigenvalues of ``A ~ X2 X1^+`` restricted to the rank-r POD subspace of X1. ``rank``
    defaults to X1's numerical rank (singular values above ``rcond`` times the largest).
    Sorted by decreasing modulus, then angle."""
    x = np.asarray(x, dtype=np.float64)
    x1, x2 = x[:, :-1], x[:, 1:]
    u, s, vh = np.linalg.svd(x1, full_matrices=False)
    keep = int(np.sum(s > rcond * s[0])) if s.size and s[0] > 0 else 0
    r = keep if rank is None else min(rank, keep)
    if r == 0:
        return np.zeros(0, dtype=complex)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    atilde = u.T @ x2 @ vh.T / s[None, :]
    ev = np.linalg.eigvals(atilde)
    order = np.lexsort((np.angle(ev), -np.abs(ev)))
    return ev[order]


def koopman_eigenvalues(
    y: np.ndarray, delays: int = 1, rank: int | None = None, center: bool = False
) -> np.ndarray:
    """Koopman eigenvalues of the coordinates ``y`` (d, T): exact DMD of the Hankel embedding.

    ``center`` subtracts each coordinate's mean first. A constant offset (the fixed point the
    weights settle at) is itself dynamics, with eigenvalue 1, so it is kept by default;
    centring a transient breaks exact linear dynamics."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    if center:
        y = y - y.mean(axis=1, keepdims=True)
    return dmd_eigenvalues(hankel(y, delays), rank=rank)


def pc_coordinates(gram: np.ndarray, d: int) -> np.ndarray:
    """The top-``d`` principal time courses of a trajectory from its T x T Gram matrix W^T W:
    rows ``sigma_k v_k^T`` (the projections of W on its top left singular vectors), (d, T)."""
    w, v = np.linalg.eigh(np.asarray(gram, dtype=np.float64))
    order = np.argsort(w)[::-1][:d]
    sigma = np.sqrt(np.clip(w[order], 0.0, None))
    return (v[:, order] * sigma[None, :]).T


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """1-Wasserstein distance between two eigenvalue sets (uniform weights) in the complex
    plane, by an optimal matching. Sets of different sizes are compared on their ``k`` largest
    (by modulus) eigenvalues, ``k`` the smaller size."""
    from scipy.optimize import linear_sum_assignment

    a = np.asarray(a, dtype=complex)
    b = np.asarray(b, dtype=complex)
    k = min(a.size, b.size)
    if k == 0:
        raise ValueError("an eigenvalue set is empty")
    a = a[np.argsort(-np.abs(a), kind="stable")[:k]]
    b = b[np.argsort(-np.abs(b), kind="stable")[:k]]
    cost = np.abs(a[:, None] - b[None, :])
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())

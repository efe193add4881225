"""Per-matrix SVD math of basis stability (OIALR, arXiv:2401.08505): arrays in, arrays out.

Owns the (truncated) SVD of one weight matrix at one epoch (:func:`matrix_factors`: exact
LAPACK SVD or :func:`randomized_svd`), the orthogonal polar factor ``Q = U V^T``
(:func:`polar_factor`), and the comparison of two epochs' factors (:func:`column_cosine`,
:func:`compare_factors`). No dask, no I/O; numpy or cupy by the input's namespace
(:func:`pipeline.compat.namespace`), in float64. The definitions are in
:mod:`pipeline.ops.stability`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from pipeline.compat import namespace

__all__ = [
    "OVERSAMPLE",
    "POWER_ITERATIONS",
    "Factors",
    "column_cosine",
    "compare_factors",
    "matrix_factors",
    "polar_factor",
    "randomized_svd",
]

#: randomised SVD: extra columns of the sketch and power iterations
OVERSAMPLE = 10
POWER_ITERATIONS = 4

#: U (m, r), s (r,), Vt (r, n), numpy or cupy arrays
Factors = tuple[Any, Any, Any]

Method = Literal["exact", "randomized"]


def randomized_svd(a: Any, rank: int, *, seed: int = 0) -> Factors:
    """Rank-``rank`` SVD of ``a`` (m, n) by a seeded Gaussian range finder with
    :data:`POWER_ITERATIONS` power iterations (QR re-orthonormalised each half step) and
    :data:`OVERSAMPLE` extra columns (Halko et al. 2011, algorithms 4.4 and 5.1).

    The sketch is drawn on the host (``numpy.random.default_rng(seed)``), so numpy and cupy
    inputs use the same test matrix.

    >>> import numpy as np
    >>> a = np.diag([3.0, 2.0, 1.0])
    >>> u, s, vt = randomized_svd(a, 2)
    >>> np.round(s, 12).tolist()
    [3.0, 2.0]
    """
    xp = namespace(a)
    m, n = a.shape
    k = min(rank + OVERSAMPLE, m, n)
    rng = np.random.default_rng(seed)
    omega = xp.asarray(rng.standard_normal((n, k)))
    q, _ = xp.linalg.qr(a @ omega)
    for _ in range(POWER_ITERATIONS):
        z, _ = xp.linalg.qr(a.T @ q)
        q, _ = xp.linalg.qr(a @ z)
    b = q.T @ a  # (k, n)
    ub, s, vt = xp.linalg.svd(b, full_matrices=False)
    u = q @ ub
    return u[:, :rank], s[:rank], vt[:rank]


def matrix_factors(a: Any, method: Method, rank: int, *, seed: int = 0) -> Factors | None:
    """The rank-``rank`` factors ``(U_r, s_r, V_r^T)`` of the float64 matrix ``a``: the exact
    SVD (``full_matrices=False``) truncated, or :func:`randomized_svd`; None when ``a`` holds
    NaN/Inf.

    >>> import numpy as np
    >>> matrix_factors(np.array([[np.nan, 0.0]]), "exact", 1) is None
    True
    """
    xp = namespace(a)
    if not bool(xp.isfinite(a).all()):
        return None
    if method == "exact":
        u, s, vt = xp.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    return randomized_svd(a, rank, seed=seed)


def polar_factor(u: Any, vt: Any) -> Any:
    """``Q = U V^T`` (m, n)."""
    return u @ vt


def column_cosine(q0: Any, q1: Any) -> float:
    """Mean over columns ``j`` of ``cos(q0[:, j], q1[:, j])``; columns whose norm is zero at
    either side are left out (NaN when none is left).

    >>> import numpy as np
    >>> column_cosine(np.eye(3), -np.eye(3))
    -1.0
    """
    xp = namespace(q0)
    dot = xp.einsum("ij,ij->j", q0, q1)
    n0 = xp.sqrt(xp.einsum("ij,ij->j", q0, q0))
    n1 = xp.sqrt(xp.einsum("ij,ij->j", q1, q1))
    ok = (n0 > 0) & (n1 > 0)
    if not bool(ok.any()):
        return math.nan
    return float(xp.mean(dot[ok] / (n0[ok] * n1[ok])))


def compare_factors(prev: Factors, cur: Factors) -> tuple[float | None, float | None]:
    """``(stability, sv_drift)`` between two epochs' factors: :func:`column_cosine` of their
    polar factors (None when no column is left) and ``||s - s_prev|| / ||s_prev||`` (None when
    ``s_prev`` is zero)."""
    xp = namespace(prev[1])
    c = column_cosine(polar_factor(prev[0], prev[2]), polar_factor(cur[0], cur[2]))
    stability = None if math.isnan(c) else c
    drift = None
    n0 = float(xp.linalg.norm(prev[1]))
    if n0 > 0:
        drift = float(xp.linalg.norm(cur[1] - prev[1]) / n0)
    return stability, drift

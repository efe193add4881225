"""Dense float64 references shared by several test modules, written from the methods'
definitions (never from the pipeline's code): exact DMD, the CMD model's residual, and the
exact permutation test of ``compare``."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from helpers import read_analysis, stored_model, window_of


def dense_dmd_error(w: np.ndarray, r: int) -> float:
    """Squared error of rank-r exact DMD (Tu et al. 2014) on the dense matrix, written plainly."""
    x1, x2 = w[:, :-1], w[:, 1:]
    u, s, vh = np.linalg.svd(x1, full_matrices=False)
    u, s, v = u[:, :r], s[:r], vh[:r].T
    atilde = u.T @ x2 @ v / s[None, :]
    lam, we = np.linalg.eig(atilde)
    phi = (x2 @ v / s[None, :]) @ we
    b = np.linalg.lstsq(phi, w[:, 0].astype(complex), rcond=None)[0]
    t = np.arange(w.shape[1])
    recon = (phi @ (b[:, None] * lam[:, None] ** t[None, :])).real
    return float(((w - recon) ** 2).sum())


def dense_cmd_residual(store: Path, name: str, coeff_dtype: type) -> tuple[float, float]:
    """Squared error of a study's model and ``||W||^2``, over the rows finite in its window.

    ``coeff_dtype`` float32: the model as the study stores it, by the documented formula
    (``level + a (r(t) - r(anchor))`` in float32 coefficients; a version-1 study: ``a r + b``
    with a and b cast to float32). float64: the float64 least-squares line of every row
    against its mode's reference, written from ALGORITHM.md (a = <w - mean w, r - mean r> /
    |r - mean r|^2, b = mean w - a mean r; a version-1 study: its stored float64 a and b).
    Computed in float64."""
    w = window_of(store, name).astype(np.float64)
    an = read_analysis(store, name)
    ok = np.isfinite(w).all(axis=1)
    r = an["refs"][an["mode"].astype(np.int64)]
    if "level" not in an:  # version 1: float64 a and b, cast
        a = an["a"].astype(coeff_dtype).astype(np.float64)
        b = an["b"].astype(coeff_dtype).astype(np.float64)
        recon = a[:, None] * r + b[:, None]
    elif coeff_dtype == np.float32:
        recon = stored_model(an)
    else:
        wf = np.where(ok[:, None], w, 0.0)  # rows with NaN/Inf are left out anyway
        wc = wf - wf.mean(axis=1, keepdims=True)
        rc = r - r.mean(axis=1, keepdims=True)
        a = (wc * rc).sum(axis=1) / (rc * rc).sum(axis=1)
        recon = wf.mean(axis=1, keepdims=True) + a[:, None] * rc
    return float(((w - recon)[ok] ** 2).sum()), float((w[ok] ** 2).sum())


def permutation_stat(dist: np.ndarray, labels: np.ndarray) -> float:
    """Between-group mean distance minus within-group mean (pairs of distinct runs)."""
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    return float(dist[~same].mean() - dist[same & off].mean())


def exact_p_apart(dist: np.ndarray, groups: list[str], tol: float = 1e-12) -> tuple[float, float]:
    """The permutation test's exact p by enumeration: the fraction of all distinct relabellings
    (every one equally likely under exchangeable labels) whose statistic is at least the
    observed one (the observed labelling included). Tie-aware: statistics within tol * scale
    of the observed one but not equal to it may count or not, so this returns (p without
    them, p with them); without near-ties the two are equal."""
    labels = np.asarray(groups)
    d = np.asarray(dist, dtype=np.float64)
    obs = permutation_stat(d, labels)
    stats = np.array(
        [permutation_stat(d, np.asarray(p)) for p in sorted(set(itertools.permutations(groups)))]
    )
    eps = tol * max(float(np.abs(d).max()), 1e-300)
    above = (stats >= obs + eps) | (stats == obs)
    return float(np.mean(above)), float(np.mean(above | (stats >= obs - eps)))


def assert_p_apart(p: float, exact: tuple[float, float], n: int) -> None:
    """``p = (hits + 1) / (n + 1)`` from ``n`` random relabellings (the observed labelling
    counted once more: p is never 0) estimates the exact p: within its Monte Carlo error
    (6 standard deviations, plus the +1 of the estimator)."""
    hits = p * (n + 1) - 1
    assert 0 <= round(hits) <= n and abs(hits - round(hits)) < 1e-6, (p, n)
    lo, hi = exact
    sd = max(np.sqrt(q * (1 - q) / n) for q in (lo, hi))
    assert lo - 6 * sd - 1 / (n + 1) <= p <= hi + 6 * sd + 1 / (n + 1), (p, exact, n)

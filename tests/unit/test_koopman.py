"""Koopman spectra (issue 8, part 1 kernels): eigenvalues of synthetic linear systems are
recovered; a conjugated copy of a system is at distance ~0; another system is not."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.kernels.koopman import (
    dmd_eigenvalues,
    hankel,
    koopman_eigenvalues,
    pc_coordinates,
    wasserstein,
)


def _linear_system(eigs: list[complex], t: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x_{t+1} = A x_t with A = P diag-like(eigs) P^-1 (real), observed in ``dim`` coordinates."""
    rng = np.random.default_rng(seed)
    blocks = []
    for lam in eigs:
        if abs(np.imag(lam)) > 0:
            r, th = abs(lam), np.angle(lam)
            blocks.append(r * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]))
        else:
            blocks.append(np.array([[float(np.real(lam))]]))
    n = sum(b.shape[0] for b in blocks)
    a = np.zeros((n, n))
    i = 0
    for b in blocks:
        k = b.shape[0]
        a[i : i + k, i : i + k] = b
        i += k
    p = rng.standard_normal((n, n)) + 3 * np.eye(n)
    a = p @ a @ np.linalg.inv(p)
    x = np.empty((n, t))
    x[:, 0] = rng.standard_normal(n)
    for s in range(1, t):
        x[:, s] = a @ x[:, s - 1]
    obs = rng.standard_normal((dim, n))
    full = [lam for lam in eigs] + [np.conj(lam) for lam in eigs if abs(np.imag(lam)) > 0]
    return obs @ x, np.array(full)


def _close_sets(got: np.ndarray, want: np.ndarray, tol: float) -> None:
    assert got.size == want.size, (got, want)
    assert wasserstein(got, want) < tol, (got, want)


def test_recovers_eigenvalues_of_a_linear_system() -> None:
    y, want = _linear_system([0.95, 0.8 * np.exp(0.3j), 0.5], t=40, dim=12, seed=0)
    _close_sets(dmd_eigenvalues(y), want, 1e-8)


def test_hankel_recovers_what_one_coordinate_hides() -> None:
    # one observed coordinate of a 4-dimensional system: delays make the spectrum visible
    y, want = _linear_system([0.97 * np.exp(0.2j), 0.9 * np.exp(0.7j)], t=60, dim=1, seed=1)
    assert hankel(y, 5).shape == (5, 56)
    _close_sets(koopman_eigenvalues(y, delays=6, rank=4), want, 1e-6)


def test_conjugate_copy_is_at_distance_zero_and_another_system_is_not() -> None:
    y, _ = _linear_system([0.95, 0.85 * np.exp(0.25j), 0.6], t=50, dim=8, seed=2)
    rng = np.random.default_rng(5)
    h = rng.standard_normal((8, 8)) + 4 * np.eye(8)  # a linear change of coordinates (conjugacy)
    ev_a = dmd_eigenvalues(y)
    ev_b = dmd_eigenvalues(h @ y)
    other, _ = _linear_system([0.7, 0.95 * np.exp(0.9j), 0.3], t=50, dim=8, seed=3)
    ev_c = dmd_eigenvalues(other)
    assert wasserstein(ev_a, ev_b) < 1e-8
    assert wasserstein(ev_a, ev_c) > 0.1
    # and time-shuffling destroys the dynamics: far from the ordered run
    shuffled = y[:, rng.permutation(y.shape[1])]
    assert wasserstein(ev_a, dmd_eigenvalues(shuffled)) > 0.1


def test_pc_coordinates_from_the_gram() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((500, 3)) @ rng.standard_normal((3, 20))  # rank 3, T = 20
    pcs = pc_coordinates(w.T @ w, 3)
    _u, s, vh = np.linalg.svd(w, full_matrices=False)
    want = s[:3, None] * vh[:3]
    for k in range(3):  # up to sign
        assert np.allclose(np.abs(pcs[k]), np.abs(want[k]), atol=1e-8)
    # the dynamics seen through the PCs equal those of the full trajectory
    assert wasserstein(dmd_eigenvalues(pcs), dmd_eigenvalues(w)) < 1e-8


def test_wasserstein_basics() -> None:
    a = np.array([1.0, 0.5j, -0.2])
    assert wasserstein(a, a[::-1]) == 0.0
    assert wasserstein(a, a + 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="empty"):
        wasserstein(a, np.array([]))
    with pytest.raises(ValueError, match="delays"):
        hankel(np.ones((2, 5)), 5)

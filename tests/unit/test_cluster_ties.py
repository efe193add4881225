"""Mode clustering under float ties: the result must not depend on the CPU or BLAS kernel.

Exact multiples of one profile correlate with |corr| = 1 exactly in exact arithmetic; in
floating point each |corr| comes out as 1 give or take a few ulps, and which one is largest
depends on the kernel that rounded it. These tests plant such ulp-level differences directly
in the correlation matrix, in every direction, and check that the documented rules
(``pipeline.kernels.cluster``) decide, not the rounding.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.kernels.cluster import DISTANCE_DECIMALS, SCORE_RTOL, cluster_modes

ULP = 2.0**-52


def _two_groups(noise: np.ndarray) -> np.ndarray:
    """|corr| of 3 + 4 samples: 1 inside each group up to ``noise`` ulps, 0.1 across."""
    groups = np.array([0, 0, 0, 1, 1, 1, 1])
    same = groups[:, None] == groups[None, :]
    c = np.where(same, 1.0 - noise * ULP, 0.1)
    c = np.minimum(c, c.T)
    np.fill_diagonal(c, 1.0)
    return c


@pytest.mark.parametrize("winner", range(7))
def test_reference_tie_goes_to_the_lowest_position(winner: int) -> None:
    """Every member scores the same to rounding; whichever member rounding favours, the
    reference is the group's lowest position."""
    noise = np.full((7, 7), 2.0)
    noise[winner, :] = noise[:, winner] = 0.0  # ``winner`` is ahead by a few ulps
    c = cluster_modes(_two_groups(noise), modes=2)
    # largest group first: the 4-member group is mode 0 and starts at position 3
    assert c.labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert c.references.tolist() == [3, 0]


def test_reference_clear_winner_still_wins() -> None:
    """A lead well beyond the tie tolerance is not a tie."""
    c = _two_groups(np.zeros((7, 7)))
    c[5, [3, 4, 6]] = c[[3, 4, 6], 5] = 1.0
    c[3, 4] = c[4, 3] = c[3, 6] = c[6, 3] = c[4, 6] = c[6, 4] = 0.9
    got = cluster_modes(c, modes=2)
    assert got.references.tolist() == [5, 0]
    assert SCORE_RTOL < 0.1 / 3


@pytest.mark.parametrize("pattern", list(itertools.product([0.0, 1.0, 2.0], repeat=3)))
def test_mode_count_does_not_depend_on_ulps(pattern: tuple[float, ...]) -> None:
    """Two groups of exact multiples, asked for up to 5 modes: always 2 modes, whatever ulp
    pattern rounding left inside the groups (on main, a cut between 0 and 2 ulps split a group)."""
    noise = np.zeros((7, 7))
    for (i, j), v in zip([(0, 1), (0, 2), (3, 5)], pattern, strict=True):
        noise[i, j] = noise[j, i] = v
    for cut in ({"modes": 5}, {"modes": 2}, {"threshold": 0.0}, {"threshold": 0.5}):
        c = cluster_modes(_two_groups(noise), **cut)  # type: ignore[arg-type]
        assert c.n_modes == 2, (cut, pattern)
        assert c.labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
        assert c.references.tolist() == [3, 0]


def test_distances_are_rounded_to_the_documented_grid() -> None:
    """A distance a few ulps above the threshold is at the threshold (12 decimals); one 1e-9
    above is not."""
    assert DISTANCE_DECIMALS == 12
    for excess, together in ((3e-14, True), (1e-9, False)):
        c = _two_groups(np.zeros((7, 7)))
        for i, j in ((0, 1), (0, 2), (1, 2)):
            c[i, j] = c[j, i] = 0.6 - excess  # distance 0.4 + excess
        got = cluster_modes(c, threshold=0.4)
        assert (got.n_modes == 2) is together, excess
        assert got.labels.tolist()[3:] == [0, 0, 0, 0]


def test_dense_reference_linkage_is_independent_and_agrees_with_scipy() -> None:
    """The tests' brute-force complete linkage (tests/helpers.py, no scipy) against scipy's on
    random distances with no ties: the same partition at every cut."""
    from helpers import _complete_linkage
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    rng = np.random.default_rng(5)
    pts = rng.standard_normal((30, 3))
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    z = linkage(squareform(d, checks=False), method="complete")
    states = _complete_linkage(d)
    np.testing.assert_allclose([h for h, _p in states], z[:, 2], rtol=0, atol=0)
    for k in range(1, 30):
        height, part = states[k - 1]
        raw = fcluster(z, t=height, criterion="distance")
        want = sorted(sorted(np.flatnonzero(raw == i).tolist()) for i in np.unique(raw))
        assert sorted(part) == want

"""Clustering the sampled profiles into modes (paper 3.2, 8.3): complete linkage on |corr|."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DISTANCE_DECIMALS", "SCORE_RTOL", "Clustering", "check_cut", "cluster_modes"]

#: distances 1 - |corr| are rounded to this many decimals before the linkage, so that values
#: equal in exact arithmetic (exact multiples, duplicated rows) are equal whatever CPU or BLAS
#: kernel rounded them (their differences are a few ulps, far below 1e-12)
DISTANCE_DECIMALS = 12
#: members whose summed |corr| is within this relative tolerance of the best tie for the
#: reference; the lowest sample position (the lowest row index: samples are sorted) wins
SCORE_RTOL = 1e-12


@dataclass(frozen=True)
class Clustering:
    """Mode of each sample (0 = largest mode) and each mode's reference sample."""

    labels: np.ndarray  # (K,) int64
    references: np.ndarray  # (M,) positions into the samples
    sizes: np.ndarray  # (M,)
    order: np.ndarray  # dendrogram leaf order of the samples (for figures)

    @property
    def n_modes(self) -> int:
        return int(self.references.size)


def check_cut(modes: int | None, threshold: float | None) -> None:
    """Raise ``ValueError`` unless exactly one valid cut is given: ``modes`` >= 1, or a
    ``threshold`` distance in [0, 1]."""
    if (modes is None) == (threshold is None):
        raise ValueError("give exactly one of modes or threshold")
    if modes is not None and modes < 1:
        raise ValueError("modes must be at least 1")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError("threshold is a distance 1 - |corr| in [0, 1]")


def cluster_modes(
    corr: np.ndarray, *, modes: int | None = None, threshold: float | None = None
) -> Clustering:
    """Cluster samples by complete linkage on the distance ``1 - |corr|``.

    Exactly one of ``modes`` (cut into at most that many clusters: the smallest cophenetic
    threshold that gives no more than ``modes`` clusters) or ``threshold`` (clusters whose
    in-cluster cophenetic distance is at most ``threshold``) must be given. Modes are labelled
    by size, largest first (ties: the mode holding the lowest sample position first). A mode's
    reference is the member with the largest sum of |corr| to the other members.

    Ties are decided by rules, never by rounding (the result is the same on every CPU and BLAS
    build): distances are rounded to :data:`DISTANCE_DECIMALS` decimals before the linkage,
    and members whose score is within a relative :data:`SCORE_RTOL` of the best tie for the
    reference, the lowest position winning.
    """
    from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
    from scipy.spatial.distance import squareform

    check_cut(modes, threshold)
    k = corr.shape[0]
    absc = np.abs(np.asarray(corr, dtype=np.float64))
    if k == 1:
        raw = np.zeros(1, dtype=np.int64)
        order = np.zeros(1, dtype=np.int64)
    else:
        dist = 1.0 - absc
        np.fill_diagonal(dist, 0.0)
        dist = np.clip((dist + dist.T) / 2, 0.0, 1.0).round(DISTANCE_DECIMALS)
        z = linkage(squareform(dist, checks=False), method="complete")
        if modes is not None:
            raw = fcluster(z, t=modes, criterion="maxclust")
        else:
            raw = fcluster(z, t=threshold, criterion="distance")
        order = leaves_list(z).astype(np.int64)
    ids, first, counts = np.unique(raw, return_index=True, return_counts=True)
    rank = sorted(range(len(ids)), key=lambda i: (-counts[i], first[i]))
    relabel = {int(ids[i]): m for m, i in enumerate(rank)}
    labels = np.array([relabel[int(r)] for r in raw], dtype=np.int64)
    refs = np.empty(len(ids), dtype=np.int64)
    for m in range(len(ids)):
        members = np.flatnonzero(labels == m)
        sub = absc[np.ix_(members, members)]
        score = sub.sum(axis=1) - np.diag(sub)
        best = score.max()
        # members are in ascending position: the first of the tied is the lowest
        refs[m] = members[int(np.flatnonzero(score >= best - SCORE_RTOL * abs(best))[0])]
    sizes = np.bincount(labels, minlength=len(ids))
    return Clustering(labels, refs, sizes, order)

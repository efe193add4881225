"""The clients' data: seeded partitions of the digits training set.

Owns the seed derivation shared by every random choice of the simulation
(:func:`_seed_of`) and :func:`partition` (IID or Dirichlet non-IID splits).
"""

from __future__ import annotations

import numpy as np

__all__ = ["partition"]


def _seed_of(*keys: int) -> int:
    """A 32-bit seed derived from integer keys (independent streams per key tuple)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def partition(
    labels: np.ndarray,
    clients: int,
    *,
    alpha: float | None,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split sample indices over clients: disjoint, covering, sorted, seeded.

    ``alpha=None``: a random permutation cut into ``clients`` near-equal parts (IID).
    Else, for every class, its samples (shuffled) are cut with proportions drawn from
    Dirichlet(alpha, ..., alpha); the draw is repeated until every client holds at least
    ``min_size`` samples.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(_seed_of(seed, 0xFED))
    n = labels.size
    if alpha is None:
        return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            prop = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(prop)[:-1] * idx.size).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(p.size for p in out) >= min_size:
            return out
    raise ValueError(f"no Dirichlet({alpha}) split gives every client {min_size} samples")

"""Stratified sampling of parameters (paper 8.2). Pure numpy: indices in, indices out."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["sample_varying", "stratified_sample"]


def stratified_sample(
    layer_offsets: Sequence[int],
    layer_sizes: Sequence[int],
    k: int,
    rng: np.random.Generator,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Draw ``k`` distinct row indices: half spread evenly over the layers, half uniform.

    Each layer gets ``k // (2 L)`` draws (fewer if it is smaller), the rest are uniform over
    all rows. When ``k // 2 <= L`` every draw is uniform (the paper's rule). Rows in
    ``exclude`` are never drawn. Returns sorted int64 indices (fewer than ``k`` only if fewer
    rows are available).

    >>> rng = np.random.default_rng(0)
    >>> idx = stratified_sample([0, 10, 1000], [10, 990, 5], 12, rng)
    >>> len(idx), bool((idx >= 1000).any() and (idx < 10).any())
    (12, True)
    """
    n = int(layer_offsets[-1] + layer_sizes[-1]) if len(layer_offsets) else 0
    excluded = set() if exclude is None else {int(i) for i in exclude}
    available = n - len(excluded)
    k = min(k, available)
    chosen: set[int] = set()
    n_layers = len(layer_offsets)
    if k // 2 > n_layers:
        per = k // (2 * n_layers)
        for off, size in zip(layer_offsets, layer_sizes, strict=True):
            pool = size - sum(1 for e in excluded if off <= e < off + size)
            take = min(per, pool)
            got = 0
            while got < take:
                cand = int(off + rng.integers(size))
                if cand not in chosen and cand not in excluded:
                    chosen.add(cand)
                    got += 1
    while len(chosen) < k:
        cand = int(rng.integers(n))
        if cand not in chosen and cand not in excluded:
            chosen.add(cand)
    return np.array(sorted(chosen), dtype=np.int64)


def sample_varying(
    layer_offsets: Sequence[int],
    layer_sizes: Sequence[int],
    k: int,
    seed: int,
    read: Callable[[np.ndarray], tuple[np.ndarray, int]],
    rounds: int = 20,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``k`` stratified samples whose profiles vary and are finite over the window.

    ``read(rows)`` returns the rows' profiles (rows x epochs) and the bytes it read. Rows that
    are constant or hold NaN/Inf are replaced by new draws (at most ``rounds`` rounds).
    Returns the sorted indices, their profiles and the bytes read in all.
    """
    rng = np.random.default_rng(seed)
    good_idx: list[np.ndarray] = []
    good_prof: list[np.ndarray] = []
    rejected: list[int] = []
    nbytes = 0
    need = k
    width = 0
    for _ in range(rounds):
        taken = (
            np.concatenate([*good_idx, np.asarray(rejected, dtype=np.int64)])
            if (good_idx or rejected)
            else None
        )
        idx = stratified_sample(layer_offsets, layer_sizes, need, rng, exclude=taken)
        if idx.size == 0:
            break
        prof, nb = read(idx)
        nbytes += nb
        width = prof.shape[1]
        p64 = prof.astype(np.float64)
        ok = np.isfinite(p64).all(axis=1) & (p64.max(axis=1) > p64.min(axis=1))
        good_idx.append(idx[ok])
        good_prof.append(prof[ok])
        rejected.extend(int(i) for i in idx[~ok])
        need = k - sum(g.size for g in good_idx)
        if need <= 0:
            break
    idx = np.concatenate(good_idx) if good_idx else np.empty(0, dtype=np.int64)
    prof = np.concatenate(good_prof) if good_prof else np.empty((0, width), dtype=np.float32)
    order = np.argsort(idx)
    return idx[order], prof[order], nbytes

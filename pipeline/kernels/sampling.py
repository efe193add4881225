"""Stratified sampling of parameters (paper 8.2): the draws, pure numpy (indices in, indices
out); the reads they need are the caller's callables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Pool",
    "RowMap",
    "Sample",
    "draw_from_pools",
    "draw_samples",
    "sample_varying",
    "stratified_sample",
]


@dataclass(frozen=True)
class Pool:
    """The varying rows of one piece of a layer (a layer's rows inside one row block).

    ``count`` is the exact number of rows of the piece that vary and are finite over the
    window; ``candidates`` are up to K of them in uniformly random order (a random
    permutation's prefix), so the first ``j`` are a uniform sample of ``j`` of them.
    """

    layer: int
    count: int
    candidates: np.ndarray  # int64 row indices


class RowMap:
    """The rows of some layers as one contiguous "virtual" index space, and back: sampling
    draws in it so that layers left out (frozen tensors) are never drawn.

    >>> m = RowMap([0, 10, 30], [10, 20, 5], keep=[True, False, True])
    >>> m.offsets, m.sizes, m.to_real(np.array([0, 9, 10, 14])).tolist()
    ([0, 10], [10, 5], [0, 9, 30, 34])
    >>> m.to_virtual(np.array([9, 30])).tolist()
    [9, 10]
    """

    def __init__(self, offsets: Sequence[int], sizes: Sequence[int], keep: Sequence[bool]):
        self.real = np.array([o for o, k in zip(offsets, keep, strict=True) if k], dtype=np.int64)
        kept = [int(s) for s, k in zip(sizes, keep, strict=True) if k]
        self.sizes = kept
        self.offsets = [int(x) for x in np.concatenate([[0], np.cumsum(kept)[:-1]])] if kept else []
        self._virtual = np.asarray(self.offsets, dtype=np.int64)

    def to_real(self, v: np.ndarray) -> np.ndarray:
        k = np.searchsorted(self._virtual, v, side="right") - 1
        return (self.real[k] + (v - self._virtual[k])).astype(np.int64)

    def to_virtual(self, r: np.ndarray) -> np.ndarray:
        k = np.searchsorted(self.real, r, side="right") - 1
        return (self._virtual[k] + (r - self.real[k])).astype(np.int64)


@dataclass(frozen=True)
class Sample:
    """A drawn sample: sorted row indices, their profiles, the bytes read to find them, and
    the exact number of rows that vary over the window when a scan counted them (else None)."""

    index: np.ndarray
    profiles: np.ndarray
    bytes_read: int
    n_varying: int | None = None


def draw_from_pools(pools: Sequence[Pool], k: int, rng: np.random.Generator) -> np.ndarray:
    """``min(k, total)`` distinct rows drawn from the pools by the stratified rule.

    The pools' rows are laid out as one virtual index space (layer by layer, piece by piece),
    :func:`stratified_sample` draws in it over the layers that have varying rows, and each
    piece's drawn virtual indices take that piece's first candidates: a uniform draw without
    replacement within the piece, so within each layer and over all rows too. Returns sorted
    int64 row indices.

    >>> pools = [Pool(0, 3, np.array([7, 2, 5])), Pool(1, 0, np.empty(0, np.int64)),
    ...          Pool(2, 2, np.array([40, 41]))]
    >>> draw_from_pools(pools, 10, np.random.default_rng(0)).tolist()
    [2, 5, 7, 40, 41]
    """
    live = [p for p in pools if p.count > 0]
    total = sum(p.count for p in live)
    k = min(k, total)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    for p in live:
        if p.candidates.size < min(k, p.count):
            raise ValueError(f"a pool of layer {p.layer} holds too few candidates for k={k}")
    layers = sorted({p.layer for p in live})
    by_layer = {lid: [p for p in live if p.layer == lid] for lid in layers}
    sizes = [sum(p.count for p in by_layer[lid]) for lid in layers]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    virtual = stratified_sample(offsets.tolist(), sizes, k, rng)
    pieces = [p for lid in layers for p in by_layer[lid]]
    starts = np.concatenate([[0], np.cumsum([p.count for p in pieces])[:-1]]).astype(np.int64)
    which = np.searchsorted(starts, virtual, side="right") - 1
    out = []
    for q in np.unique(which):
        n_q = int((which == q).sum())
        out.append(pieces[int(q)].candidates[:n_q])
    return np.sort(np.concatenate(out).astype(np.int64))


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


def draw_samples(
    layer_offsets: Sequence[int],
    layer_sizes: Sequence[int],
    k: int,
    seed: int,
    read: Callable[[np.ndarray], tuple[np.ndarray, int]],
    rounds: int = 20,
    scan: Callable[[], tuple[Sequence[Pool], int]] | None = None,
) -> Sample:
    """``k`` stratified samples whose profiles vary and are finite over the window.

    ``read(rows)`` returns the rows' profiles (rows x epochs) and the bytes it read. Rows that
    are constant or hold NaN/Inf are replaced by new draws, for at most ``rounds`` rounds.
    If that leaves fewer than ``k`` (most parameters never change: a frozen backbone) and
    ``scan`` is given, ``scan()`` (one pass over the window: the :class:`Pool` of varying rows
    of every piece, and the bytes it read) replaces the draws: then ``k`` rows are sampled
    whenever ``k`` rows vary, and :attr:`Sample.n_varying` says how many do.
    """
    first = sample_varying(layer_offsets, layer_sizes, k, seed, read, rounds)
    if first[0].size >= k or scan is None:
        return Sample(*first)
    pools, scanned = scan()
    idx = draw_from_pools(pools, k, np.random.default_rng([seed, 1]))
    prof, nbytes = read(idx) if idx.size else (first[1][:0], 0)
    return Sample(idx, prof, first[2] + scanned + nbytes, int(sum(p.count for p in pools)))


def sample_varying(
    layer_offsets: Sequence[int],
    layer_sizes: Sequence[int],
    k: int,
    seed: int,
    read: Callable[[np.ndarray], tuple[np.ndarray, int]],
    rounds: int = 20,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``k`` stratified samples whose profiles vary and are finite over the window, by
    rejection: ``read(rows)`` returns the rows' profiles (rows x epochs) and the bytes it
    read; rows that are constant or hold NaN/Inf are replaced by new draws (at most
    ``rounds`` rounds, so fewer than ``k`` may come back: see :func:`draw_samples`).
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

"""Digests of stored tensor values: which tensors never change (a frozen backbone, frozen
embeddings) is known exactly, from ingest, without reading the trajectory again.

An ingest task digests each piece of a tensor it writes (the float32 values of one row range
at one epoch: the stored values, upcast exactly from 16-bit stores), with XXH3-128; the client
combines a tensor's pieces, in row order, into the tensor's digest for that epoch
(:func:`combine`). Two epochs of a tensor have equal digests if and only if its stored values
are equal, bit for bit, up to a 2^-128 chance per comparison: XXH3 is not cryptographic, and
needs not be here (no adversary picks the weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import xxhash

__all__ = ["PREFIX", "combine", "frozen", "piece_digest"]

#: names the digest's algorithm, so that another one can follow without a schema change
PREFIX = "xxh3-128:"


def piece_digest(values: np.ndarray) -> bytes:
    """16-byte digest of a contiguous float32 piece (its bytes as stored in memory).

    >>> a = np.arange(4, dtype=np.float32)
    >>> piece_digest(a) == piece_digest(a.copy()), piece_digest(a) == piece_digest(a[::-1].copy())
    (True, False)
    """
    return xxhash.xxh3_128_digest(np.ascontiguousarray(values).reshape(-1).view(np.uint8).data)


def combine(pieces: Iterable[tuple[int, int, bytes]]) -> str:
    """The tensor digest from its pieces ``(start, stop, piece digest)`` (element offsets into
    the flattened tensor), in any order; they must tile the tensor.

    >>> d = piece_digest(np.ones(2, np.float32))
    >>> combine([(2, 4, d), (0, 2, d)]) == combine([(0, 2, d), (2, 4, d)])
    True
    """
    h = xxhash.xxh3_128()
    end = 0
    for start, stop, digest in sorted(pieces):
        if start != end:
            raise ValueError(f"the pieces leave a gap or overlap at element {end}")
        h.update(start.to_bytes(8, "little") + stop.to_bytes(8, "little") + digest)
        end = stop
    return PREFIX + h.hexdigest()


def frozen(digests: Sequence[Sequence[str]], n_tensors: int) -> np.ndarray | None:
    """Which of ``n_tensors`` tensors have the same digest at every epoch of ``digests`` (one
    tuple of per-tensor digests per epoch); None when an epoch's digests are unknown.

    >>> frozen([("a", "b"), ("a", "c")], 2).tolist()
    [True, False]
    >>> frozen([("a", "b"), ()], 2) is None
    True
    """
    if not digests or any(len(d) != n_tensors for d in digests):
        return None
    first = digests[0]
    return np.array(
        [all(d[k] == first[k] for d in digests[1:]) for k in range(n_tensors)], dtype=bool
    )

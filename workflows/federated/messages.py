"""What travels between server and clients, and its size in bytes.

Owns the messages (:class:`Download`, :class:`EmbedUpdate`), the compact encodings of
which parameters are newly embedded and of integer types (:func:`_uint_for`), and the
``a * r + b`` arithmetic that server and clients share bit for bit (:func:`_affine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Download", "EmbedUpdate"]


def _uint_for(max_value: int) -> np.dtype:
    """The smallest unsigned integer type holding ``0..max_value``."""
    for t in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.uint64)


@dataclass
class EmbedUpdate:
    """What a client needs, once, to follow newly embedded parameters."""

    mask: np.ndarray | None  # packed bits over the client's non-embedded positions, or
    index: np.ndarray | None  # the new positions (smallest unsigned type): one of the two
    a: np.ndarray
    b: np.ndarray
    mode: np.ndarray  # smallest unsigned type for M - 1
    ref_index: np.ndarray | None = None  # only with the first embedding

    def arrays(self) -> list[np.ndarray]:
        out = [self.a, self.b, self.mode]
        out += [x for x in (self.mask, self.index, self.ref_index) if x is not None]
        return out

    @property
    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in self.arrays()))


@dataclass
class Download:
    """Server to client: the non-embedded parameters (float32), maybe an embedding update."""

    values: np.ndarray
    embed: EmbedUpdate | None = None

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) + (self.embed.nbytes if self.embed is not None else 0)


def _encode_new(
    free: np.ndarray, new: np.ndarray, n: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Which of the ``free`` positions are ``new``: a bit mask or an index list, the smaller."""
    mask = np.packbits(np.isin(free, new))
    index = new.astype(_uint_for(n - 1))
    return (mask, None) if mask.nbytes <= index.nbytes else (None, index)


def _decode_new(free: np.ndarray, mask: np.ndarray | None, index: np.ndarray | None) -> np.ndarray:
    if mask is not None:
        return free[np.unpackbits(mask, count=free.size).astype(bool)]
    assert index is not None
    return index.astype(np.int64)


def _affine(a: np.ndarray, b: np.ndarray, mode: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``a * r[mode] + b`` in float64, rounded to float32: EmbeddedCMD.apply's arithmetic."""
    return (a * r.astype(np.float64)[mode] + b).astype(np.float32)

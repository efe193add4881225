"""CRC-32 of a concatenation from the CRCs of its parts (zlib's ``crc32_combine``, which
Python's standard library lacks).

The CRC-32 of ``a + b`` is a linear function, over GF(2), of ``crc32(a)`` and ``crc32(b)``:
``crc32(a + b) == shift(crc32(a), len(b)) ^ crc32(b)``, where ``shift(c, n)`` is the effect of
appending ``n`` zero bytes to a message of CRC ``c`` (without the pre- and post-conditioning
that cancel out). ``shift`` is a 32x32 bit matrix, built by repeated squaring as zlib does and
cached by length; the matrix of a length used often (a digest block) is also kept as four byte
tables, so that applying it costs four lookups.

An ingest task computes the CRC of each part of a zip member it reads; the client combines
them in order and compares the result with the member's CRC in the zip directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

__all__ = ["crc32_combine", "crc32_concat"]

_POLY = 0xEDB88320  # zlib's reflected CRC-32 polynomial

Matrix = tuple[int, ...]  # 32 columns, each a 32-bit int: column i is the image of bit i


def _times(mat: Matrix, vec: int) -> int:
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _compose(a: Matrix, b: Matrix) -> Matrix:
    """The matrix of ``a(b(x))``."""
    return tuple(_times(a, col) for col in b)


def _one_zero_bit() -> Matrix:
    return (_POLY, *(1 << (n - 1) for n in range(1, 32)))


@lru_cache(maxsize=64)
def _zero_bytes_power(k: int) -> Matrix:
    """The matrix of appending ``2**k`` zero bytes."""
    if k == 0:
        m = _one_zero_bit()
        for _ in range(3):  # 1 bit -> 2 -> 4 -> 8 bits
            m = _compose(m, m)
        return m
    half = _zero_bytes_power(k - 1)
    return _compose(half, half)


@lru_cache(maxsize=1024)
def _zero_bytes(n: int) -> Matrix:
    """The matrix of appending ``n`` (> 0) zero bytes."""
    m: Matrix | None = None
    k = 0
    while n:
        if n & 1:
            p = _zero_bytes_power(k)
            m = p if m is None else _compose(p, m)
        n >>= 1
        k += 1
    assert m is not None
    return m


@lru_cache(maxsize=8)
def _tables(n: int) -> tuple[tuple[int, ...], ...]:
    """``_zero_bytes(n)`` as four 256-entry tables, one per byte of the CRC."""
    m = _zero_bytes(n)
    return tuple(tuple(_times(m, b << (8 * j)) for b in range(256)) for j in range(4))


def _shift(crc: int, n: int, fast: bool) -> int:
    if n <= 0:
        return crc
    if fast:
        t0, t1, t2, t3 = _tables(n)
        return t0[crc & 0xFF] ^ t1[(crc >> 8) & 0xFF] ^ t2[(crc >> 16) & 0xFF] ^ t3[crc >> 24]
    return _times(_zero_bytes(n), crc)


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc1 = crc32(a)``, ``crc2 = crc32(b)`` and ``len(b)``.

    >>> import zlib
    >>> a, b = b"checkpoint ", b"bytes"
    >>> crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    True
    """
    return _shift(crc1, len2, False) ^ crc2


def crc32_concat(parts: Iterable[tuple[int, int]], common: int = 0) -> int:
    """The CRC-32 of the concatenation of parts given as ``(crc, length)`` in order.

    ``common``: a length most parts have (a digest block); shifting by it uses byte tables.

    >>> import zlib
    >>> data = bytes(range(256)) * 3
    >>> parts = [(zlib.crc32(data[i : i + 256]), 256) for i in range(0, 768, 256)]
    >>> crc32_concat(parts, common=256) == zlib.crc32(data)
    True
    """
    crc = 0
    for c, n in parts:
        crc = _shift(crc, n, n == common) ^ c
    return crc

"""Digests of stored tensor values: which tensors never change (a frozen backbone, frozen
embeddings) is known exactly, from ingest, without reading the trajectory again.

An ingest task digests each piece of a tensor it writes (the stored values of one row range
at one epoch, their bytes as stored: float32, or the 16-bit values of a bfloat16/float16
store), with XXH3-128; the client combines a tensor's pieces, in row order, into the tensor's
digest for that epoch (:func:`combine`). The digest's prefix names what the pieces digest
(:func:`scheme`): :data:`PREFIX`, float32 values (float32 stores; 16-bit stores written before
their stored bytes were digested, whose pieces were upcast to float32 first, and which keep
that definition when epochs are appended), or :data:`PREFIX_STORED`, the stored 16-bit
bytes. Two epochs of a tensor have equal digests if and only if its stored values are equal,
bit for bit, up to a 2^-128 chance per comparison: XXH3 is not cryptographic, and needs not
be here (no adversary picks the weights).

The same module digests checkpoint *files* (:data:`CONTENT_PREFIX`): a file is cut into 64 KiB
blocks at fixed offsets; the file's digest is the XXH3-128 of its size and its blocks' XXH3-128
in order. Whoever reads a block whole digests it (:class:`BlockHasher`: an ingest task, from the
raw bytes of the tensor pieces it copies; the client's pass over the bytes no task read whole:
headers, pickles, tensors left out), so that every byte of an input is read once, and the
digests put together (:class:`FileDigest`) give the same value as one sequential pass over the
file. The blocks also carry the CRC-32 of the zip members' parts they hold: the client combines
them (:mod:`pipeline.kernels.crc`) and checks each member's CRC without a second read.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import xxhash

from pipeline.kernels.crc import crc32_concat

__all__ = [
    "BLOCK_BYTES",
    "CONTENT_PREFIX",
    "PREFIX",
    "PREFIX_STORED",
    "BlockHasher",
    "FileDigest",
    "block_leaf",
    "block_span",
    "combine",
    "content_digest",
    "covered_blocks",
    "frozen",
    "n_blocks",
    "piece_digest",
    "scheme",
    "subtract_ranges",
]

#: names the digest's algorithm, so that another one can follow without a schema change:
#: XXH3-128 of the pieces' float32 values (float32 stores, and older 16-bit stores)
PREFIX = "xxh3-128:"
#: XXH3-128 of the pieces' stored 16-bit bytes (bfloat16 and float16 stores)
PREFIX_STORED = "xxh3-128-stored16:"


def scheme(store_dtype: str, stored: Sequence[Sequence[str]]) -> str:
    """The prefix of the digests of epochs added to a store of ``store_dtype`` whose epochs
    have the digests ``stored``: a 16-bit store digests its stored bytes (:data:`PREFIX_STORED`)
    unless its epochs were digested as float32 values (:data:`PREFIX`: it keeps that, so that
    its epochs stay comparable); a float32 store's bytes are its float32 values.

    >>> scheme("float32", []), scheme("bfloat16", []), scheme("bfloat16", [["xxh3-128:00"]])
    ('xxh3-128:', 'xxh3-128-stored16:', 'xxh3-128:')
    """
    if store_dtype == "float32":
        return PREFIX
    for digests in stored:  # the store's epochs share one definition: the first one known
        for d in digests:
            if d:
                return PREFIX if d.startswith(PREFIX) else PREFIX_STORED
    return PREFIX_STORED


def piece_digest(values: np.ndarray) -> bytes:
    """16-byte digest of a contiguous piece of values (their bytes as stored in memory).

    >>> a = np.arange(4, dtype=np.float32)
    >>> piece_digest(a) == piece_digest(a.copy()), piece_digest(a) == piece_digest(a[::-1].copy())
    (True, False)
    """
    return xxhash.xxh3_128_digest(np.ascontiguousarray(values).reshape(-1).view(np.uint8).data)


def combine(pieces: Iterable[tuple[int, int, bytes]], prefix: str = PREFIX) -> str:
    """The tensor digest from its pieces ``(start, stop, piece digest)`` (element offsets into
    the flattened tensor), in any order; they must tile the tensor. ``prefix`` names what the
    pieces digest (:func:`scheme`).

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
    return prefix + h.hexdigest()


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


# --------------------------------------------------------------------------- file content
#: bytes per block of a file's content digest
BLOCK_BYTES = 1 << 16
#: names a file's content digest: XXH3-128 over the file's size and the XXH3-128 of each of its
#: 64 KiB blocks, in order (a digest of the whole file that ranges read in any order, by any
#: task, add up to; older stores record a sha256 of the whole file instead)
CONTENT_PREFIX = "xxh3-128-b64k:"

#: ``(k0, k1)``: blocks ``k0 <= k < k1`` of a file, sorted and disjoint
BlockRanges = tuple[tuple[int, int], ...]
#: the CRC-32 of each zip member's part in one block: ``((member index, crc), ...)``
BlockCrcs = tuple[tuple[int, int], ...]
#: consecutive blocks from ``k0``: ``(k0, 16-byte digests joined, one BlockCrcs per block)``
BlockRun = tuple[int, bytes, tuple[BlockCrcs, ...]]


def n_blocks(size: int) -> int:
    """The number of digest blocks of a file of ``size`` bytes (the last may be short).

    >>> n_blocks(0), n_blocks(1), n_blocks(BLOCK_BYTES), n_blocks(BLOCK_BYTES + 1)
    (0, 1, 1, 2)
    """
    return -(-size // BLOCK_BYTES)


def block_span(k: int, size: int) -> tuple[int, int]:
    """Bytes ``[begin, end)`` of block ``k`` of a file of ``size`` bytes."""
    return k * BLOCK_BYTES, min((k + 1) * BLOCK_BYTES, size)


def covered_blocks(spans: Iterable[tuple[int, int]], size: int) -> BlockRanges:
    """The blocks lying wholly inside the union of the byte ranges ``spans``.

    >>> B = BLOCK_BYTES
    >>> covered_blocks([(0, B), (B, 2 * B + 5), (3 * B, 3 * B + 7)], 3 * B + 7)
    ((0, 2), (3, 4))
    >>> covered_blocks([(1, 2 * B)], 4 * B)
    ((1, 2),)
    """
    out: list[tuple[int, int]] = []
    merged: list[list[int]] = []
    for a, b in sorted((max(0, a), min(b, size)) for a, b in spans):
        if a >= b:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    for a, b in merged:
        k0 = -(-a // BLOCK_BYTES)
        k1 = n_blocks(size) if b == size else b // BLOCK_BYTES
        if k0 < k1:
            if out and out[-1][1] == k0:
                out[-1] = (out[-1][0], k1)
            else:
                out.append((k0, k1))
    return tuple(out)


def subtract_ranges(ranges: BlockRanges, taken: BlockRanges) -> BlockRanges:
    """``ranges`` less the blocks of ``taken`` (both sorted and disjoint).

    >>> subtract_ranges(((0, 10),), ((2, 4), (6, 7)))
    ((0, 2), (4, 6), (7, 10))
    """
    out = []
    for a, b in ranges:
        pos = a
        for c, d in taken:
            if d <= pos or c >= b:
                continue
            if c > pos:
                out.append((pos, c))
            pos = max(pos, d)
        if pos < b:
            out.append((pos, b))
    return tuple(out)


def block_leaf(
    data: memoryview, begin: int, members: Sequence[tuple[int, int]]
) -> tuple[bytes, BlockCrcs]:
    """A block's digest, and the CRC-32 of each part of a zip member in it (``members``: the
    ``[begin, end)`` byte ranges of the file's members, sorted)."""
    digest = xxhash.xxh3_128_digest(data)
    if not members:
        return digest, ()
    end = begin + len(data)
    i = _first_after(members, begin)
    crcs = []
    while i < len(members) and members[i][0] < end:
        lo, hi = max(members[i][0], begin), min(members[i][1], end)
        if lo < hi:
            crcs.append((i, zlib.crc32(data[lo - begin : hi - begin])))
        i += 1
    return digest, tuple(crcs)


def _first_after(members: Sequence[tuple[int, int]], pos: int) -> int:
    """The index of the first member ending after ``pos`` (members sorted, disjoint)."""
    lo, hi = 0, len(members)
    while lo < hi:
        mid = (lo + hi) // 2
        if members[mid][1] <= pos:
            lo = mid + 1
        else:
            hi = mid
    return lo


class BlockHasher:
    """The digests of the blocks ``ranges`` of one file, from byte ranges of it fed in any order.

    A task feeds the raw bytes of each tensor piece it read (:meth:`feed`); a block lying
    across pieces is assembled from their parts. Every block of ``ranges`` must be covered by
    what is fed (the plan assigns a task only blocks its pieces cover).
    """

    def __init__(self, size: int, members: Sequence[tuple[int, int]], ranges: BlockRanges) -> None:
        self.size = size
        self.members = tuple(members)
        self.ranges = ranges
        self._starts = [a for a, _ in ranges]
        self._done: dict[int, tuple[bytes, BlockCrcs]] = {}
        self._partial: dict[int, tuple[bytearray, list[tuple[int, int]]]] = {}

    def _assigned(self, first: int, last: int) -> Iterable[int]:
        """Assigned blocks ``first <= k < last``."""
        i = max(0, bisect.bisect_right(self._starts, first) - 1)
        while i < len(self.ranges) and self.ranges[i][0] < last:
            a, b = self.ranges[i]
            yield from range(max(a, first), min(b, last))
            i += 1

    def feed(self, begin: int, data: memoryview) -> None:
        """Bytes ``[begin, begin + len(data))`` of the file."""
        end = begin + len(data)
        for k in self._assigned(begin // BLOCK_BYTES, n_blocks(min(end, self.size))):
            if k in self._done:
                continue
            bb, be = block_span(k, self.size)
            lo, hi = max(bb, begin), min(be, end)
            if lo >= hi:
                continue
            if lo == bb and hi == be:
                self._done[k] = block_leaf(data[bb - begin : be - begin], bb, self.members)
                self._partial.pop(k, None)
                continue
            buf, have = self._partial.setdefault(k, (bytearray(be - bb), []))
            buf[lo - bb : hi - bb] = data[lo - begin : hi - begin]
            have.append((lo - bb, hi - bb))
            if _covers(have, be - bb):
                self._done[k] = block_leaf(memoryview(buf), bb, self.members)
                del self._partial[k]

    def result(self) -> tuple[BlockRun, ...]:
        """The digests of every assigned block, as runs; raises ``ValueError`` naming the
        first block that was not fed whole."""
        out = []
        for a, b in self.ranges:
            missing = [k for k in range(a, b) if k not in self._done]
            if missing:
                raise ValueError(
                    f"block {missing[0]} (bytes from {missing[0] * BLOCK_BYTES}) was not read whole"
                )
            out.append(
                (
                    a,
                    b"".join(self._done[k][0] for k in range(a, b)),
                    tuple(self._done[k][1] for k in range(a, b)) if self.members else (),
                )
            )
        return tuple(out)


def _covers(parts: list[tuple[int, int]], length: int) -> bool:
    pos = 0
    for a, b in sorted(parts):
        if a > pos:
            return False
        pos = max(pos, b)
    return pos >= length


class FileDigest:
    """A file's content digest put together from the block runs of several tasks."""

    def __init__(self, size: int, members: Sequence[tuple[int, int]] = ()) -> None:
        self.size = size
        self.members = tuple(members)
        n = n_blocks(size)
        self._leaves = bytearray(16 * n)
        self._have = bytearray(n)
        self._crcs: dict[int, BlockCrcs] = {}

    def add(self, run: BlockRun) -> None:
        """Blocks digested by one task (a block given twice must have the same digest)."""
        k0, leaves, crcs = run
        n = len(leaves) // 16
        if any(self._have[k0 : k0 + n]):
            for i in range(n):
                k = k0 + i
                if (
                    self._have[k]
                    and self._leaves[16 * k : 16 * k + 16] != leaves[16 * i : 16 * i + 16]
                ):
                    raise ValueError(f"block {k} was read twice with other contents")
        self._leaves[16 * k0 : 16 * (k0 + n)] = leaves
        self._have[k0 : k0 + n] = b"\x01" * n
        for i, c in enumerate(crcs):
            if c:
                self._crcs[k0 + i] = c

    def missing(self) -> BlockRanges:
        """The blocks no run has given yet."""
        out: list[tuple[int, int]] = []
        for k, h in enumerate(self._have):
            if h:
                continue
            if out and out[-1][1] == k:
                out[-1] = (out[-1][0], k + 1)
            else:
                out.append((k, k + 1))
        return tuple(out)

    def digest(self) -> str:
        """The content digest (every block must be known)."""
        if not all(self._have):
            raise ValueError(f"blocks {self.missing()[:3]} of the file are not digested")
        return content_digest(self.size, bytes(self._leaves))

    def member_crcs(self) -> list[int]:
        """The CRC-32 of each member, from the parts the blocks hold."""
        parts: list[list[tuple[int, int]]] = [[] for _ in self.members]
        for k in sorted(self._crcs):
            bb, be = block_span(k, self.size)
            for i, crc in self._crcs[k]:
                mb, me = self.members[i]
                parts[i].append((crc, min(me, be) - max(mb, bb)))
        return [crc32_concat(p, common=BLOCK_BYTES) for p in parts]


def content_digest(size: int, leaves: bytes) -> str:
    """The content digest of a file of ``size`` bytes from its blocks' digests, in order.

    >>> data = bytes(range(256)) * 1000
    >>> leaves = b"".join(
    ...     xxhash.xxh3_128_digest(data[i : i + BLOCK_BYTES]) for i in range(0, len(data), BLOCK_BYTES)
    ... )
    >>> content_digest(len(data), leaves).startswith(CONTENT_PREFIX)
    True
    """
    return CONTENT_PREFIX + xxhash.xxh3_128_hexdigest(size.to_bytes(8, "little") + leaves)

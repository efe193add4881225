"""Where rows and epochs sit: the tensors' row layout, row blocks, chunk sizes, epoch specs
and windows. Pure Python values, no I/O, no dask."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pipeline.config import DEFAULT_CHUNK_BYTES

__all__ = [
    "RowLayout",
    "Segment",
    "blocks",
    "default_chunk_rows",
    "parse_epoch_spec",
    "parse_window",
]


def default_chunk_rows(
    n_rows: int, time_chunk: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, itemsize: int = 4
) -> int:
    """Rows per chunk so that one chunk of ``itemsize``-byte values is about ``chunk_bytes``."""
    rows = max(1, chunk_bytes // (itemsize * time_chunk))
    return max(1, min(rows, n_rows))


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``size`` covering ``range(n)``."""
    for s in range(0, n, size):
        yield s, min(s + size, n)


@dataclass(frozen=True)
class Segment:
    """A piece of one tensor inside a row block."""

    name: str
    start: int  # element offset into the flattened tensor
    stop: int
    out: int  # offset into the block


@dataclass(frozen=True)
class RowLayout:
    """Where each stored tensor sits in the trajectory's rows."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def from_entries(cls, entries: Sequence[tuple[str, int, int]]) -> RowLayout:
        """From ``(name, offset, size)`` triples in row order."""
        return cls(
            tuple(e[0] for e in entries), tuple(e[1] for e in entries), tuple(e[2] for e in entries)
        )

    @property
    def n_rows(self) -> int:
        return (self.offsets[-1] + self.sizes[-1]) if self.offsets else 0

    def segments(self, start: int, stop: int) -> list[Segment]:
        """The tensor pieces that make up rows ``[start, stop)``, in row order."""
        out: list[Segment] = []
        i = max(0, bisect.bisect_right(self.offsets, start) - 1)
        while i < len(self.names) and self.offsets[i] < stop:
            off, size = self.offsets[i], self.sizes[i]
            lo, hi = max(start, off), min(stop, off + size)
            if lo < hi:
                out.append(Segment(self.names[i], lo - off, hi - off, lo - start))
            i += 1
        return out

    def tensor_of_row(self, row: int) -> str:
        i = bisect.bisect_right(self.offsets, row) - 1
        return self.names[i]


def parse_epoch_spec(spec: str) -> list[int]:
    """Epoch numbers from ``"START:END[:STEP]"`` (END exclusive) or ``"0,1,5"``.

    >>> parse_epoch_spec("0:5")
    [0, 1, 2, 3, 4]
    >>> parse_epoch_spec("10:20:5")
    [10, 15]
    >>> parse_epoch_spec("3,1,2")
    [3, 1, 2]
    """
    s = spec.strip()
    try:
        if ":" in s:
            parts = [int(p) for p in s.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            step = parts[2] if len(parts) == 3 else 1
            if step <= 0:
                raise ValueError
            return list(range(parts[0], parts[1], step))
        return [int(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise ValueError(
            f"cannot parse epochs {spec!r}: use START:END[:STEP] or a comma list"
        ) from None


def parse_window(spec: str | None, epochs: Sequence[int]) -> list[int]:
    """Columns selected by ``START:END[:STEP]`` over the stored epoch numbers.

    The window holds the stored epochs ``START <= e < END`` (either bound may be left out);
    ``STEP`` keeps every STEP-th of them (paper 8.1's sub-sampling).

    >>> parse_window("2:8:2", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    [2, 4, 6]
    >>> parse_window(None, [5, 6])
    [0, 1]
    """
    if spec is None or spec.strip() in ("", ":"):
        return list(range(len(epochs)))
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"cannot parse window {spec!r}: use START:END[:STEP]")
    try:
        start = int(parts[0]) if parts[0].strip() else None
        end = int(parts[1]) if parts[1].strip() else None
        step = int(parts[2]) if len(parts) == 3 and parts[2].strip() else 1
    except ValueError:
        raise ValueError(f"cannot parse window {spec!r}: use START:END[:STEP]") from None
    if step < 1:
        raise ValueError("the window's STEP must be >= 1")
    cols = [
        i
        for i, e in enumerate(epochs)
        if (start is None or e >= start) and (end is None or e < end)
    ]
    return cols[::step]

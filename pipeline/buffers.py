"""Per-thread reusable buffers for hot loops, and writing large buffers to files.

Fresh allocations of a few MB cost first-touch page faults on every call (about 0.6 GB/s on
these machines); tasks that run many times in one worker thread reuse one buffer instead.

Large buffers are written to files in pieces of :data:`WRITE_PIECE` bytes
(:func:`write_all`): on the Linux 6.18 VMs we measured, one ``write`` of a 12 MB chunk into a
fresh file ran at 0.24-0.44 GB/s and the same bytes in 64 KiB pieces at 1.2-3.0 GB/s
(``benchmarks/bench_write_pieces.py``); elsewhere the pieces cost a few system calls per MB.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["WRITE_PIECE", "scratch", "write_all"]

#: bytes per ``write`` call of :func:`write_all`
WRITE_PIECE = 64 << 10

_local = threading.local()


def scratch(key: str, n: int, dtype: Any = np.float32, xp: Any = np) -> Any:
    """A 1-D array of ``n`` elements of the array module ``xp`` (numpy or cupy) owned by the
    calling thread, reused across calls (fresh allocations cost page faults every time).

    Its contents are undefined. A second call with the same ``key`` in the same thread
    returns (a view of) the same memory, so callers must be done with the previous one.
    """
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    dt = np.dtype(dtype)
    slot = (key, xp.__name__)
    buf = pool.get(slot)
    if buf is None or buf.dtype != dt or buf.size < n:
        buf = xp.empty(max(n, 1), dtype=dt)
        pool[slot] = buf
    return buf[:n]


def write_all(write: Callable[[memoryview], int | None], data: Any) -> int:
    """Write every byte of the buffer ``data`` with ``write`` (``os.write`` bound to a file
    descriptor, or a binary file's ``write``), in pieces of :data:`WRITE_PIECE` bytes; a
    short write is continued. Returns the number of bytes written.

    >>> import io
    >>> f = io.BytesIO()
    >>> write_all(f.write, np.arange(3, dtype=np.float32)), f.getvalue()[4:8]
    (12, b'\\x00\\x00\\x80?')
    """
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        got = write(view[done : done + WRITE_PIECE])
        if got is None:  # a non-blocking raw file that took nothing: not used here
            raise BlockingIOError("the file took no bytes")
        done += got
    return done

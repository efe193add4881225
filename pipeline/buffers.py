"""Per-thread reusable buffers for hot loops.

Fresh allocations of a few MB cost first-touch page faults on every call (about 0.6 GB/s on
these machines); tasks that run many times in one worker thread reuse one buffer instead.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["scratch"]

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

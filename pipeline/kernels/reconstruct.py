"""Per-block CMD reconstruction ``a * r_mode(t) + b``: arrays in, arrays out.

No dask, no I/O; the same arithmetic serves numpy and cupy arrays (indexing, ``astype`` and
broadcasting only, so no array-namespace lookup is needed).
Reading the study's arrays and writing ``reconstructed`` belong to
:mod:`pipeline.graph.reconstruct` and :mod:`pipeline.store.analysis`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["reconstruct_block"]


def reconstruct_block(mode: Any, a: Any, b: Any, refs: Any, cols: slice | Any) -> Any:
    """``a * refs[mode, cols] + b`` in float64 (rows x len(cols)). A reference row (a=1, b=0)
    gives back its own profile exactly.

    >>> import numpy as np
    >>> refs = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, 4.0]])
    >>> reconstruct_block(np.array([1, 0]), np.array([1.0, 2.0]), np.array([0.0, 1.0]),
    ...                   refs, slice(None)).tolist()
    [[5.0, 5.0, 4.0], [1.0, 3.0, 5.0]]
    """
    r = refs[:, cols]
    return a[:, None] * r[mode.astype(np.int64)] + b[:, None]

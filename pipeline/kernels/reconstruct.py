"""Per-block CMD reconstruction: arrays in, arrays out.

No dask, no I/O; the same arithmetic serves numpy and cupy arrays (indexing, ``astype`` and
broadcasting only, so no array-namespace lookup is needed).
Reading the study's arrays and writing ``reconstructed`` belong to
:mod:`pipeline.graph.reconstruct` and :mod:`pipeline.store.analysis`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["reconstruct_block"]


def reconstruct_block(
    mode: Any, a: Any, b: Any, refs: Any, cols: slice | Any, anchor: Any = None
) -> Any:
    """The CMD model of a block of rows at the window positions ``cols``, in float64
    (rows x len(cols)).

    Without ``anchor``: ``a * refs[mode, cols] + b`` (``b`` the intercept; version-1 studies).
    With ``anchor`` (a study's stored form): ``b + a * (refs[mode, cols] - refs[mode, anchor])``,
    where ``b`` is the fitted value at the window position ``anchor``: the same line, whose
    float32 coefficients do not cancel where the fitted values are small
    (:func:`pipeline.kernels.cmd.anchor_rows`). A reference row (a = 1, b = 0, or level
    r(anchor)) gives back its own profile exactly.

    >>> import numpy as np
    >>> refs = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, 4.0]])
    >>> reconstruct_block(np.array([1, 0]), np.array([1.0, 2.0]), np.array([0.0, 1.0]),
    ...                   refs, slice(None)).tolist()
    [[5.0, 5.0, 4.0], [1.0, 3.0, 5.0]]
    >>> reconstruct_block(np.array([1, 0]), np.array([1.0, 2.0]), np.array([4.0, 3.0]),
    ...                   refs, slice(None), anchor=np.array([2, 1])).tolist()
    [[5.0, 5.0, 4.0], [1.0, 3.0, 5.0]]
    """
    m = mode.astype(np.int64)
    r = refs[:, cols][m]
    if anchor is None:
        return a[:, None] * r + b[:, None]
    r0 = refs[m, anchor.astype(np.int64)]
    return b.astype(np.float64)[:, None] + a.astype(np.float64)[:, None] * (r - r0[:, None])

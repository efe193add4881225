"""Array-namespace dispatch: the one place that knows about numpy vs cupy.

Kernels call :func:`namespace` on their input and use the module it returns, so the same code
runs on numpy and on cupy arrays. cupy is never imported unless an array is a cupy array.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["namespace", "to_numpy"]


def namespace(x: Any) -> ModuleType:
    """``numpy`` or ``cupy``, whichever owns ``x``."""
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(x, cp.ndarray):
        return cp
    return np


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy or cupy array (copies device memory to the host)."""
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(x, cp.ndarray):
        return cp.asnumpy(x)
    return np.asarray(x)

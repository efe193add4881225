"""Models as flat float32 vectors (what is averaged and sent).

Owns the order of the floating-point parameters and the copies between a model and one
flat vector.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["get_flat", "set_flat"]


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.dtype.is_floating_point]


def get_flat(model: nn.Module) -> np.ndarray:
    """All floating-point parameters, flat float32 (a copy), in ``model.parameters()`` order."""
    with torch.no_grad():
        return (
            torch.cat([p.detach().reshape(-1).to(torch.float32) for p in _params(model)])
            .numpy()
            .copy()
        )


def set_flat(model: nn.Module, flat: np.ndarray) -> None:
    """Write a flat float32 vector into the parameters (the inverse of :func:`get_flat`)."""
    off = 0
    with torch.no_grad():
        for p in _params(model):
            k = p.numel()
            p.copy_(torch.from_numpy(np.ascontiguousarray(flat[off : off + k])).reshape(p.shape))
            off += k
    if off != flat.size:
        raise ValueError(f"{flat.size} values for {off} parameters")

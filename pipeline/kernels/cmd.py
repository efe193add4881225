"""The CMD per-block kernel: correlation with each mode reference, affine fit, residuals.

Everything is computed from centred float64 statistics of the block (ALGORITHM.md): the
float32 one-pass raw-moment formula of the research code loses all precision for weights
near 1.0 that move by 1e-4; centring in float64 does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.compat import namespace

__all__ = [
    "FLAG_CONSTANT",
    "FLAG_NONFINITE",
    "FLAG_REFERENCE",
    "FLAG_SAMPLED",
    "BlockFit",
    "References",
    "fit_block",
    "pearson",
]

FLAG_CONSTANT = np.uint8(1)  #: zero variance over the window: a = 0, b = its value
FLAG_NONFINITE = np.uint8(2)  #: NaN/Inf in the window: a = 0, b = NaN, excluded from metrics
FLAG_REFERENCE = np.uint8(4)  #: a mode's reference: a = 1, b = 0 exactly
FLAG_SAMPLED = np.uint8(8)  #: one of the K sampled parameters


@dataclass(frozen=True)
class References:
    """The M reference profiles over the window, with their centred statistics (float64)."""

    raw: Any  # (M, Tw) float64
    mean: Any  # (M,)
    centred: Any  # (M, Tw)
    energy: Any  # (M,) sum of squares of the centred profile

    @classmethod
    def from_profiles(cls, profiles: Any) -> References:
        xp = namespace(profiles)
        raw = xp.asarray(profiles, dtype=xp.float64)
        mean = raw.mean(axis=1)
        centred = raw - mean[:, None]
        energy = (centred * centred).sum(axis=1)
        if bool(xp.any(energy <= 0)):
            raise ValueError("a reference profile is constant over the window")
        return cls(raw, mean, centred, energy)

    def to(self, xp: Any) -> References:
        """The same references as arrays of ``xp`` (numpy or cupy)."""
        return References(
            *(xp.asarray(a) for a in (self.raw, self.mean, self.centred, self.energy))
        )


@dataclass(frozen=True)
class BlockFit:
    """Per-row results of one block and its mergeable error sums."""

    mode: Any  # (S,) int64
    a: Any  # (S,) float64
    b: Any  # (S,) float64
    corr: Any  # (S,) float64
    residual: Any  # (S,) float64: sum over the window of (w - a r - b)^2
    energy: Any  # (S,) float64: sum over the window of w^2 (the error metrics' denominator)
    flags: Any  # (S,) uint8
    residual_t: Any  # (Tw,) float64: residual summed over the block's valid rows, per epoch
    energy_t: Any  # (Tw,) float64: w^2 summed over the block's valid rows, per epoch


def fit_block(x: Any, refs: References, ref_rows: Any = None) -> BlockFit:
    """Fit every row of ``x`` (S, Tw) to its best-correlated reference.

    Parameters
    ----------
    x
        Trajectory rows over the window, float32 or float64 (numpy or cupy).
    refs
        The mode references (same array library as ``x``).
    ref_rows
        Optional ``(row positions in x, mode ids)`` of rows that are references themselves:
        they get a = 1, b = 0 exactly (a reference reconstructs itself exactly).

    Returns
    -------
    BlockFit
        Mode ids (argmax of |corr|, ties to the lowest id), least-squares a and b against the
        raw reference profile, corr, residual energy, flags and per-epoch error sums.
    """
    xp = namespace(x)
    xf = xp.asarray(x, dtype=xp.float64)
    finite = xp.isfinite(xf).all(axis=1)
    xf = xp.where(finite[:, None], xf, 0.0)
    mean = xf.mean(axis=1)
    xc = xf - mean[:, None]
    ssx = (xc * xc).sum(axis=1)
    cov = xc @ refs.centred.T  # (S, M)
    constant = finite & (ssx <= 0)
    denom = xp.sqrt(xp.maximum(ssx, 0.0)[:, None] * refs.energy[None, :])
    safe = xp.where(denom > 0, denom, 1.0)
    corr_all = xp.where(denom > 0, cov / safe, 0.0)
    mode = xp.argmax(xp.abs(corr_all), axis=1)
    rows = xp.arange(x.shape[0])
    cov_m = cov[rows, mode]
    corr = corr_all[rows, mode]
    a = cov_m / refs.energy[mode]
    b = mean - a * refs.mean[mode]
    a = xp.where(constant | ~finite, 0.0, a)
    b = xp.where(constant, mean, b)
    b = xp.where(finite, b, xp.nan)
    corr = xp.where(constant | ~finite, 0.0, corr)
    flags = xp.zeros(x.shape[0], dtype=xp.uint8)
    flags = xp.where(constant, flags | FLAG_CONSTANT, flags)
    flags = xp.where(~finite, flags | FLAG_NONFINITE, flags)
    if ref_rows is not None:
        pos, ids = ref_rows
        pos = xp.asarray(pos, dtype=xp.int64)
        ids = xp.asarray(ids, dtype=xp.int64)
        if pos.size:
            mode[pos] = ids
            a[pos] = 1.0
            b[pos] = 0.0
            corr[pos] = 1.0
            flags[pos] = flags[pos] | FLAG_REFERENCE
    # residual computed directly (not as ssx (1 - corr^2)), so it stays exact when corr ~ 1
    res = xc - a[:, None] * refs.centred[mode]
    res = xp.where(finite[:, None], res, 0.0)
    if ref_rows is not None and pos.size:
        # w - 1 * r - 0 is exactly zero for a reference, whatever rounding says
        res[pos] = 0.0
    res2 = res * res
    residual = res2.sum(axis=1)
    energy = (xf * xf).sum(axis=1)
    return BlockFit(
        mode=mode,
        a=a,
        b=b,
        corr=corr,
        residual=residual,
        energy=energy,
        flags=flags,
        residual_t=res2.sum(axis=0),
        energy_t=(xf * xf).sum(axis=0),
    )


def pearson(profiles: Any) -> Any:
    """K x K Pearson correlation of row profiles, from centred float64 values.

    Constant rows get correlation 0 with everything (and 1 with themselves).
    """
    xp = namespace(profiles)
    x = xp.asarray(profiles, dtype=xp.float64)
    xc = x - x.mean(axis=1, keepdims=True)
    norm = xp.sqrt((xc * xc).sum(axis=1))
    unit = xc / xp.where(norm > 0, norm, 1.0)[:, None]
    c = unit @ unit.T
    c = xp.clip(c, -1.0, 1.0)
    idx = xp.arange(x.shape[0])
    c[idx, idx] = 1.0
    return c

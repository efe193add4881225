"""The CMD per-block kernel: correlation with each mode reference, affine fit, residuals.

Everything is computed from centred float64 statistics of the block (ALGORITHM.md): the
float32 one-pass raw-moment formula of the research code loses all precision for weights
near 1.0 that move by 1e-4; centring in float64 does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.buffers import scratch
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
    "varying_rows",
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
    norm: Any  # (M,) sqrt(energy)
    unit: Any  # (M, Tw) centred / norm

    @classmethod
    def from_profiles(cls, profiles: Any) -> References:
        xp = namespace(profiles)
        raw = xp.asarray(profiles, dtype=xp.float64)
        mean = raw.mean(axis=1)
        centred = raw - mean[:, None]
        energy = (centred * centred).sum(axis=1)
        if bool(xp.any(energy <= 0)):
            raise ValueError("a reference profile is constant over the window")
        norm = xp.sqrt(energy)
        return cls(raw, mean, centred, energy, norm, centred / norm[:, None])

    def to(self, xp: Any) -> References:
        """The same references as arrays of ``xp`` (numpy or cupy)."""
        return References(
            *(
                xp.asarray(a)
                for a in (self.raw, self.mean, self.centred, self.energy, self.norm, self.unit)
            )
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
    spread: Any  # (S,) float64: sum over the window of (w - mean w)^2 (the dynamics' energy)
    flags: Any  # (S,) uint8
    residual_t: Any  # (Tw,) float64: residual summed over the block's valid rows, per epoch
    energy_t: Any  # (Tw,) float64: w^2 summed over the block's valid rows, per epoch
    spread_t: Any  # (Tw,) float64: (w - mean w)^2 summed over the block's valid rows, per epoch


_SUB_ROWS = 16384  # rows per inner step: the float64 work arrays stay cache-sized
_DENSE_MODES = 64  # up to this many modes, per-mode sums are one matmul
def fit_block(x: Any, refs: References, ref_rows: Any = None) -> BlockFit:
    """Fit every row of ``x`` (S, Tw) to its best-correlated reference.

    Parameters
    ----------
    x
        Trajectory rows over the window, float32 or float64 (numpy or cupy). A transposed
        view of a time-major (Tw, S) buffer is the fastest input.
    refs
        The mode references (same array library as ``x``).
    ref_rows
        Optional ``(row positions in x, mode ids)`` of rows that are references themselves:
        they get a = 1, b = 0 exactly (a reference reconstructs itself exactly).

    Returns
    -------
    BlockFit
        Mode ids (argmax of |corr|, ties to the lowest id), least-squares a and b against the
        raw reference profile, corr, residual energy, energy and centred energy ("spread",
        the denominator of the error relative to the dynamics), flags and per-epoch sums.

    Notes
    -----
    Per row, in float64: ``xc = x - mean``, ``ssx = |xc|^2``, ``cov = rc . xc`` against the
    centred references ``rc``; ``corr = cov / sqrt(ssx |rc|^2)``; ``a = cov / |rc|^2``,
    ``b = mean - a mean(r)``; the residual is ``ssx - a cov = ssx (1 - corr^2)`` (no
    reconstruction needed). Per epoch, the residual summed over rows is
    ``sum_i xc_it^2 - 2 sum_m rc_mt A_mt + sum_m rc_mt^2 C_m`` with ``A_mt = sum_(i in m) a_i xc_it``
    and ``C_m = sum_(i in m) a_i^2``. Constant rows (min == max) get a = 0, b = their value;
    rows with NaN/Inf get a = 0, b = NaN and are left out of the error sums.
    """
    xp = namespace(x)
    n_rows, n_t = x.shape
    xt = x.T  # (Tw, S); contiguous when x is a view of a time-major buffer
    n_modes = refs.centred.shape[0]
    mode = xp.empty(n_rows, dtype=xp.int64)
    a = xp.empty(n_rows, dtype=xp.float64)
    b = xp.empty(n_rows, dtype=xp.float64)
    corr = xp.empty(n_rows, dtype=xp.float64)
    residual = xp.empty(n_rows, dtype=xp.float64)
    energy = xp.empty(n_rows, dtype=xp.float64)
    spread = xp.empty(n_rows, dtype=xp.float64)
    flags = xp.zeros(n_rows, dtype=xp.uint8)
    residual_t = xp.zeros(n_t, dtype=xp.float64)
    energy_t = xp.zeros(n_t, dtype=xp.float64)
    spread_t = xp.zeros(n_t, dtype=xp.float64)
    rc = refs.centred
    ref_pos = ref_ids = None
    if ref_rows is not None:
        ref_pos = xp.asarray(ref_rows[0], dtype=xp.int64)
        ref_ids = xp.asarray(ref_rows[1], dtype=xp.int64)
    step = _SUB_ROWS if xp.__name__ == "numpy" else n_rows
    for s0 in range(0, n_rows, max(step, 1)):
        s1 = min(n_rows, s0 + step)
        sl = slice(s0, s1)
        src = xt[:, sl]
        # the float64 work block, reused across calls (fresh allocations cost page faults)
        xc = scratch("cmd-fit-block", n_t * (s1 - s0), np.float64, xp).reshape(n_t, s1 - s0)
        xc[...] = src
        hi = src.max(axis=0)
        lo = src.min(axis=0)
        total = xc.sum(axis=0)
        finite = xp.isfinite(total)
        constant = finite & (hi == lo)
        mean = xp.where(finite, total / n_t, 0.0)
        xc -= mean[None, :]
        bad = ~finite | constant
        if bool(bad.any()):
            xc[:, bad] = 0.0
        ssx = xp.einsum("ts,ts->s", xc, xc)
        # projections on the unit references: |corr| = |proj| / |xc|, so the argmax over modes
        # needs no per-mode division (ties go to the lowest id)
        proj = refs.unit @ xc  # (M, s)
        m = xp.argmax(xp.abs(proj), axis=0)
        cols = xp.arange(s1 - s0)
        proj_m = proj[m, cols]
        norm = xp.sqrt(ssx)
        a_s = proj_m / refs.norm[m]
        b_s = mean - a_s * refs.mean[m]
        c_s = xp.where(norm > 0, proj_m / xp.where(norm > 0, norm, 1.0), 0.0)
        res_s = xp.maximum(ssx - proj_m * proj_m, 0.0)
        if bool(bad.any()):
            a_s = xp.where(bad, 0.0, a_s)
            c_s = xp.where(bad, 0.0, c_s)
            res_s = xp.where(bad, 0.0, res_s)
            b_s = xp.where(constant, hi.astype(xp.float64), b_s)
            b_s = xp.where(finite, b_s, xp.nan)
            flags[sl] = xp.where(constant, FLAG_CONSTANT, xp.where(finite, 0, FLAG_NONFINITE)).astype(xp.uint8)
        if ref_pos is not None and ref_pos.size:
            inside = (ref_pos >= s0) & (ref_pos < s1)
            if bool(inside.any()):
                assert ref_ids is not None
                p = ref_pos[inside] - s0
                m[p] = ref_ids[inside]
                a_s[p] = 1.0
                b_s[p] = 0.0
                c_s[p] = 1.0
                res_s[p] = 0.0
                flags[sl][p] |= FLAG_REFERENCE
        # per-epoch sums, from the centred block (bad rows are zero there)
        sq_t = xp.einsum("ts,ts->t", xc, xc)
        if n_modes <= _DENSE_MODES or xp.__name__ != "numpy":  # one matmul against the one-hot of a
            onehot = xp.zeros((s1 - s0, n_modes), dtype=xp.float64)
            onehot[cols, m] = a_s
            amat = xc @ onehot
            cm = (onehot * onehot).sum(axis=0)
        else:  # many modes: sort rows by mode, then one segmented sum
            order = xp.argsort(m, kind="stable")
            ms = m[order]
            starts = xp.flatnonzero(xp.r_[True, ms[1:] != ms[:-1]])
            present = ms[starts]
            weighted = xc[:, order] * a_s[order][None, :]
            amat = xp.zeros((n_t, n_modes), dtype=xp.float64)
            amat[:, present] = xp.add.reduceat(weighted, starts, axis=1)
            cm = xp.zeros(n_modes, dtype=xp.float64)
            cm[present] = xp.add.reduceat(a_s[order] ** 2, starts)
        residual_t += xp.maximum(sq_t - 2 * (rc.T * amat).sum(axis=1) + (rc.T**2) @ cm, 0.0)
        good_mean = xp.where(bad & ~constant, 0.0, mean)
        if bool(constant.any()):
            good_mean = xp.where(constant, hi.astype(xp.float64), good_mean)
        energy_t += sq_t + 2 * (xc @ good_mean) + (good_mean**2).sum()
        spread_t += sq_t
        mode[sl] = m
        a[sl] = a_s
        b[sl] = b_s
        corr[sl] = c_s
        residual[sl] = res_s
        energy[sl] = ssx + n_t * good_mean**2
        spread[sl] = ssx
    return BlockFit(
        mode=mode,
        a=a,
        b=b,
        corr=corr,
        residual=residual,
        energy=energy,
        spread=spread,
        flags=flags,
        residual_t=residual_t,
        energy_t=energy_t,
        spread_t=spread_t,
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


def varying_rows(xt: Any) -> Any:
    """Which columns of a time-major block ``xt`` (Tw, S) vary and are finite over the window:
    the rows that carry a profile (constant rows and rows with NaN/Inf do not)."""
    xp = namespace(xt)
    with np.errstate(invalid="ignore"):
        return xp.isfinite(xt).all(axis=0) & (xt.max(axis=0) > xt.min(axis=0))

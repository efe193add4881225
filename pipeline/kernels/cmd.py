"""The CMD per-block kernel: correlation with each mode reference, affine fit, residuals.

Everything is computed from centred float64 statistics of the block (ALGORITHM.md): the
float32 one-pass raw-moment formula of the research code loses all precision for weights
near 1.0 that move by 1e-4; centring in float64 does not.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
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
    "anchor_rows",
    "fit_block",
    "group_sums",
    "pearson",
    "stored_coefficients",
    "varying_rows",
]

FLAG_CONSTANT = np.uint8(1)  #: zero variance over the window: a = 0, b = its value
FLAG_NONFINITE = np.uint8(2)  #: NaN/Inf in the window: a = 0, b = NaN, excluded from metrics
FLAG_REFERENCE = np.uint8(4)  #: a mode's reference: a = 1, b = 0 exactly
FLAG_SAMPLED = np.uint8(8)  #: one of the K sampled parameters


@dataclass(frozen=True)
class References:
    """The M reference profiles over the window, with their centred statistics (float64),
    and what the anchoring of the stored model needs (:func:`anchor_rows`)."""

    raw: Any  # (M, Tw) float64
    mean: Any  # (M,)
    centred: Any  # (M, Tw)
    energy: Any  # (M,) sum of squares of the centred profile
    norm: Any  # (M,) sqrt(energy)
    unit: Any  # (M, Tw) centred / norm
    sorted: Any  # (M, Tw) each profile's values in increasing order
    order: Any  # (M, Tw) int64: their window positions (a stable sort: equal values by epoch)
    anchor: Any  # (M,) int64: each reference's own anchor, the first epoch of its smallest |r|

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
        order = xp.argsort(raw, axis=1, kind="stable").astype(xp.int64)
        sorted_ = xp.take_along_axis(raw, order, axis=1)
        anchor = xp.argmin(xp.abs(raw), axis=1).astype(xp.int64)
        return cls(raw, mean, centred, energy, norm, centred / norm[:, None], sorted_, order, anchor)

    def to(self, xp: Any) -> References:
        """The same references as arrays of ``xp`` (numpy or cupy)."""
        return References(*(xp.asarray(getattr(self, f.name)) for f in fields(self)))


@dataclass(frozen=True)
class BlockFit:
    """Per-row results of one block and its mergeable error sums.

    The model of row i is ``w_i(t) ~ a_i r_m(t) + b_i``; the same line is also given as
    ``level_i + a_i (r_m(t) - r_m(anchor_i))``, anchored at the window position ``anchor_i``
    where the fitted value is smallest in magnitude (see :func:`anchor_rows`): the form a
    study stores in float32.
    """

    mode: Any  # (S,) int64
    a: Any  # (S,) float64
    b: Any  # (S,) float64
    anchor: Any  # (S,) int64: the anchor's window position
    level: Any  # (S,) float64: the fitted value a r_m(anchor) + b at the anchor
    corr: Any  # (S,) float64
    residual: Any  # (S,) float64: sum over the window of (w - a r - b)^2
    energy: Any  # (S,) float64: sum over the window of w^2 (the error metrics' denominator)
    spread: Any  # (S,) float64: sum over the window of (w - mean w)^2 (the dynamics' energy)
    flags: Any  # (S,) uint8
    residual_t: Any  # (Tw,) float64: residual summed over the block's valid rows, per epoch
    energy_t: Any  # (Tw,) float64: w^2 summed over the block's valid rows, per epoch
    spread_t: Any  # (Tw,) float64: (w - mean w)^2 summed over the block's valid rows, per epoch


def anchor_rows(mode: Any, a: Any, mean: Any, refs: References) -> tuple[Any, Any]:
    """Where to anchor each row's line, and the fitted value there.

    The fitted line of a row is ``y(t) = mean + a (r_m(t) - mean r_m)`` over the window. Its
    anchor is the window position where ``|y|`` is smallest (the fitted values' magnitude is
    convex in ``r``, so it is one of the two reference values next to the line's root
    ``mean r_m - mean / a``, found by a binary search in the sorted profile; ties go to the
    smaller reference value). Stored in float32 as ``level = y(anchor)`` and ``a``, the line
    ``level + a (r_m(t) - r_m(anchor))`` is within 1 float32 ulp of ``y(t)`` at every epoch of
    a row whose fitted values keep one sign over the window: the roundings of ``level`` and
    ``a`` add at most ``2^-24 (|level| + |y(t) - level|) = 2^-24 |y(t)|``.

    Parameters
    ----------
    mode, a, mean
        Per row: the mode, the slope and the row's mean over the window (float64).
    refs
        The references (same array library).

    Returns
    -------
    anchor, level
        The window position (int64) and the fitted value there (float64). Rows with ``a == 0``
        get position 0 and level ``mean`` (the caller overrides rows it fits otherwise).

    >>> import numpy as np
    >>> refs = References.from_profiles(np.array([[3.0, 1.0, 2.0, 4.0]]))
    >>> anchor, level = anchor_rows(np.zeros(2, dtype=np.int64), np.array([1.0, -2.0]),
    ...                             np.array([0.5, 0.1]), refs)
    >>> anchor.tolist(), level.tolist()  # y = r - 2: least |y| at r = 2; 5.1 - 2 r: at r = 3
    ([2, 0], [0.0, -0.9])
    """
    xp = namespace(a)
    n_t = int(refs.sorted.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        root = refs.mean[mode] - mean / a
    # lower bound: the number of sorted values of the row's reference below the root
    lo = xp.zeros(mode.shape, dtype=xp.int64)
    hi = xp.full(mode.shape, n_t, dtype=xp.int64)
    for _ in range(n_t.bit_length()):
        active = lo < hi
        mid = (lo + hi) // 2
        below = refs.sorted[mode, xp.minimum(mid, n_t - 1)] < root
        lo = xp.where(active & below, mid + 1, lo)
        hi = xp.where(active & ~below, mid, hi)
    p0 = xp.maximum(lo - 1, 0)
    p1 = xp.minimum(lo, n_t - 1)
    y0 = mean + a * (refs.sorted[mode, p0] - refs.mean[mode])
    y1 = mean + a * (refs.sorted[mode, p1] - refs.mean[mode])
    take1 = xp.abs(y1) < xp.abs(y0)
    pos = xp.where(take1, p1, p0)
    level = xp.where(take1, y1, y0)
    anchor = refs.order[mode, pos]
    flat = a == 0
    anchor = xp.where(flat, 0, anchor).astype(xp.int64)
    level = xp.where(flat, mean, level)
    return anchor, level


def _ordered(x32: Any) -> Any:
    """float32 values as integers in their order (adjacent floats differ by 1; -0 == +0)."""
    xp = namespace(x32)
    i = x32.view(xp.int32).astype(xp.int64)
    return xp.where(i < 0, -(i & 0x7FFFFFFF), i)


#: the float32 (a, level) pairs tried, in this order, for a line that crosses zero: the
#: nearest roundings first, then each one float32 step down or up (``-1``, ``+1``)
_STEPS = tuple((da, dl) for da in (0, -1, 1) for dl in (0, -1, 1))
_STORE_ROWS = 4096  # rows per step of the search: its (rows, Tw) work arrays stay small


def stored_coefficients(
    mode: Any, a: Any, level: Any, anchor: Any, refs: References
) -> tuple[Any, Any]:
    """The float32 ``a`` and ``level`` a study stores for the anchored lines
    ``level + a (r_m(t) - r_m(anchor))`` (float64 ``a`` and ``level``, from the fit).

    Each is the float32 nearest to the float64 value, which keeps the stored line within 1
    float32 ulp of the float64 one at every epoch whenever the fitted values keep their sign
    over the window (:func:`anchor_rows`). A line that crosses zero is bounded by 3 ulps only;
    for those, the pairs one float32 step away from the nearest (``a`` and ``level`` each
    down, equal or up: :data:`_STEPS`) are tried as well, and the first pair with the fewest
    ulps at its worst epoch (then the fewest epochs beyond 1 ulp) is kept: in every case
    measured, within 1 ulp at every epoch.

    The comparison is the stored line as read back (``float64(level) + float64(a) (r(t) -
    r(anchor))``, rounded to float32) against the float64 line rounded to float32.

    >>> import numpy as np
    >>> refs = References.from_profiles(np.array([[0.0, 1.0, 2.0]]))
    >>> a32, l32 = stored_coefficients(np.zeros(1, dtype=np.int64), np.array([1 / 3]),
    ...                                np.array([0.1]), np.zeros(1, dtype=np.int64), refs)
    >>> a32.dtype, l32.dtype, float(l32[0]) == float(np.float32(0.1))
    (dtype('float32'), dtype('float32'), True)
    """
    xp = namespace(a)
    a32 = a.astype(xp.float32)
    l32 = level.astype(xp.float32)
    m = mode.astype(xp.int64)
    lo = level + a * (refs.sorted[m, 0] - refs.raw[m, anchor])
    hi = level + a * (refs.sorted[m, -1] - refs.raw[m, anchor])
    rows = xp.flatnonzero(((lo < 0) & (hi > 0)) | ((lo > 0) & (hi < 0)))
    n_t = int(refs.raw.shape[1])
    for s0 in range(0, int(rows.size), _STORE_ROWS):
        idx = rows[s0 : s0 + _STORE_ROWS]
        mi = m[idx]
        moved = refs.raw[mi] - refs.raw[mi, anchor[idx]][:, None]  # (rows, Tw)
        want = _ordered((level[idx][:, None] + a[idx][:, None] * moved).astype(xp.float32))
        a0, l0 = a32[idx], l32[idx]
        best = None
        for da, dl in _STEPS:
            ca, cl = _step(a0, da), _step(l0, dl)
            got = cl.astype(xp.float64)[:, None] + ca.astype(xp.float64)[:, None] * moved
            far = xp.abs(_ordered(got.astype(xp.float32)) - want)
            score = far.max(axis=1) * (n_t + 1) + (far > 1).sum(axis=1)
            if best is None:  # the nearest roundings: rows within 1 ulp everywhere are done
                todo = score > n_t + 1
                if not bool(todo.any()):
                    break
                idx, moved, want, a0, l0 = idx[todo], moved[todo], want[todo], a0[todo], l0[todo]
                best = score[todo]
                continue
            better = score < best
            best = xp.where(better, score, best)
            a32[idx[better]] = ca[better]
            l32[idx[better]] = cl[better]
    return a32, l32


def _step(x32: Any, k: int) -> Any:
    """``x32`` moved ``k`` (-1, 0, 1) float32 values along the number line (through the
    integers of :func:`_ordered`: from -0 or +0 one step is the smallest subnormal)."""
    if k == 0:
        return x32
    xp = namespace(x32)
    o = _ordered(x32) + k
    bits = xp.where(o < 0, (-o) | 0x80000000, o).astype(xp.uint32)
    return bits.view(xp.float32)


_SUB_ROWS = 16384  # rows per inner step: the float64 work arrays stay cache-sized
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
        raw reference profile, the same line's anchor and level (:func:`anchor_rows`; a
        reference row: the epoch of its smallest |r|, and r there), corr, residual energy,
        energy and centred energy ("spread", the denominator of the error relative to the
        dynamics), flags and per-epoch sums.

    Notes
    -----
    Per row, in float64: ``xc = x - mean``, ``ssx = |xc|^2``, ``cov = rc . xc`` against the
    centred references ``rc``; ``corr = cov / sqrt(ssx |rc|^2)``; ``a = cov / |rc|^2``,
    ``b = mean - a mean(r)``; the residual is ``ssx - a cov = ssx (1 - corr^2)`` (no
    reconstruction needed). Per epoch, the residual summed over rows is
    ``sum_i (xc_it - a_i rc_(m_i)t)^2``, summed directly (its expansion per mode, ``sum_i
    xc_it^2 - 2 sum_m rc_mt A_mt + ...``, loses every digit when the rows follow their modes
    closely: the residual falls below the rounding of ``sum xc^2``). Constant rows (min ==
    max) get a = 0, b = their value; rows with NaN/Inf get a = 0, b = NaN and are left out of
    the error sums.
    """
    xp = namespace(x)
    n_rows, n_t = x.shape
    xt = x.T  # (Tw, S); contiguous when x is a view of a time-major buffer
    mode = xp.empty(n_rows, dtype=xp.int64)
    a = xp.empty(n_rows, dtype=xp.float64)
    b = xp.empty(n_rows, dtype=xp.float64)
    anchor = xp.empty(n_rows, dtype=xp.int64)
    level = xp.empty(n_rows, dtype=xp.float64)
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
        # rows with a = 0 (constant, NaN/Inf, or orthogonal to every reference) are level b
        anc_s, lev_s = anchor_rows(m, a_s, xp.where(a_s == 0, b_s, mean), refs)
        if ref_pos is not None and ref_pos.size:
            inside = (ref_pos >= s0) & (ref_pos < s1)
            if bool(inside.any()):
                assert ref_ids is not None
                p = ref_pos[inside] - s0
                m[p] = ref_ids[inside]
                a_s[p] = 1.0
                b_s[p] = 0.0
                c_s[p] = 1.0
                anc_s[p] = refs.anchor[m[p]]
                lev_s[p] = refs.raw[m[p], anc_s[p]]
                res_s[p] = 0.0
                flags[sl][p] |= FLAG_REFERENCE
        # per-epoch sums, from the centred block (bad rows are zero there)
        sq_t = xp.einsum("ts,ts->t", xc, xc)
        good_mean = xp.where(bad & ~constant, 0.0, mean)
        if bool(constant.any()):
            good_mean = xp.where(constant, hi.astype(xp.float64), good_mean)
        energy_t += sq_t + 2 * (xc @ good_mean) + (good_mean**2).sum()
        spread_t += sq_t
        # the residual per epoch, summed directly: xc becomes xc - a rc_m (bad rows: a = 0)
        fitted = scratch("cmd-fit-fitted", n_t * (s1 - s0), np.float64, xp).reshape(n_t, s1 - s0)
        xp.take(rc.T, m, axis=1, out=fitted)
        fitted *= a_s[None, :]
        xc -= fitted
        residual_t += xp.einsum("ts,ts->t", xc, xc)
        mode[sl] = m
        a[sl] = a_s
        b[sl] = b_s
        anchor[sl] = anc_s
        level[sl] = lev_s
        corr[sl] = c_s
        residual[sl] = res_s
        energy[sl] = ssx + n_t * good_mean**2
        spread[sl] = ssx
    return BlockFit(
        mode=mode,
        a=a,
        b=b,
        anchor=anchor,
        level=level,
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


#: the sums :func:`group_sums` takes per group, in this order
GROUP_SUMS = ("count", "valid", "abs_corr", "residual", "energy", "nonfinite", "spread")


def group_sums(
    groups: Any,
    n: int,
    flags: Any,
    corr: Any,
    residual: Any,
    energy: Any,
    spread: Any,
) -> np.ndarray:
    """(n, 7) float64 sums over the rows of each group id in ``groups`` (:data:`GROUP_SUMS`):
    rows, valid rows (neither constant nor NaN/Inf), ``|corr|`` over the valid rows,
    ``residual``, ``energy``, NaN/Inf rows and ``spread``; each sum taken in row order
    (numpy's ``bincount``), so the compiled twin
    :func:`pipeline.kernels.cmd_numba.group_sums_fused` gives the same bits."""
    groups = np.asarray(groups)
    flags = np.asarray(flags)
    valid = (flags & (FLAG_CONSTANT | FLAG_NONFINITE)) == 0
    nonfinite = (flags & FLAG_NONFINITE) != 0
    out = np.zeros((n, len(GROUP_SUMS)))
    out[:, 0] = np.bincount(groups, minlength=n)
    out[:, 1] = np.bincount(groups, weights=valid.astype(np.float64), minlength=n)
    out[:, 2] = np.bincount(groups, weights=np.where(valid, np.abs(corr), 0.0), minlength=n)
    out[:, 3] = np.bincount(groups, weights=residual, minlength=n)
    out[:, 4] = np.bincount(groups, weights=energy, minlength=n)
    out[:, 5] = np.bincount(groups, weights=nonfinite.astype(np.float64), minlength=n)
    out[:, 6] = np.bincount(groups, weights=spread, minlength=n)
    return out

"""Exact recursive least squares for Online CMD: per-parameter centred running statistics.

With the modes and references fixed after the warm-up, each parameter's fit over the window
``[start, t]`` is the least-squares solution of ``w_i(s) ~ a_i r_m(s) + b_i``:
``a_i = C_i / Q_m`` and ``b_i = mean(w_i) - a_i mean(r_m)``, where ``C_i`` is the co-moment of
``w_i`` and ``r_m`` and ``Q_m`` the second central moment of ``r_m``. Both are updated one epoch
at a time with Welford's centred updates in float64 (no raw-moment cancellation), so after every
epoch ``(a, b)`` equal a batch refit on the same window to rounding. Memory: two float64 per
parameter and the mode id; no history. numpy or cupy, chosen by the inputs.

**NaN/Inf.** A row can be skipped at an update (``skip``): its sums stay exactly as they were,
so a non-finite value never enters them. Its sums then no longer cover the same epochs as the
references' statistics, so its fit is not read from them any more: the caller holds the row's
last finite ``(a, b)`` (:mod:`pipeline.online`). :func:`nonfinite_rows` finds the rows of a
recorded window that hold NaN/Inf, and each one's last finite value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.compat import namespace

__all__ = [
    "RunningFit",
    "coefficients_rows",
    "init_rows",
    "nonfinite_rows",
    "reference_stats",
    "step_references",
    "update_rows",
]

_STEP = 1 << 20  # elements per inner step: temporaries stay bounded whatever N is


@dataclass
class RunningFit:
    """Centred running sums of every parameter against its mode's reference."""

    n: int  # epochs in the window so far
    mean_r: Any  # (M,) float64
    m2_r: Any  # (M,) float64: sum over the window of (r - mean_r)^2
    mean_w: Any  # (N,) float64
    c_rw: Any  # (N,) float64: sum over the window of (r_mode - mean_r)(w - mean_w)
    mode: Any  # (N,) unsigned or signed integer mode ids

    @classmethod
    def from_history(cls, w: Any, r: Any, mode: Any) -> RunningFit:
        """Initialise from a recorded window: ``w`` (N, T) trajectories, ``r`` (M, T) the
        references over the same epochs, ``mode`` (N,). Two-pass centred, float64."""
        xp = namespace(w)
        mode = xp.asarray(mode)
        if mode.dtype.kind not in "ui":
            raise TypeError(f"mode must be an integer array, got {mode.dtype}")
        mean_r, m2_r, rc = reference_stats(r)
        big_n = int(w.shape[0])
        mean_w = xp.empty(big_n, dtype=xp.float64)
        c_rw = xp.empty(big_n, dtype=xp.float64)
        for s0 in range(0, big_n, _STEP):
            s1 = min(big_n, s0 + _STEP)
            mean_w[s0:s1], c_rw[s0:s1] = init_rows(w[s0:s1], rc, mode[s0:s1])
        return cls(int(w.shape[1]), mean_r, m2_r, mean_w, c_rw, mode)

    def update(self, w: Any, r: Any, skip: Any = None) -> None:
        """Add one epoch: ``w`` (N,) the parameters, ``r`` (M,) the references, in place.
        Rows where ``skip`` (N,) bool is true keep their sums unchanged (see the module
        docstring); the references must be finite."""
        dr, new_mean_r, new_m2_r = step_references(self.mean_r, self.m2_r, self.n, r)
        n1 = self.n + 1
        big_n = int(self.mean_w.shape[0])
        for s0 in range(0, big_n, _STEP):
            s1 = min(big_n, s0 + _STEP)
            update_rows(
                self.mean_w[s0:s1], self.c_rw[s0:s1], self.mode[s0:s1], w[s0:s1], dr, n1,
                None if skip is None else skip[s0:s1],
            )
        self.mean_r, self.m2_r, self.n = new_mean_r, new_m2_r, n1

    def coefficients(self, start: int = 0, stop: int | None = None) -> tuple[Any, Any]:
        """``(a, b)`` of rows ``[start, stop)``: the least-squares fit over the window.

        A reference whose profile is constant so far gives a = 0 (b = the mean) to its mode.
        """
        sl = slice(start, stop)
        return coefficients_rows(self.mean_w[sl], self.c_rw[sl], self.mode[sl], self.mean_r, self.m2_r)


# ---------------------------------------------------------------------- row-block kernels
def reference_stats(r: Any) -> tuple[Any, Any, Any]:
    """Mean, second central moment and centred profiles of the references ``r`` (M, T)."""
    xp = namespace(r)
    r64 = xp.asarray(r, dtype=xp.float64)
    mean_r = r64.mean(axis=1)
    rc = r64 - mean_r[:, None]
    return mean_r, (rc * rc).sum(axis=1), rc


def init_rows(w: Any, rc: Any, mode: Any) -> tuple[Any, Any]:
    """Mean and co-moment with the centred reference of each row of ``w`` (rows, T)."""
    xp = namespace(w)
    x = xp.asarray(w, dtype=xp.float64)
    mu = x.mean(axis=1)
    return mu, ((x - mu[:, None]) * rc[mode]).sum(axis=1)


def step_references(mean_r: Any, m2_r: Any, n: int, r: Any) -> tuple[Any, Any, Any]:
    """One epoch of the per-mode statistics: ``(r - old mean, new mean, new M2)``."""
    xp = namespace(mean_r)
    r64 = xp.asarray(r, dtype=xp.float64)
    dr = r64 - mean_r
    new_mean = mean_r + dr / (n + 1)
    return dr, new_mean, m2_r + dr * (r64 - new_mean)


def update_rows(
    mean_w: Any, c_rw: Any, mode: Any, w: Any, dr: Any, n1: int, skip: Any = None
) -> None:
    """Welford's update of a block of rows, in place: ``n1`` is the new epoch count. Rows
    where ``skip`` is true are left exactly as they are (their ``w`` is never read: it may be
    NaN/Inf)."""
    xp = namespace(mean_w)
    x = xp.asarray(w, dtype=xp.float64)
    if skip is not None:
        # x = mean_w makes both increments exactly zero (mean_w is finite: the caller zeroes
        # the sums of rows that held NaN/Inf over the warm-up)
        x = xp.where(skip, mean_w, x)
    mean_w += (x - mean_w) / n1
    # co-moment: (r - old mean_r) * (w - new mean_w)
    c_rw += dr[mode] * (x - mean_w)


def nonfinite_rows(w: Any) -> tuple[Any, Any]:
    """Rows of ``w`` (rows, T) holding NaN/Inf: their indices (int64, sorted) and each one's
    last finite value (float64; NaN if the row is never finite)."""
    xp = namespace(w)
    fin = xp.isfinite(w)
    idx = xp.flatnonzero(~fin.all(axis=1)).astype(xp.int64)
    if idx.size == 0:
        return idx, xp.empty(0, dtype=xp.float64)
    sub = fin[idx]
    last = sub.shape[1] - 1 - xp.argmax(sub[:, ::-1], axis=1)
    vals = xp.asarray(w[idx, last], dtype=xp.float64)
    return idx, xp.where(sub.any(axis=1), vals, xp.nan)


def coefficients_rows(mean_w: Any, c_rw: Any, mode: Any, mean_r: Any, m2_r: Any) -> tuple[Any, Any]:
    """``(a, b)`` of a block of rows from its running statistics."""
    xp = namespace(mean_w)
    q = m2_r[mode]
    a = xp.where(q > 0, c_rw / xp.where(q > 0, q, 1.0), 0.0)
    return a, mean_w - a * mean_r[mode]

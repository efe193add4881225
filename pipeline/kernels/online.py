"""Exact recursive least squares for Online CMD: per-parameter centred running statistics.

With the modes and references fixed after the warm-up, each parameter's fit over the window
``[start, t]`` is the least-squares solution of ``w_i(s) ~ a_i r_m(s) + b_i``:
``a_i = C_i / Q_m`` and ``b_i = mean(w_i) - a_i mean(r_m)``, where ``C_i`` is the co-moment of
``w_i`` and ``r_m`` and ``Q_m`` the second central moment of ``r_m``. Both are updated one epoch
at a time with Welford's centred updates in float64 (no raw-moment cancellation), so after every
epoch ``(a, b)`` equal a batch refit on the same window to rounding. Memory: two float64 per
parameter and the mode id; no history. numpy or cupy, chosen by the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.compat import namespace

__all__ = ["RunningFit"]

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
        n = int(w.shape[1])
        r64 = xp.asarray(r, dtype=xp.float64)
        mean_r = r64.mean(axis=1)
        rc = r64 - mean_r[:, None]
        m2_r = (rc * rc).sum(axis=1)
        mode = xp.asarray(mode)
        if mode.dtype.kind not in "ui":
            raise TypeError(f"mode must be an integer array, got {mode.dtype}")
        big_n = int(w.shape[0])
        mean_w = xp.empty(big_n, dtype=xp.float64)
        c_rw = xp.empty(big_n, dtype=xp.float64)
        for s0 in range(0, big_n, _STEP):
            s1 = min(big_n, s0 + _STEP)
            x = xp.asarray(w[s0:s1], dtype=xp.float64)
            mu = x.mean(axis=1)
            mean_w[s0:s1] = mu
            c_rw[s0:s1] = ((x - mu[:, None]) * rc[mode[s0:s1]]).sum(axis=1)
        return cls(n, mean_r, m2_r, mean_w, c_rw, mode)

    def update(self, w: Any, r: Any) -> None:
        """Add one epoch: ``w`` (N,) the parameters, ``r`` (M,) the references, in place."""
        xp = namespace(self.mean_w)
        n1 = self.n + 1
        r64 = xp.asarray(r, dtype=xp.float64)
        dr = r64 - self.mean_r  # deviation from the old mean
        new_mean_r = self.mean_r + dr / n1
        big_n = int(self.mean_w.shape[0])
        for s0 in range(0, big_n, _STEP):
            s1 = min(big_n, s0 + _STEP)
            x = xp.asarray(w[s0:s1], dtype=xp.float64)
            mw = self.mean_w[s0:s1]
            mw += (x - mw) / n1
            # Welford's co-moment: (r - old mean_r) * (w - new mean_w)
            self.c_rw[s0:s1] += dr[self.mode[s0:s1]] * (x - mw)
        self.m2_r += dr * (r64 - new_mean_r)
        self.mean_r = new_mean_r
        self.n = n1

    def coefficients(self, start: int = 0, stop: int | None = None) -> tuple[Any, Any]:
        """``(a, b)`` of rows ``[start, stop)``: the least-squares fit over the window.

        A reference whose profile is constant so far gives a = 0 (b = the mean) to its mode.
        """
        xp = namespace(self.mean_w)
        sl = slice(start, stop)
        m = self.mode[sl]
        q = self.m2_r[m]
        a = xp.where(q > 0, self.c_rw[sl] / xp.where(q > 0, q, 1.0), 0.0)
        b = self.mean_w[sl] - a * self.mean_r[m]
        return a, b

"""The statistics of the reproduction and its one verdict rule.

Owns the per-test summary over training seeds (:func:`summarise`: mean, two-sided 95%
Student-t interval, a one-sided paired t-test and a Wilcoxon signed-rank test against the
threshold), the verdict of one test (:func:`verdict`), how the verdicts of a claim's tests
combine (:func:`combine`), and the constants they use (:data:`MARGIN`, :data:`CONFIDENCE`).
Nothing here knows about training, stores or claims.

The rule (:data:`RULE`): a test has per-seed values ``d_s`` (a paired difference between two
arms measured on the same training seed, or a measured share) and a threshold ``theta``
fixed by the claim's wording alone. The test is *supported* when the 95% interval of the
mean of ``d_s`` lies entirely above ``theta``, *contradicted* when it lies entirely below,
and *not supported* otherwise (also with fewer than two seeds, or non-finite values).

>>> s = summarise([0.02, 0.03, 0.025, 0.028, 0.022], threshold=-MARGIN)
>>> round(s.mean, 4), s.verdict
(0.025, 'supported')
>>> summarise([-0.05, -0.04, -0.06], threshold=-MARGIN).verdict
'contradicted'
>>> summarise([0.05, -0.05, 0.01], threshold=-MARGIN).verdict
'not supported'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

__all__ = [
    "CONFIDENCE",
    "CONTRADICTED",
    "MARGIN",
    "NOT_RUN",
    "NOT_SUPPORTED",
    "RULE",
    "SUPPORTED",
    "VERDICTS",
    "Summary",
    "combine",
    "summarise",
    "t_interval",
    "verdict",
]

#: The one margin of every accuracy claim: one percentage point of test accuracy. A claim
#: worded "at least as good as", "matches", "keeps", "competitive with" has the threshold
#: ``-MARGIN`` on (model - baseline); a claim worded "loses", "fails" has ``+MARGIN`` on
#: (baseline - model); "better", "more stable", "saves" has 0. Fixed here for all claims.
MARGIN = 0.01
#: The confidence of the two-sided Student-t interval of a test's mean.
CONFIDENCE = 0.95

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
CONTRADICTED = "contradicted"
#: Verdicts a test or a claim can get from the numbers.
VERDICTS = (SUPPORTED, NOT_SUPPORTED, CONTRADICTED)
#: The verdict of a claim whose measurements were not made (always with a reason).
NOT_RUN = "not run"

RULE = (
    "Each test has one value d_s per training seed s: a paired difference between two arms "
    "measured on the same seed (same data, same initialisation, same test set), or a "
    "measured share. Over the n seeds: the mean of d_s and its two-sided "
    f"{CONFIDENCE:.0%} Student-t interval mean ± t(0.975, n-1) · sd/√n (sd with ddof=1). "
    "The test is SUPPORTED if the whole interval lies above its threshold θ, CONTRADICTED "
    "if the whole interval lies below θ, NOT SUPPORTED otherwise (and whenever n < 2 or a "
    "value is not finite). θ follows from the claim's wording only, with one margin "
    f"MARGIN = {MARGIN} (test accuracy) for all claims: 'at least as good / matches / keeps "
    "/ competitive' → θ = −MARGIN on (model − baseline); 'loses / fails' → θ = +MARGIN on "
    "(baseline − model); 'better / more stable / saves' → θ = 0; a share claimed to hold "
    "for 'most' → θ = 0.5; 'nearly invariant' → two one-sided tests, d > −MARGIN and "
    "−d > −MARGIN. A claim is SUPPORTED if all its tests are, CONTRADICTED if any is, NOT "
    "SUPPORTED otherwise; supplementary tests are shown but not counted. The paired "
    "one-sided t-test and Wilcoxon signed-rank p-values (H1: mean d > θ) are reported "
    "beside the interval; the verdict uses the interval only (its lower bound above θ is "
    "the one-sided t-test at 2.5%)."
)


def _finite(values: Sequence[float]) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def t_interval(
    values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval ``(mean, lo, hi)`` of ``values``.

    NaN bounds with fewer than two values; a zero-width interval when all are equal.

    >>> m, lo, hi = t_interval([1.0, 2.0, 3.0])
    >>> m, round(lo, 3), round(hi, 3)
    (2.0, -0.484, 4.484)
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    n = x.size
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def verdict(lo: float, hi: float, threshold: float) -> str:
    """The verdict of one test from its interval ``[lo, hi]`` and threshold (see :data:`RULE`).

    >>> verdict(0.1, 0.2, 0.0), verdict(-0.2, -0.1, 0.0), verdict(-0.1, 0.1, 0.0)
    ('supported', 'contradicted', 'not supported')
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return NOT_SUPPORTED
    if lo > threshold:
        return SUPPORTED
    if hi < threshold:
        return CONTRADICTED
    return NOT_SUPPORTED


def combine(verdicts: Iterable[str]) -> str:
    """A claim's verdict from its tests': all supported, any contradicted, else not supported.

    >>> combine(["supported", "supported"]), combine(["supported", "contradicted"])
    ('supported', 'contradicted')
    >>> combine(["supported", "not supported"]), combine([])
    ('not supported', 'not supported')
    """
    vs = list(verdicts)
    if not vs:
        return NOT_SUPPORTED
    if CONTRADICTED in vs:
        return CONTRADICTED
    if all(v == SUPPORTED for v in vs):
        return SUPPORTED
    return NOT_SUPPORTED


@dataclass(frozen=True)
class Summary:
    """One test's numbers over the training seeds (see :func:`summarise`)."""

    n: int
    mean: float
    sd: float
    lo: float
    hi: float
    threshold: float
    t_p: float | None  # one-sided paired t-test of mean d > threshold
    wilcoxon_p: float | None  # one-sided Wilcoxon signed-rank test of d - threshold > 0
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


def _p_values(x: np.ndarray, threshold: float) -> tuple[float | None, float | None]:
    from scipy import stats

    if x.size < 2:
        return None, None
    d = x - threshold
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    if se == 0.0:
        t_p = 0.0 if d.mean() > 0 else 1.0
    else:
        t_p = float(stats.t.sf(float(d.mean()) / se, d.size - 1))
    if np.all(d == 0):
        return t_p, None
    w_p = float(stats.wilcoxon(d, alternative="greater", zero_method="wilcox").pvalue)
    return t_p, w_p


def summarise(values: Sequence[float], threshold: float, *, band: bool = False) -> Summary:
    """Mean, 95% t-interval, p-values and verdict of one test's per-seed values.

    With ``band`` ("nearly invariant"), the threshold ``-m`` (negative) is applied on both
    sides: the rule on ``d`` against ``-m`` and on ``-d`` against ``-m`` (two one-sided
    tests), combined by :func:`combine`; the p-values are the larger of the two sides'.

    >>> summarise([0.001, -0.002, 0.0], -MARGIN, band=True).verdict
    'supported'
    >>> summarise([0.05, 0.04, 0.045], -MARGIN, band=True).verdict
    'contradicted'
    """
    if band:
        if not threshold < 0:
            raise ValueError("a band test takes a negative threshold -m")
        low = summarise(values, threshold)
        high = summarise([-float(v) for v in values], threshold)
        ps = [(low.t_p, high.t_p), (low.wilcoxon_p, high.wilcoxon_p)]
        t_p, w_p = (None if None in pair else max(pair) for pair in ps)  # type: ignore[type-var]
        return replace(low, t_p=t_p, wilcoxon_p=w_p, verdict=combine([low.verdict, high.verdict]))
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0 or not _finite(list(x)):
        nan = math.nan
        return Summary(n, nan, nan, nan, nan, threshold, None, None, NOT_SUPPORTED)
    mean, lo, hi = t_interval(x)
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    t_p, w_p = _p_values(x, threshold)
    return Summary(n, mean, sd, lo, hi, threshold, t_p, w_p, verdict(lo, hi, threshold))

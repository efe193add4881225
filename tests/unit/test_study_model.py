"""The stored form of a study's model (version 2): each line anchored at the epoch of its
smallest fitted value, ``level + a (r(t) - r(anchor))`` in float32, against direct float64
formulas: which epoch is the anchor, the float32 bound it gives (1 ulp where the fitted values
keep their sign, 3 where they cross zero, then the choice of roundings that brings those to 1
ulp in all but a few values) against the intercept form ``a r + b`` in float32, and the bytes
per parameter of the layouts."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ulp_distance

from pipeline.kernels import cmd_numba
from pipeline.kernels.cmd import References, anchor_rows, fit_block, stored_coefficients
from pipeline.kernels.reconstruct import reconstruct_block
from pipeline.store.analysis import StudyLayout


def _refs(rng: np.random.Generator, m: int, t: int) -> np.ndarray:
    """Reference profiles as a float32 trajectory holds them: some near 0, some on large
    offsets (LayerNorm-like weights near 1 moving by 1e-3), some with repeated values."""
    raw = rng.standard_normal((m, t)).cumsum(axis=1) * 0.1
    raw[1] = 1.0 + 1e-3 * raw[1]
    raw[2, ::3] = raw[2, 0]  # equal values at several epochs
    return raw.astype(np.float32).astype(np.float64)


def _lines(rng: np.random.Generator, raw: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Random lines ``a (r_m(t) - root)`` on the references: slopes over 6 decades of both
    signs, roots from well below to well above the reference's range (so the fitted values
    go from far from zero to across it), and their values at every epoch computed without
    cancellation (``r - root`` is exact or relatively accurate to float64 rounding: the
    oracle itself must not cancel)."""
    m = rng.integers(raw.shape[0], size=n)
    a = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-3, 3, n)
    r = raw[m]
    lo, hi = r.min(axis=1), r.max(axis=1)
    root = lo + (hi - lo) * rng.uniform(-2.0, 3.0, n)
    line = a[:, None] * (r - root[:, None])
    return m, a, root, line


def _anchored(m: np.ndarray, a: np.ndarray, root: np.ndarray, raw: np.ndarray, refs: References):
    mean = a * (raw.mean(axis=1)[m] - root)  # the line's mean over the window
    return anchor_rows(m, a, mean, refs)


def test_the_anchor_is_the_epoch_of_the_smallest_fitted_value() -> None:
    rng = np.random.default_rng(0)
    raw = _refs(rng, 4, 23)
    refs = References.from_profiles(raw)
    m, a, root, line = _lines(rng, raw, 20_000)
    anchor, level = _anchored(m, a, root, raw, refs)
    least = np.abs(line).min(axis=1)
    got = np.abs(line[np.arange(m.size), anchor])
    # the least |fitted value|, to float64 rounding of the line (never a float tie's choice)
    scale = np.abs(a) * (np.abs(raw[m]).max(axis=1) + np.abs(root))
    assert np.all(got <= least + 1e-14 * scale)
    np.testing.assert_allclose(level, line[np.arange(m.size), anchor], rtol=1e-12, atol=1e-14 * scale.max())
    # a = 0: position 0, the level is the mean
    a0, l0 = anchor_rows(m[:3], np.zeros(3), np.array([1.5, -2.0, 0.0]), refs)
    assert a0.tolist() == [0, 0, 0] and l0.tolist() == [1.5, -2.0, 0.0]


@pytest.mark.skipif(not cmd_numba.available(), reason="needs numba")
def test_both_kernels_anchor_alike() -> None:
    """The fused kernel's anchors and levels are the numpy kernel's (repeated reference
    values included), except where two epochs' fitted values tie to rounding."""
    rng = np.random.default_rng(3)
    raw = _refs(rng, 4, 12)
    refs = References.from_profiles(raw)
    _m, _a, _root, line = _lines(rng, raw, 5000)
    x = (line + 1e-3 * rng.standard_normal(line.shape)).astype(np.float32)
    x[:10] = raw[0]  # rows equal to a reference with repeated values
    x[10:20] = raw[2]
    want = fit_block(x, refs)
    got = cmd_numba.fit_block_fused(np.ascontiguousarray(x.T), refs)
    assert np.array_equal(got.mode, want.mode)
    fitted = want.a[:, None] * raw[want.mode] + want.b[:, None]
    rows = np.arange(x.shape[0])
    moved = got.anchor != want.anchor
    yg, yw = np.abs(fitted[rows, got.anchor]), np.abs(fitted[rows, want.anchor])
    assert moved.mean() < 1e-3 and np.all(np.abs(yg - yw)[moved] <= 1e-12 * np.abs(fitted).max())
    np.testing.assert_allclose(got.level[~moved], want.level[~moved], rtol=1e-9, atol=1e-12)


def test_references_anchor_at_their_smallest_value_and_rebuild_exactly() -> None:
    rng = np.random.default_rng(1)
    raw = _refs(rng, 3, 17)
    refs = References.from_profiles(raw)
    assert np.array_equal(refs.anchor, np.argmin(np.abs(raw), axis=1))
    assert np.array_equal(refs.sorted, np.sort(raw, axis=1))
    x = np.vstack([raw, raw[:1] * 2 + 1]).astype(np.float32)
    got = fit_block(x, refs, (np.arange(3), np.arange(3)))
    assert np.array_equal(got.anchor[:3], refs.anchor)
    assert np.array_equal(got.level[:3], raw[np.arange(3), refs.anchor])
    rec = reconstruct_block(
        got.mode[:3], got.a[:3].astype(np.float32), got.level[:3].astype(np.float32), raw,
        slice(None), got.anchor[:3],
    ).astype(np.float32)
    assert np.array_equal(rec.view(np.uint32), x[:3].view(np.uint32))


@pytest.mark.parametrize(("seed", "n_t"), [(0, 31), (1, 7), (2, 100)])
def test_the_stored_float32_lines_are_within_one_ulp(seed: int, n_t: int) -> None:
    """Exact lines, their float64 values rounded to float32, against the float32 anchored
    form (nearest roundings: proven 1 ulp where the line keeps its sign, 3 where it crosses
    zero; :func:`stored_coefficients`: one step either way tried where that is not enough),
    and against the float32 intercept form a r + b (what a naive float32 study stores)."""
    rng = np.random.default_rng(seed)
    raw = _refs(rng, 4, n_t)
    refs = References.from_profiles(raw)
    m, a, root, line = _lines(rng, raw, 20_000)
    anchor, level = _anchored(m, a, root, raw, refs)
    want = line.astype(np.float32)
    crossing = (line.min(axis=1) < 0) & (line.max(axis=1) > 0)

    def ulps(a32: np.ndarray, l32: np.ndarray, anchored: bool = True) -> np.ndarray:
        at = anchor if anchored else None
        rec = reconstruct_block(m, a32, l32, raw, slice(None), at).astype(np.float32)
        return ulp_distance(rec, want)

    nearest = ulps(a.astype(np.float32), level.astype(np.float32))
    assert nearest[~crossing].max() <= 1 and nearest[crossing].max() <= 3
    a32, l32 = stored_coefficients(m, a, level, anchor, refs)
    far = ulps(a32, l32)
    assert far[~crossing].max() <= 1 and far.max() <= 2
    assert (far > 1).mean() <= (nearest > 1).mean() / 10 and (far > 1).mean() < 1e-5
    # the compiled version gives the same bits
    if cmd_numba.available():
        b32, m32 = cmd_numba.stored_coefficients_fused(m, a, level, anchor, refs)
        assert np.array_equal(b32.view(np.uint32), a32.view(np.uint32))
        assert np.array_equal(m32.view(np.uint32), l32.view(np.uint32))
    # the intercept form cancels: far more values off, by far more
    b = (-a * root).astype(np.float32)
    naive = ulps(a.astype(np.float32).astype(np.float64), b.astype(np.float64), anchored=False)
    assert naive[~crossing].max() > 100 and (naive > 1).mean() > 0.1


@pytest.mark.parametrize(
    ("layout", "n_modes", "n_window", "nbytes"),
    [
        (StudyLayout(2, False), 10, 100, 11),
        (StudyLayout(2, False), 256, 256, 11),
        (StudyLayout(2, False), 10, 257, 12),
        (StudyLayout(2, False), 257, 6, 12),
        (StudyLayout(2, True), 10, 6, 19),
        (StudyLayout(1, True), 10, 6, 26),
    ],
)
def test_bytes_per_parameter(layout: StudyLayout, n_modes: int, n_window: int, nbytes: int) -> None:
    """The default study stores at most 12 B per parameter up to 256 modes (the trajectory:
    4 T), the version-1 layout 26."""
    kinds = layout.per_row(n_modes, n_window)
    assert layout.bytes_per_row(n_modes, n_window) == sum(d.itemsize for d in kinds.values()) == nbytes
    assert set(kinds) >= set(layout.model) | {"flags"}
    assert ("corr" in kinds) == ("residual" in kinds) == layout.diagnostics

"""The fused numba kernel (:func:`fit_block_fused`) against the numpy kernel (:func:`fit_block`)
and against direct float64 formulas written from the paper, on random and planted blocks with
the traps of ALGORITHM.md (NaN/Inf rows, constant rows, a row of zeros, reference rows, weights
near 1.0 moving by 1e-4), several sub-blocks with a short last one, float16/bfloat16 inputs and
run-to-run determinism."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import F_CONSTANT, F_NONFINITE, F_REFERENCE

pytest.importorskip("numba")

from pipeline.kernels import cmd_numba
from pipeline.kernels.cmd import BlockFit, References, fit_block
from pipeline.kernels.cmd_numba import SUB_ROWS, fit_block_fused

FIELDS = ("mode", "a", "b", "anchor", "level", "corr", "residual", "energy", "spread", "flags")
PER_EPOCH = ("residual_t", "energy_t", "spread_t")
#: |corr| of a row's best two modes this close (relative) are a float tie: either is right
TIE = 1e-9
RTOL = 1e-10


# --------------------------------------------------------------------------- blocks
def planted_block(
    n_t: int, n_s: int, n_m: int, dtype=np.float32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """A time-major block (Tw, S) and its M reference profiles (float64 of the block's values).

    Rows: affine images of a reference plus noise, pure noise, the precision trap (near 1.0,
    moving by 1e-4), NaN / +Inf / -Inf rows, constant rows, a row of zeros, and one row per
    reference holding that reference (given back as ``ref_rows``)."""
    rng = np.random.default_rng(seed)
    refs = np.cumsum(rng.standard_normal((n_m, n_t)), axis=1) + rng.standard_normal((n_m, 1))
    mode = rng.integers(0, n_m, n_s)
    a = rng.standard_normal(n_s) * 2.0
    b = rng.standard_normal(n_s)
    x = a[:, None] * refs[mode] + b[:, None] + 1e-2 * rng.standard_normal((n_s, n_t))
    noise = rng.random(n_s) < 0.2
    x[noise] = rng.standard_normal((int(noise.sum()), n_t)) * 3.0
    trap = rng.random(n_s) < 0.1  # weights near 1.0 moving by 1e-4
    x[trap] = 1.0 + 1e-4 * (
        rng.choice([-1.0, 1.0], (int(trap.sum()), 1)) * refs[mode[trap]]
        + 0.05 * rng.standard_normal((int(trap.sum()), n_t))
    )
    x = x.astype(dtype)
    special = rng.choice(n_s, size=min(n_s, 8 + n_m), replace=False)
    nan_r, pinf_r, ninf_r, const_r, zero_r, late_nan = special[:6]
    x[nan_r, rng.integers(n_t)] = np.nan
    x[pinf_r, rng.integers(n_t)] = np.inf
    x[ninf_r, rng.integers(n_t)] = -np.inf
    x[const_r] = dtype(0.3)
    x[zero_r] = 0
    x[late_nan, -1] = np.nan
    ref_pos = special[6 : 6 + n_m].astype(np.int64)
    ref_ids = rng.permutation(n_m).astype(np.int64)[: ref_pos.size]
    for p, j in zip(ref_pos, ref_ids, strict=True):
        x[p] = refs[j].astype(dtype)
        refs[j] = x[p].astype(np.float64)  # the reference as the block holds it
    return np.ascontiguousarray(x.T), refs, (ref_pos, ref_ids)


def corr_all(xt: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """|corr| of every row with every reference (rows x M), dense float64; 0 for flagged rows."""
    x = xt.T.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = x - x.mean(axis=1, keepdims=True)
        rc = refs - refs.mean(axis=1, keepdims=True)
        c = (xc @ rc.T) / np.sqrt((xc * xc).sum(axis=1))[:, None] / np.sqrt((rc * rc).sum(axis=1))
    return np.abs(np.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0))


def assert_same_fit(got: BlockFit, want: BlockFit, xt: np.ndarray, refs: np.ndarray) -> None:
    """``got`` equals ``want`` (the numpy kernel) to rounding, flags exactly, modes up to ties."""
    assert got.mode.dtype == np.int64 and got.flags.dtype == np.uint8
    for f in FIELDS + PER_EPOCH:
        assert getattr(got, f).shape == getattr(want, f).shape, f
        assert getattr(got, f).dtype == getattr(want, f).dtype, f
    np.testing.assert_array_equal(got.flags, want.flags)
    # modes: equal, except where the top two |corr| are a float tie
    ac = corr_all(xt, refs)
    top2 = np.sort(ac, axis=1)[:, -2:] if ac.shape[1] > 1 else np.concatenate([ac, ac * 0], 1)
    tie = (top2[:, 1] - top2[:, 0]) <= TIE * top2[:, 1]
    differ = got.mode != want.mode
    assert not np.any(differ & ~tie), np.flatnonzero(differ & ~tie)
    same = ~differ
    x = xt.T.astype(np.float64)
    with np.errstate(invalid="ignore"):
        xc = x - x.mean(axis=1, keepdims=True)
    ssx = np.nan_to_num((xc * xc).sum(axis=1), nan=0.0, posinf=0.0)
    mean = np.nan_to_num(x.mean(axis=1), nan=0.0, posinf=0.0, neginf=0.0)
    rc = refs - refs.mean(axis=1, keepdims=True)
    ssr = (rc * rc).sum(axis=1)
    m = want.mode
    scale_a = np.sqrt(ssx / ssr[m])
    close = {
        "a": 1e-12 * scale_a,
        "b": 1e-12 * (np.abs(mean) + scale_a * np.abs(refs.mean(axis=1)[m])),
        "corr": np.full(len(m), 1e-12),
        "residual": 1e-12 * ssx,  # ssx (1 - corr^2): rounding of ssx
        "energy": np.zeros(len(m)),
        "spread": np.zeros(len(m)),
    }
    for f, atol in close.items():
        g, w, tol = getattr(got, f)[same], getattr(want, f)[same], atol[same]
        nan = np.isnan(w)
        np.testing.assert_array_equal(np.isnan(g), nan, err_msg=f)
        err = np.abs(g[~nan] - w[~nan])
        bound = RTOL * np.abs(w[~nan]) + tol[~nan]
        assert np.all(err <= bound), (f, np.flatnonzero(same)[~nan][err > bound], err.max())
    # anchors: equal, except where the fitted values at two epochs tie in magnitude; levels:
    # the fitted value at the anchor, to rounding of the mean and of a (r - mean r)
    finite = np.isfinite(want.level)
    with np.errstate(invalid="ignore"):
        fitted = want.a[:, None] * refs[m] + want.b[:, None]
    rows = np.flatnonzero(same & finite)
    scale = np.abs(mean) + scale_a * np.abs(rc[m]).max(axis=1)
    yg = np.abs(fitted[rows, got.anchor[rows]])
    yw = np.abs(fitted[rows, want.anchor[rows]])
    moved = got.anchor[rows] != want.anchor[rows]
    assert np.all(np.abs(yg - yw)[moved] <= 1e-12 * scale[rows][moved]), rows[moved]
    assert np.all(yw <= np.abs(fitted[rows]).min(axis=1) + 1e-12 * scale[rows])
    keep = rows[~moved]
    err = np.abs(got.level[keep] - want.level[keep])
    assert np.all(err <= RTOL * np.abs(want.level[keep]) + 1e-12 * scale[keep]), err.max()
    np.testing.assert_array_equal(np.isnan(got.level), np.isnan(want.level))
    # a tie that flipped a mode changes that row's per-epoch residual: compare it only without
    per_epoch = PER_EPOCH if not np.any(differ) else ("energy_t", "spread_t")
    for f in per_epoch:
        g, w = getattr(got, f), getattr(want, f)
        # the numpy kernel expands the squares of the per-epoch residual: it is exact to
        # rounding of the epoch's centred energy, not of the residual itself
        tol = 1e-12 * want.spread_t if f == "residual_t" else 0.0
        err = np.abs(g - w)
        assert np.all(err <= RTOL * np.abs(w) + tol), (f, err.max())
    assert np.all(got.residual_t >= 0)


# --------------------------------------------------------------------------- against numpy
@pytest.mark.parametrize("n_t", [3, 17, 100])
@pytest.mark.parametrize("n_m", [1, 2, 10])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_equals_numpy_kernel(n_t: int, n_m: int, dtype) -> None:
    n_s = 2 * SUB_ROWS + 37  # two full sub-blocks and a short one
    xt, refs, ref_rows = planted_block(n_t, n_s, n_m, dtype, seed=n_t * 31 + n_m)
    r = References.from_profiles(refs)
    want = fit_block(xt.T, r, ref_rows)
    got = fit_block_fused(xt, r, ref_rows)
    assert_same_fit(got, want, xt, refs)
    # the planted special rows are flagged as the numpy kernel flags them
    assert np.count_nonzero(got.flags & F_NONFINITE) >= 4
    assert np.count_nonzero(got.flags & F_CONSTANT) >= 2
    pos, ids = ref_rows
    assert np.all(got.flags[pos] & F_REFERENCE)
    assert np.array_equal(got.mode[pos], ids)
    assert np.all(got.a[pos] == 1.0) and np.all(got.b[pos] == 0.0)
    assert np.all(got.corr[pos] == 1.0) and np.all(got.residual[pos] == 0.0)
    # without ref_rows too
    assert_same_fit(fit_block_fused(xt, r), fit_block(xt.T, r), xt, refs)


@pytest.mark.parametrize("n_s", [1, 5, SUB_ROWS - 1, SUB_ROWS, SUB_ROWS + 1])
def test_fused_equals_numpy_kernel_small_and_edge_sizes(n_s: int) -> None:
    rng = np.random.default_rng(n_s)
    n_t, n_m = 9, 3
    refs = rng.standard_normal((n_m, n_t))
    xt = rng.standard_normal((n_t, n_s)).astype(np.float32)
    if n_s > 3:
        xt[:, 1] = np.float32(-2.5)  # constant
        xt[4 % n_t, 2] = np.nan
    r = References.from_profiles(refs)
    assert_same_fit(fit_block_fused(xt, r), fit_block(xt.T, r), xt, refs)


def test_reference_rows_on_flagged_rows_and_duplicates() -> None:
    """ref_rows naming a NaN row, a constant row, a row twice (the last id wins) and a position
    outside the block (ignored): as the numpy kernel."""
    rng = np.random.default_rng(9)
    n_t, n_s, n_m = 6, SUB_ROWS + 20, 3
    refs = rng.standard_normal((n_m, n_t))
    xt = rng.standard_normal((n_t, n_s))
    xt[2, 3] = np.nan
    xt[:, SUB_ROWS + 4] = 1.5
    pos = np.array([3, SUB_ROWS + 4, 7, 7, n_s + 5])
    ids = np.array([1, 2, 0, 2, 1])
    r = References.from_profiles(refs)
    got = fit_block_fused(xt, r, (pos, ids))
    want = fit_block(xt.T, r, (pos, ids))
    assert_same_fit(got, want, xt, refs)
    assert got.flags[3] == F_NONFINITE | F_REFERENCE and got.mode[7] == 2
    assert got.flags[SUB_ROWS + 4] == F_CONSTANT | F_REFERENCE


def test_precision_trap_weights_near_one() -> None:
    """Weights near 1.0 moving by 1e-4 (float32): |corr| of 0.994, not 0.58 / inf / 1.73."""
    rng = np.random.default_rng(3)
    n_t = 50
    ref = np.sin(np.linspace(0, 3, n_t))
    noise = rng.standard_normal((200, n_t)) * 0.11
    x = (1.0 + 1e-4 * (ref[None, :] + noise)).astype(np.float32)
    r = References.from_profiles(ref[None, :])
    got = fit_block_fused(np.ascontiguousarray(x.T), r)
    want = fit_block(x, r)
    assert_same_fit(got, want, np.ascontiguousarray(x.T), ref[None, :])
    assert np.all(np.abs(got.corr) <= 1.0) and np.median(np.abs(got.corr)) > 0.9


def test_exact_ties_go_to_the_lowest_mode() -> None:
    """Two identical references (and one negated): every row takes the lowest id."""
    rng = np.random.default_rng(5)
    ref = rng.standard_normal(12)
    refs = np.stack([rng.standard_normal(12), ref, ref, -ref])
    xt = np.ascontiguousarray(2.0 * ref[:, None] + rng.standard_normal((12, 700)) * 1e-3)
    got = fit_block_fused(xt, References.from_profiles(refs))
    assert np.all(got.mode == 1)


# --------------------------------------------------------------------------- direct formulas
def test_fused_equals_direct_dense_formulas() -> None:
    """a, b, corr, residual, energy, spread and the per-epoch sums, from the paper's formulas
    with a full reconstruction (ALGORITHM.md step 5), row by row in float64."""
    rng = np.random.default_rng(11)
    n_t, n_s, n_m = 7, 40, 3
    refs = rng.standard_normal((n_m, n_t)) * np.array([[1.0], [5.0], [0.1]]) + 2.0
    x = rng.standard_normal((n_s, n_t))
    x[:20] = rng.standard_normal((20, 1)) * refs[rng.integers(0, n_m, 20)] + 0.01 * x[:20]
    got = fit_block_fused(np.ascontiguousarray(x.T), References.from_profiles(refs))
    res_t = np.zeros(n_t)
    for i in range(n_s):
        w = x[i]
        wc = w - w.mean()
        cs = []
        for r in refs:
            rcj = r - r.mean()
            cs.append(np.dot(wc, rcj) / np.sqrt(np.dot(wc, wc) * np.dot(rcj, rcj)))
        k = int(np.argmax(np.abs(cs)))
        assert got.mode[i] == k
        rk = refs[k]
        rck = rk - rk.mean()
        a = np.dot(wc, rck) / np.dot(rck, rck)
        b = w.mean() - a * rk.mean()
        rec = a * rk + b
        assert got.a[i] == pytest.approx(a, rel=1e-12, abs=1e-14)
        assert got.b[i] == pytest.approx(b, rel=1e-12, abs=1e-13)
        assert got.corr[i] == pytest.approx(cs[k], rel=1e-12, abs=1e-14)
        res = np.sum((w - rec) ** 2)
        assert got.residual[i] == pytest.approx(res, rel=1e-9, abs=1e-12 * np.dot(wc, wc))
        assert got.energy[i] == pytest.approx(np.dot(w, w), rel=1e-12)
        assert got.spread[i] == pytest.approx(np.dot(wc, wc), rel=1e-12)
        res_t += (w - rec) ** 2
    np.testing.assert_allclose(got.residual_t, res_t, rtol=1e-9, atol=1e-12 * got.spread.sum())
    np.testing.assert_allclose(got.energy_t, (x * x).sum(axis=0), rtol=1e-12)
    xc = x - x.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(got.spread_t, (xc * xc).sum(axis=0), rtol=1e-12)
    assert not got.flags.any()


@pytest.mark.parametrize("kernel", ["fused", "numpy"])
def test_residual_t_of_near_perfect_fits_is_summed_directly(kernel: str) -> None:
    """Rows that follow their mode to 1e-7 of a unit spread: the per-epoch residual is about
    1e-14 of the spread, below what the per-mode expansion ``spread - 2 cross + quad`` can
    resolve (its rounding is ~1e-16 of the spread per row: it was off by 270 % here). Both
    kernels sum the squared errors themselves and meet the float64 oracle (the paper's
    formulas, row by row) to 1e-8, with no absolute slack."""
    rng = np.random.default_rng(5)
    n_t, n_s, n_m = 30, 3 * SUB_ROWS + 17, 4
    refs = np.cumsum(rng.standard_normal((n_m, n_t)), axis=1)
    mode = np.arange(n_s) % n_m
    a = rng.uniform(0.5, 2.0, n_s) * rng.choice([-1.0, 1.0], n_s)
    b = rng.standard_normal(n_s)
    x = a[:, None] * refs[mode] + b[:, None] + 1e-7 * rng.standard_normal((n_s, n_t))
    r = References.from_profiles(refs)
    got = fit_block_fused(np.ascontiguousarray(x.T), r) if kernel == "fused" else fit_block(x, r)
    assert np.all(got.mode == mode)
    res_t = np.zeros(n_t)
    for i in range(n_s):
        rc = refs[mode[i]] - refs[mode[i]].mean()
        wc = x[i] - x[i].mean()
        res_t += (wc - (wc @ rc) / (rc @ rc) * rc) ** 2
    assert res_t.sum() < 1e-12 * got.spread.sum()  # the regime the test is about
    np.testing.assert_allclose(got.residual_t, res_t, rtol=1e-8)


# --------------------------------------------------------------------------- float16 / bfloat16
def _bf16_bits(x32: np.ndarray) -> np.ndarray:
    return (x32.view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def _bf16_upcast(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _assert_bits_equal(got: BlockFit, want: BlockFit) -> None:
    for f in FIELDS + PER_EPOCH:
        g, w = getattr(got, f), getattr(want, f)
        assert g.dtype == w.dtype, f
        assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), f


@pytest.mark.parametrize("n_t", [3, 40])
def test_float16_and_bfloat16_equal_float32_of_the_upcast(n_t: int) -> None:
    xt32, refs, ref_rows = planted_block(n_t, SUB_ROWS + 300, 4, np.float32, seed=n_t)
    xt32[0, 5] = np.float32(3e-6)  # a float16 subnormal
    r = References.from_profiles(refs)
    f16 = xt32.astype(np.float16)
    _assert_bits_equal(
        fit_block_fused(f16, r, ref_rows), fit_block_fused(f16.astype(np.float32), r, ref_rows)
    )
    bits = _bf16_bits(xt32)
    _assert_bits_equal(
        fit_block_fused(bits, r, ref_rows, dtype_code="bfloat16"),
        fit_block_fused(_bf16_upcast(bits), r, ref_rows),
    )
    with pytest.raises(TypeError):
        fit_block_fused(bits, r)  # uint16 needs dtype_code="bfloat16"


def test_half_upcasts_are_exact_for_every_bit_pattern() -> None:
    bits = np.arange(65536, dtype=np.uint16)[None, :]
    out = np.empty((1, 65536), dtype=np.float32)
    for code, want in (
        (2, bits.view(np.float16).astype(np.float32)),
        (3, _bf16_upcast(bits)),
    ):
        cmd_numba._upcast_tile(bits, 0, 65536, code, out)
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(out), nan)
        np.testing.assert_array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))


# --------------------------------------------------------------------------- determinism, input
def test_deterministic_and_layout_independent() -> None:
    xt, refs, ref_rows = planted_block(100, 3 * SUB_ROWS + 11, 10, np.float32, seed=2)
    r = References.from_profiles(refs)
    first = fit_block_fused(xt, r, ref_rows)
    _assert_bits_equal(fit_block_fused(xt, r, ref_rows), first)
    # a non-contiguous (Fortran-ordered) block gives the same bits
    _assert_bits_equal(fit_block_fused(np.asfortranarray(xt), r, ref_rows), first)
    # the input is left untouched (NaN rows are zeroed in a copy, not in place)
    assert np.isnan(xt).any()


@pytest.fixture(scope="module")
def packed_pass():
    """A jitted call of the packing and the projections (the vector code of pass 2) alone."""
    numba = pytest.importorskip("numba")

    @numba.njit
    def run(x, c0, n8, mv, unit, n_groups):
        n_t = x.shape[0]
        pack = np.zeros((n_groups, n_t, 8), dtype=x.dtype)
        cmd_numba._pack8(x, c0, n8, pack)
        proj = np.full((unit.shape[0], n_groups * 8), np.nan)
        ssq = np.full(n_groups * 8, np.nan)
        lanes = np.zeros((n_t, 2, 4))
        cmd_numba._project8(pack, mv, unit, proj, ssq, lanes, n8)
        return pack, proj, ssq, lanes

    return run


@pytest.mark.parametrize("n_m", list(range(1, 13)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_projections_equal_float64_dot_products(packed_pass, n_m: int, dtype) -> None:
    """Every mode count (full register blocks of 5 and every remainder): the packed rows, the
    projections, the rows' sums of squares and the per-epoch lanes against float64 numpy, and
    columns outside [c0, c0 + n8) never read or written."""
    rng = np.random.default_rng(n_m)
    n_t, n_cols, c0, n8 = 37, 60, 7, 24
    x = (rng.standard_normal((n_t, n_cols)) * 3.0 + 100.0).astype(dtype)
    x[:, :c0] = np.nan  # outside the window: must not reach any sum
    x[:, c0 + n8 :] = np.nan
    mv = x[:, c0 : c0 + n8].astype(np.float64).mean(axis=0)
    unit = rng.standard_normal((n_m, n_t))
    pack, proj, ssq, lanes = packed_pass(x, c0, n8, mv, unit, n8 // 8)
    xs = x[:, c0 : c0 + n8].astype(np.float64)
    for j in range(n8):  # row j is group j // 8, slot j % 8
        np.testing.assert_array_equal(pack[j // 8, :, j % 8], x[:, c0 + j])
    xc = xs - mv
    scale = np.abs(unit) @ np.abs(xc)  # the size of the terms of each dot product
    np.testing.assert_array_less(np.abs(proj - unit @ xc), 1e-14 * scale + 1e-300)
    np.testing.assert_allclose(ssq, (xc * xc).sum(axis=0), rtol=1e-14)
    want_lanes = np.stack(
        [(xc * xc).reshape(n_t, -1, 4).sum(axis=1), (xs * xs).reshape(n_t, -1, 4).sum(axis=1)],
        axis=1,
    )  # lane l holds the rows j with j % 4 == l
    np.testing.assert_allclose(lanes, want_lanes, rtol=1e-14)


def test_a_row_has_the_same_bits_wherever_it_lies_in_a_block() -> None:
    """A row's values copied into another full group and into the padded last group of a
    short sub-block: every result of the copies is that of the row, bit for bit (for 16 rows:
    a sum taken another way, e.g. without fused multiply-adds, agrees in its last bit about
    half the time)."""
    rng = np.random.default_rng(21)
    n_t, n_m = 50, 7
    refs = np.cumsum(rng.standard_normal((n_m, n_t)), axis=1)
    n_s = SUB_ROWS + 3  # the last sub-block: a padded group of 3 rows
    base = (rng.standard_normal((n_t, n_s)) + 0.5 * refs[rng.integers(0, n_m, n_s)].T).astype(
        np.float32
    )
    r = References.from_profiles(refs)
    for src in range(16):
        xt = base.copy()
        at = [src, SUB_ROWS // 2 + 1, SUB_ROWS, SUB_ROWS + 2]
        xt[:, at] = xt[:, [src]]
        got = fit_block_fused(xt, r)
        for f in FIELDS:
            values = getattr(got, f)[at]
            assert np.array_equal(values, np.full_like(values, values[0])), (src, f)
            assert np.array_equal(values.view(np.uint8), np.tile(values[:1].view(np.uint8), 4))


def test_available_and_warm_up() -> None:
    assert cmd_numba.available()
    cmd_numba.warm_up()


# --------------------------------------------------------------------------- group sums
def test_group_sums_by_hand_and_compiled_twin_bit_equal() -> None:
    from pipeline.kernels.cmd import group_sums

    rng = np.random.default_rng(7)
    n, groups_n = 5000, 6
    groups = rng.integers(0, groups_n, n)
    flags = rng.choice(np.array([0, F_CONSTANT, F_NONFINITE, F_REFERENCE, 8], dtype=np.uint8), n)
    corr = rng.uniform(-1, 1, n)
    residual, energy, spread = (rng.exponential(size=n) for _ in range(3))
    got = cmd_numba.group_sums_fused(groups, groups_n, flags, corr, residual, energy, spread)
    ref = group_sums(groups, groups_n, flags, corr, residual, energy, spread)
    assert got.tobytes() == ref.tobytes()  # every sum in row order: the same bits
    # by hand, from the definitions (count, valid, |corr| of valid, residual, energy, NaN/Inf,
    # spread), with math.fsum: equal to rounding
    import math

    for g in range(groups_n):
        rows = np.flatnonzero(groups == g)
        valid = [i for i in rows if flags[i] & (F_CONSTANT | F_NONFINITE) == 0]
        want = [
            len(rows),
            len(valid),
            math.fsum(abs(corr[i]) for i in valid),
            math.fsum(residual[rows]),
            math.fsum(energy[rows]),
            sum(1 for i in rows if flags[i] & F_NONFINITE),
            math.fsum(spread[rows]),
        ]
        np.testing.assert_allclose(got[g], want, rtol=1e-12)
    with pytest.raises(IndexError, match="group ids"):
        cmd_numba.group_sums_fused(groups, 3, flags, corr, residual, energy, spread)


# --------------------------------------------------------------------------- constant rows
#: float32 values whose constant rows must be told from rows one ulp away: an inexact decimal,
#: the largest float32, the smallest normal, a subnormal, a negative, zero and -0.0, an integer
#: beyond float32's consecutive integers
_AWKWARD = np.array(
    [0.3, np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1e-45, -7.1, 0.0, -0.0, 16777218.0],
    dtype=np.float32,
)


@pytest.mark.parametrize("n_t", [2, 3, 100, 101])
def test_constant_rows_are_exactly_the_rows_of_one_value(n_t: int) -> None:
    """float32 input: constant rows are found from their ``sum xc^2`` (their float64 sum is
    exact); every row with one value changed by one ulp, at the first, a middle or the last
    epoch, is varying. Flags against the definition (every value equal to the first) and the
    numpy kernel; float64 input takes the other path, to the same flags."""
    rows = []
    for v in _AWKWARD:
        rows.append(np.full(n_t, v, dtype=np.float32))
        for t in (0, n_t // 2, n_t - 1):
            for direction in (np.inf, -np.inf):
                with np.errstate(over="ignore"):
                    w = np.nextafter(v, np.float32(direction))
                if np.isfinite(w):  # (the largest float32 has no finite neighbour above)
                    r = np.full(n_t, v, dtype=np.float32)
                    r[t] = w
                    rows.append(r)
    rows.append(np.where(np.arange(n_t) % 2 == 0, np.float32(0.0), np.float32(-0.0)))  # 0, -0
    noise = np.random.default_rng(n_t).standard_normal((40, n_t))
    x = np.concatenate([np.stack(rows), noise]).astype(np.float32)
    want_const = np.all(x == x[:, :1], axis=1)
    assert want_const.sum() == len(_AWKWARD) + 1 and not want_const.all()  # the test bites
    refs = np.random.default_rng(1).standard_normal((3, n_t))
    r = References.from_profiles(refs)
    want = fit_block(x.astype(np.float32), r)
    for dtype in (np.float32, np.float64):
        got = fit_block_fused(np.ascontiguousarray(x.T.astype(dtype)), r)
        np.testing.assert_array_equal((got.flags & F_CONSTANT) != 0, want_const, err_msg=str(dtype))
        np.testing.assert_array_equal(got.flags, want.flags)
        # a constant row's level and b are its value, its energy n_t * value^2
        c = np.flatnonzero(want_const)
        np.testing.assert_array_equal(got.b[c], x[c, 0].astype(np.float64))
        np.testing.assert_array_equal(got.level[c], x[c, 0].astype(np.float64))
        np.testing.assert_array_equal(got.energy[c], n_t * x[c, 0].astype(np.float64) ** 2)


def test_alloc_gives_the_result_arrays_and_every_value_is_written() -> None:
    """With ``alloc`` the per-row results are the arrays it gives (reused buffers hold
    anything: here garbage), and equal, bit for bit, those of fresh arrays."""
    xt, refs, ref_rows = planted_block(30, SUB_ROWS + 77, 3, np.float32, seed=5)
    r = References.from_profiles(refs)
    given: dict[str, np.ndarray] = {}

    def alloc(field: str, n: int, dtype) -> np.ndarray:
        buf = np.empty(n + 5, dtype=dtype)
        buf.view(np.uint8)[:] = 0xA7  # garbage, NaN-like in the floats
        given[field] = buf[:n]
        return given[field]

    got = fit_block_fused(xt, r, ref_rows, alloc=alloc)
    _assert_bits_equal(got, fit_block_fused(xt, r, ref_rows))
    assert set(given) == {"mode", "a", "b", "anchor", "level", "corr", "residual", "energy",
                          "spread", "flags"}
    for f, buf in given.items():
        assert np.shares_memory(getattr(got, f), buf), f
    a32, l32 = cmd_numba.stored_coefficients_fused(got.mode, got.a, got.level, got.anchor, r, alloc=alloc)
    w32, wl32 = cmd_numba.stored_coefficients_fused(got.mode, got.a, got.level, got.anchor, r)
    assert np.shares_memory(a32, given["a32"]) and np.shares_memory(l32, given["level32"])
    np.testing.assert_array_equal(a32.view(np.uint32), w32.view(np.uint32))
    np.testing.assert_array_equal(l32.view(np.uint32), wl32.view(np.uint32))

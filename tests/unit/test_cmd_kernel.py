"""The CMD building blocks against direct float64 formulas: the per-block kernel
(:func:`fit_block`), :func:`pearson`, the clustering, the stratified sampling and the result
dtypes. Hypothesis draws shapes and values (constant rows, NaN/Inf rows, exact affine images of
the references, ties)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import F_CONSTANT, F_NONFINITE, F_REFERENCE, dense_cmd
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.kernels.cluster import cluster_modes
from pipeline.kernels.cmd import References, fit_block, pearson
from pipeline.kernels.sampling import stratified_sample
from pipeline.ops.reconstruct import reconstruct_block
from pipeline.store.analysis import mode_dtype

# float32-representable values (the trajectory is float32) of realistic weight magnitudes
F32 = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- direct formulas
def direct_fit(
    x: np.ndarray, refs: np.ndarray, modes: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Row by row, with plain float64 dot products: the formulas of ALGORITHM.md step 5.

    ``modes`` imposes each row's mode (to follow the kernel through exact ties of |corr|);
    ``argmax`` holds the lowest argmax of |corr| either way."""
    x = np.asarray(x, dtype=np.float64)
    s, t = x.shape
    m = refs.shape[0]
    rmean = refs.mean(axis=1)
    rc = refs - rmean[:, None]
    ssr = np.array([float(np.dot(rc[j], rc[j])) for j in range(m)])
    out = {
        k: np.zeros(s)
        for k in ("a", "b", "corr", "residual", "energy", "mode", "argmax", "flags", "ssx", "mean")
    }
    out["corr_all"] = np.zeros((s, m))
    out["res_t"] = np.zeros(t)
    out["energy_t"] = np.zeros(t)
    for i in range(s):
        w = x[i]
        if not np.isfinite(w).all():
            out["flags"][i] = F_NONFINITE
            out["b"][i] = np.nan
            continue
        mw = w.mean()
        wc = w - mw
        ssx = float(np.dot(wc, wc))
        out["ssx"][i], out["mean"][i] = ssx, mw
        out["energy"][i] = float(np.dot(w, w))
        out["energy_t"] += w * w
        if ssx == 0:
            out["flags"][i] = F_CONSTANT
            out["b"][i] = mw
            continue
        c = np.array([np.dot(wc, rc[j]) / np.sqrt(ssx * ssr[j]) for j in range(m)])
        out["corr_all"][i] = c
        out["argmax"][i] = int(np.argmax(np.abs(c)))
        k = int(out["argmax"][i]) if modes is None else int(modes[i])
        a = float(np.dot(wc, rc[k])) / ssr[k]
        out["mode"][i], out["corr"][i], out["a"][i] = k, c[k], a
        out["b"][i] = mw - a * rmean[k]
        r = wc - a * rc[k]
        out["residual"][i] = float(np.dot(r, r))
        out["res_t"] += r * r
    return out


def _fit_of(x: np.ndarray, refs: np.ndarray, ref_rows=None):
    return fit_block(x, References.from_profiles(refs), ref_rows)


#: |corr| values this close (relative) are a tie: which of them an argmax picks depends on
#: rounding (the BLAS kernel, the block shape), so a test accepts any of them
TIE = 1e-12


def assert_modes_tie_aware(got: np.ndarray, want: np.ndarray, abs_corr: np.ndarray) -> np.ndarray:
    """Modes ``got`` against ``want`` (rows x M ``abs_corr`` = |corr| with every reference):
    equal, or both within a relative :data:`TIE` of the row's largest |corr|. Returns the mask
    of rows where they are equal (where a, b and corr must match too)."""
    got = np.asarray(got, dtype=np.int64)
    want = np.asarray(want, dtype=np.int64)
    same = got == want
    rows = np.flatnonzero(~same)
    best = abs_corr[rows].max(axis=1)
    for k in (got[rows], want[rows]):
        picked = abs_corr[rows, k]
        assert np.all(picked >= best - TIE * best), (rows, picked, best)
    return same


@st.composite
def block_and_refs(draw):
    """A block (S, T) of float32 or float64 rows and M non-constant references: some rows are
    exact affine images of a reference (|corr| = 1), some constant, some NaN/Inf."""
    t = draw(st.integers(2, 12))
    s = draw(st.integers(1, 9))
    m = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    refs = draw(arrays(np.float64, (m, t), elements=F32))
    assume(bool((refs.max(axis=1) > refs.min(axis=1)).all()))
    x = draw(arrays(dtype, (s, t), elements=F32))
    for i in range(s):
        kind = draw(st.sampled_from(["free", "free", "affine", "constant", "nonfinite"]))
        if kind == "affine":
            j = draw(st.integers(0, m - 1))
            a = draw(st.sampled_from([1.0, -1.0, 2.0, -0.5, 3.25]))
            b = draw(st.sampled_from([0.0, 1.0, -7.5]))
            x[i] = (a * refs[j] + b).astype(dtype)
        elif kind == "constant":
            x[i] = x[i, 0]
        elif kind == "nonfinite":
            x[i, draw(st.integers(0, t - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return x, refs


# --------------------------------------------------------------------------- fit_block
@SETTINGS
@given(block_and_refs())
def test_fit_block_equals_direct_formulas(case) -> None:
    x, refs = case
    got = _fit_of(x, refs)
    want = direct_fit(x, refs, got.mode)
    assert got.mode.dtype == np.int64 and got.flags.dtype == np.uint8
    assert np.array_equal(got.flags, want["flags"].astype(np.uint8))
    nonfinite = (want["flags"] == F_NONFINITE).astype(bool)
    constant = (want["flags"] == F_CONSTANT).astype(bool)
    varying = ~nonfinite & ~constant
    # flagged rows: a = 0, b = the value (constant) or NaN, corr 0, no residual
    assert np.all(got.a[~varying] == 0) and np.all(got.corr[~varying] == 0)
    assert np.all(got.residual[~varying] == 0)
    assert np.array_equal(got.b[constant], want["b"][constant])
    assert np.all(np.isnan(got.b[nonfinite]))
    assert np.all((got.mode >= 0) & (got.mode < refs.shape[0]))
    # the mode is the lowest argmax of |corr|: equal to it, or a tie to rounding
    assert_modes_tie_aware(
        got.mode[varying], want["argmax"][varying], np.abs(want["corr_all"][varying])
    )
    for i in np.flatnonzero(varying):
        k = int(got.mode[i])
        ssr = float(((refs[k] - refs[k].mean()) ** 2).sum())
        scale_a = np.sqrt(want["ssx"][i] / ssr)
        assert abs(got.corr[i] - want["corr"][i]) <= 1e-12
        assert abs(got.a[i] - want["a"][i]) <= 1e-10 * scale_a
        assert abs(got.b[i] - want["b"][i]) <= 1e-10 * (
            abs(want["mean"][i]) + scale_a * abs(refs[k].mean())
        )
        # |w - a r - b|^2, computed as |w - mean w|^2 (1 - corr^2) by the kernel (ALGORITHM.md):
        # exact to rounding of |w - mean w|^2
        assert abs(got.residual[i] - want["residual"][i]) <= 1e-12 * want["ssx"][i]
    np.testing.assert_allclose(got.energy, want["energy"], rtol=1e-12)
    # per-epoch sums (over the rows without NaN/Inf): the kernel expands the squares, so they
    # are exact to rounding of the block's total energy, not of each epoch's
    scale = 1e-12 * max(want["energy"].sum(), 1e-300)
    np.testing.assert_allclose(got.energy_t, want["energy_t"], rtol=1e-12, atol=scale)
    np.testing.assert_allclose(
        got.residual_t, want["res_t"], rtol=1e-9, atol=1e-12 * max(want["ssx"].sum(), 1e-300)
    )
    assert np.all(got.residual_t >= 0)


@SETTINGS
@given(block_and_refs(), st.data())
def test_fit_block_reference_rows_are_exact(case, data) -> None:
    """Rows that are references: a = 1, b = 0, corr = 1, residual 0, flag 4, their own mode."""
    x, refs = case
    m = refs.shape[0]
    pos = data.draw(st.lists(st.integers(0, x.shape[0] - 1), max_size=m, unique=True))
    ids = list(data.draw(st.permutations(range(m))))[: len(pos)]
    prof = refs.copy()  # the references as the block holds them (float32 blocks round them)
    for p, j in zip(pos, ids, strict=True):
        x[p] = refs[j].astype(x.dtype)
        prof[j] = x[p].astype(np.float64)
    assume(bool((prof.max(axis=1) > prof.min(axis=1)).all()))
    got = _fit_of(x, prof, (np.array(pos, dtype=np.int64), np.array(ids, dtype=np.int64)))
    for p, j in zip(pos, ids, strict=True):
        assert got.mode[p] == j
        assert got.a[p] == 1.0 and got.b[p] == 0.0 and got.corr[p] == 1.0
        assert got.residual[p] == 0.0
        assert got.flags[p] & F_REFERENCE
        # and a * r + b gives the row back bit for bit
        rec = reconstruct_block(got.mode[[p]], got.a[[p]], got.b[[p]], prof, slice(None))
        assert np.array_equal(rec[0].astype(x.dtype), x[p])


def test_fit_block_large_block_equals_its_pieces_and_direct() -> None:
    """A block larger than the kernel's inner step (several sub-blocks, the last one short),
    with references, constant and NaN rows in different sub-blocks: equal to the direct
    formulas, to the same rows fitted in small pieces, and unchanged when the kernel's reused
    buffers were used in between for another shape."""
    rng = np.random.default_rng(7)
    n, t = 40_000, 11
    refs = rng.standard_normal((3, t)).cumsum(axis=1)
    m = rng.integers(3, size=n)
    x = (rng.uniform(-2, 2, n)[:, None] * refs[m] + rng.standard_normal(n)[:, None]).astype(
        np.float32
    )
    x += (0.3 * rng.standard_normal((n, t))).astype(np.float32)
    x[[5, 20_000, 39_999]] = x[[5, 20_000, 39_999], :1]  # constant rows
    x[[7, 33_000], 3] = np.nan
    pos = np.array([1, 17_000, 35_000])
    for j, p in enumerate(pos):
        refs[j] = x[p]
    ref_rows = (pos, np.arange(3))
    got = _fit_of(x, refs, ref_rows)
    # a time-major view (what the graph passes) gives the same bits
    tm = np.ascontiguousarray(x.T)
    again = _fit_of(tm.T, refs, ref_rows)
    _fit_of(rng.standard_normal((20_000, 4)), refs[:, :4])  # other shapes in the buffers
    for field in ("mode", "a", "b", "corr", "residual", "flags"):
        assert np.array_equal(getattr(got, field), getattr(again, field), equal_nan=True), field
    pieces = [
        _fit_of(
            x[s0 : s0 + 999],
            refs,
            (
                pos[(pos >= s0) & (pos < s0 + 999)] - s0,
                np.flatnonzero((pos >= s0) & (pos < s0 + 999)),
            ),
        )
        for s0 in range(0, n, 999)
    ]
    want = direct_fit(x, refs, got.mode)
    abs_corr = np.abs(want["corr_all"])
    # the pieces: other block shapes, so other BLAS rounding; a row whose |corr| ties to
    # rounding between two modes may go either way (none does in this data, but the test
    # must not depend on it)
    assert np.array_equal(got.flags, np.concatenate([p.flags for p in pieces]))
    same = assert_modes_tie_aware(got.mode, np.concatenate([p.mode for p in pieces]), abs_corr)
    for field in ("a", "b", "corr"):
        np.testing.assert_allclose(
            getattr(got, field)[same],
            np.concatenate([getattr(p, field) for p in pieces])[same],
            rtol=1e-12,
        )
    if same.all():
        np.testing.assert_allclose(
            got.residual_t, np.sum([p.residual_t for p in pieces], axis=0), rtol=1e-9
        )
    np.testing.assert_allclose(
        got.energy_t, np.sum([p.energy_t for p in pieces], axis=0), rtol=1e-12
    )
    varying = want["flags"] == 0
    assert_modes_tie_aware(got.mode[varying], want["argmax"][varying], abs_corr[varying])
    assert np.array_equal(got.flags & 3, want["flags"].astype(np.uint8))
    assert np.all(got.flags[pos] & F_REFERENCE) and np.count_nonzero(got.flags & F_REFERENCE) == 3
    free = np.ones(n, dtype=bool)
    free[pos] = False
    np.testing.assert_allclose(got.a[free], want["a"][free], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.corr[free], want["corr"][free], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got.residual[free], want["residual"][free], rtol=1e-9)
    assert np.array_equal(got.a[pos], [1.0, 1.0, 1.0]) and np.array_equal(got.b[pos], [0, 0, 0.0])
    np.testing.assert_allclose(got.residual_t, want["res_t"], rtol=1e-9)
    np.testing.assert_allclose(got.energy_t, want["energy_t"], rtol=1e-12)


def test_fit_block_ties_go_to_the_lowest_mode() -> None:
    """Exact ties, by construction: references r, -r and r again. Their unit profiles are the
    same bits (negated for -r), so every row's projections on them are computed by the same
    operations on the same (or negated) operands and tie exactly, whatever the BLAS kernel:
    rounding is symmetric under negation and the same for the same operands."""
    t = np.linspace(0, 1, 9)
    r = np.sin(3 * t) + t
    q = np.cos(5 * t)
    x = np.stack([2 * r + 1, -r, 0.5 * q, -3 * r + 2]).astype(np.float32)
    # r, -r and r again: every row correlated with r ties at |corr| = 1 between modes 1, 2, 3
    refs = np.stack([q, r, -r, r])
    unit = References.from_profiles(refs).unit
    assert np.array_equal(unit[1], unit[3]) and np.array_equal(unit[2], -unit[1])
    got = _fit_of(x, refs)
    assert got.mode.tolist() == [1, 1, 0, 1]
    # the affine fit is against the chosen (lowest) reference: -r = -1 * r + 0
    np.testing.assert_allclose(got.a, [2.0, -1.0, 0.5, -3.0], rtol=1e-6)
    np.testing.assert_allclose(got.corr, [1.0, -1.0, 1.0, -1.0], rtol=1e-12)
    # a row orthogonal to every reference: all |corr| tie at 0: mode 0, a = 0, b = its mean
    z = np.array([[6.0, 4.0, 6.0, 4.0]])
    g = fit_block(z, References.from_profiles(np.array([[1, 1, -1, -1.0], [1, -1, -1, 1.0]])))
    assert g.mode[0] == 0 and g.a[0] == 0 and g.b[0] == 5.0 and g.corr[0] == 0
    assert g.residual[0] == ((z - 5.0) ** 2).sum()


def test_references_must_vary() -> None:
    with pytest.raises(ValueError, match="constant"):
        References.from_profiles(np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]))


# --------------------------------------------------------------------------- pearson
@SETTINGS
@given(
    st.integers(1, 10).flatmap(
        lambda k: st.integers(2, 12).flatmap(
            lambda t: st.tuples(
                arrays(np.float32, (k, t), elements=F32),
                st.lists(st.integers(0, k - 1), max_size=k),
            )
        )
    )
)
def test_pearson_equals_direct_formula(case) -> None:
    prof, const_rows = case
    for i in const_rows:
        prof[i] = prof[i, 0]
    got = pearson(prof)
    x = prof.astype(np.float64)
    k = x.shape[0]
    assert got.shape == (k, k) and got.dtype == np.float64
    assert np.array_equal(got, got.T)
    assert np.all(np.abs(got) <= 1.0)
    assert np.all(np.diag(got) == 1.0)
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            u, v = x[i] - x[i].mean(), x[j] - x[j].mean()
            nu, nv = np.dot(u, u), np.dot(v, v)
            want = 0.0 if nu == 0 or nv == 0 else np.dot(u, v) / np.sqrt(nu * nv)
            assert abs(got[i, j] - want) <= 1e-12, (i, j, got[i, j], want)


def test_pearson_is_exact_for_weights_near_one() -> None:
    """Centred float64: weights at 1.0 moving by 1e-4 keep their correlation (paper's failure)."""
    t = np.linspace(0, 1, 20)
    base = np.exp(-4 * t)
    x = (1.0 + 1e-4 * np.stack([base, 0.5 * base + 0.2, -base, np.sin(7 * t)])).astype(np.float32)
    got = pearson(x)
    want = np.corrcoef(x.astype(np.float64))
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[0, 1] > 0.99 and got[0, 2] < -0.99


# --------------------------------------------------------------------------- clustering
def _groups_corr(groups: list[int], rng: np.random.Generator, t: int = 16) -> np.ndarray:
    """Pearson matrix of profiles built from ``groups`` (group id per sample) plus noise."""
    base = rng.standard_normal((max(groups) + 1, t))
    prof = np.stack([rng.choice([-1, 1]) * base[g] + 0.05 * rng.standard_normal(t) for g in groups])
    return pearson(prof)


def test_cluster_labels_by_size_then_first_position() -> None:
    rng = np.random.default_rng(3)
    # group sizes: g0 has 2, g1 has 5, g2 has 2 (g2's first member comes after g0's)
    groups = [0, 1, 1, 2, 0, 1, 1, 2, 1]
    c = cluster_modes(_groups_corr(groups, rng), modes=3)
    relabel = {1: 0, 0: 1, 2: 2}  # largest first; the two pairs ordered by first position
    assert c.labels.tolist() == [relabel[g] for g in groups]
    assert c.sizes.tolist() == [5, 2, 2]
    assert c.n_modes == 3 and c.labels.dtype == np.int64
    assert sorted(c.order.tolist()) == list(range(len(groups)))
    for m, r in enumerate(c.references):
        assert c.labels[r] == m


@pytest.mark.parametrize("seed", range(6))
def test_cluster_equals_dense_reference(seed: int) -> None:
    """Random profiles: same labels and references as the dense reference implementation."""
    rng = np.random.default_rng(seed)
    prof = rng.standard_normal((60, 12)).cumsum(axis=1)
    idx = np.arange(60)
    for kw in ({"modes": 1 + seed}, {"threshold": 0.2 + 0.1 * seed}):
        c = cluster_modes(pearson(prof), **kw)  # type: ignore[arg-type]
        d = dense_cmd(prof, idx, **kw)  # type: ignore[arg-type]
        assert np.array_equal(c.labels, d.labels)
        assert np.array_equal(c.references, d.ref_index)
        assert c.n_modes == d.n_modes
        if "modes" in kw:
            assert c.n_modes <= kw["modes"]


def test_cluster_reference_has_largest_summed_abs_corr() -> None:
    rng = np.random.default_rng(1)
    corr = _groups_corr([0] * 8 + [1] * 6, rng)
    c = cluster_modes(corr, modes=2)
    for m in range(2):
        members = np.flatnonzero(c.labels == m)
        score = np.abs(corr[np.ix_(members, members)]).sum(axis=1) - 1
        # the largest score; scores within a relative 1e-12 of it tie (the lowest index wins)
        tied = members[score >= score.max() - 1e-12 * abs(score.max())]
        assert c.references[m] == tied.min()


def test_cluster_fewer_modes_than_asked_and_threshold() -> None:
    # two groups of exact duplicates (up to sign): no cut can make more than 2 clusters
    r1, r2 = np.sin(np.arange(10.0)), np.arange(10.0) ** 2
    prof = np.stack([r1, -r1, 2 * r1, r2, 0.5 * r2, -r2, 4 * r2])
    c = cluster_modes(pearson(prof), modes=5)
    assert c.n_modes == 2
    assert c.labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert cluster_modes(pearson(prof), threshold=0.0).n_modes == 2
    assert cluster_modes(pearson(prof), threshold=1.0).n_modes == 1
    with pytest.raises(ValueError, match="exactly one"):
        cluster_modes(pearson(prof))
    with pytest.raises(ValueError, match="exactly one"):
        cluster_modes(pearson(prof), modes=2, threshold=0.1)
    with pytest.raises(ValueError):
        cluster_modes(pearson(prof), threshold=1.5)


# --------------------------------------------------------------------------- sampling
@SETTINGS
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=25),
    st.integers(1, 300),
    st.integers(0, 2**32 - 1),
    st.data(),
)
def test_stratified_sample_properties(sizes: list[int], k: int, seed: int, data) -> None:
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    n = sum(sizes)
    exclude = np.array(
        data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n)), dtype=np.int64
    )
    idx = stratified_sample(offsets, sizes, k, np.random.default_rng(seed), exclude=exclude)
    assert idx.dtype == np.int64
    assert np.array_equal(idx, np.unique(idx))  # sorted, distinct
    assert not np.isin(idx, exclude).any()
    assert idx.size == min(k, n - exclude.size)
    if k // 2 > len(sizes):
        per = k // (2 * len(sizes))
        for off, size in zip(offsets, sizes, strict=True):
            pool = size - int(((exclude >= off) & (exclude < off + size)).sum())
            got = int(((idx >= off) & (idx < off + size)).sum())
            assert got >= min(per, pool), (off, size, got, per, pool)
    again = stratified_sample(offsets, sizes, k, np.random.default_rng(seed), exclude=exclude)
    assert np.array_equal(idx, again)


@pytest.mark.parametrize(("k", "stratified"), [(60, False), (82, False), (84, True), (200, True)])
def test_stratified_sample_uniform_exactly_when_half_k_not_above_layers(
    k: int, stratified: bool
) -> None:
    """40 layers of 5 rows and one of 20,000 (L = 41): K/2 <= L draws uniformly, so the 200
    small rows (1% of N) get about K / 100 draws in all; K/2 > L gives every layer K // 2L."""
    sizes = [5] * 40 + [20_000]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    small = []
    for seed in range(20):
        idx = stratified_sample(offsets, sizes, k, np.random.default_rng(seed))
        assert idx.size == k
        per_layer = np.bincount(np.minimum(idx // 5, 40), minlength=41)
        small.append(int(per_layer[:40].sum()))
        if stratified:
            assert np.all(per_layer >= k // 82)
    if stratified:
        assert min(small) >= 40
    else:
        assert np.mean(small) < 2.5 and max(small) <= 7


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize(
    ("m", "dtype"),
    [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)],
)
def test_mode_dtype_is_smallest_unsigned(m: int, dtype: type) -> None:
    assert mode_dtype(m) == np.dtype(dtype)


def test_reconstruct_block_is_float64_affine() -> None:
    refs = np.array([[1.0, 2.0, 4.0], [0.1, 0.2, 0.7]])
    mode = np.array([1, 0, 1], dtype=np.uint8)
    a = np.array([1.0, -2.0, 0.0])
    b = np.array([0.0, 0.5, 3.0])
    got = reconstruct_block(mode, a, b, refs, slice(None))
    assert got.dtype == np.float64
    assert np.array_equal(got, [[0.1, 0.2, 0.7], [-1.5, -3.5, -7.5], [3.0, 3.0, 3.0]])
    assert np.array_equal(reconstruct_block(mode, a, b, refs, np.array([2])), got[:, [2]])

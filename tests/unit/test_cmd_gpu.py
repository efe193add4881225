"""The CMD kernels on CuPy arrays equal the NumPy ones (float64 outputs to rtol 1e-10; integer
outputs exactly). Skipped cleanly without CuPy or a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

from pipeline.kernels.cmd import References, fit_block, pearson  # noqa: E402


def _has_device() -> bool:
    try:
        return int(cp.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # no driver, no device, a broken install: all mean "no GPU here"
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _has_device(), reason="needs a CUDA device"),
]

RTOL = 1e-10


def _case(seed: int, n: int = 50_000, t: int = 17, m: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    refs = rng.standard_normal((m, t)).cumsum(axis=1)
    mode = rng.integers(m, size=n)
    x = rng.uniform(-2, 2, n)[:, None] * refs[mode] + rng.standard_normal(n)[:, None]
    x = (x + 0.2 * rng.standard_normal((n, t))).astype(np.float32)
    x[10:20] = x[10:20, :1]  # constant rows
    x[30, 4] = np.nan
    x[31, 0] = np.inf
    x[40:45] = 1.0 + 1e-4 * rng.standard_normal((5, t)).astype(np.float32)  # near 1.0
    return x, refs


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("time_major", [False, True])
def test_fit_block_cupy_equals_numpy(seed: int, time_major: bool) -> None:
    x, refs = _case(seed)
    pos = np.array([3, 25_000, 49_999])
    ids = np.array([0, 2, 4])
    refs[ids] = x[pos]
    ref_rows = (pos, ids)
    r = References.from_profiles(refs)
    want = fit_block(x, r, ref_rows)
    xd = cp.asarray(np.ascontiguousarray(x.T)).T if time_major else cp.asarray(x)
    got = fit_block(xd, r.to(cp), (cp.asarray(pos), cp.asarray(ids)))
    for field in ("mode", "flags"):
        g = cp.asnumpy(getattr(got, field))
        assert np.array_equal(g, getattr(want, field)), field
    for field in ("a", "b", "corr", "residual", "energy"):
        g = cp.asnumpy(getattr(got, field))
        np.testing.assert_allclose(g, getattr(want, field), rtol=RTOL, atol=0, equal_nan=True)
    # per-epoch sums: to rounding of the block's totals
    for field, scale in (("residual_t", want.residual.sum()), ("energy_t", want.energy.sum())):
        g = cp.asnumpy(getattr(got, field))
        np.testing.assert_allclose(g, getattr(want, field), rtol=RTOL, atol=1e-12 * scale)
    assert np.all(cp.asnumpy(got.a)[pos] == 1.0) and np.all(cp.asnumpy(got.b)[pos] == 0.0)
    # the anchors: the same epochs, except where two fitted values tie to the device's rounding
    anchor, level = cp.asnumpy(got.anchor), cp.asnumpy(got.level)
    same = anchor == want.anchor
    assert same.mean() > 0.999 and np.array_equal(anchor[pos], want.anchor[pos])
    np.testing.assert_allclose(level[same], want.level[same], rtol=RTOL, atol=1e-12, equal_nan=True)


def test_pearson_cupy_equals_numpy() -> None:
    x, _refs = _case(2, n=1000)
    x = x[100:400]  # the samples: finite (constant rows would correlate 0 with everything)
    want = pearson(x)
    got = cp.asnumpy(pearson(cp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-13)
    assert np.array_equal(np.diag(got), np.ones(300))


def test_fit_gpu_path_matches_cpu(tmp_path, run5) -> None:
    """``fit --gpu`` (in-process) on a real device against the CPU fit of the same store."""
    from helpers import SYNC, read_analysis, stored_model

    import pipeline

    store = tmp_path / "s.zarr"
    pipeline.ingest([str(run5.root)], str(store), runtime=SYNC)
    pipeline.fit(str(store), "cpu", modes=3, samples=50, runtime=SYNC)
    gpu = pipeline.RuntimeOptions(mode="sync", progress=False, gpu=True)
    pipeline.fit(str(store), "gpu", modes=3, samples=50, runtime=gpu)
    a, b = read_analysis(store, "cpu"), read_analysis(store, "gpu")
    for key in ("mode", "flags", "refs"):
        assert np.array_equal(a[key], b[key]), key
    assert b["a"].dtype == b["level"].dtype == np.float32 and "corr" not in b
    # float32 a: equal, or a few float32 steps apart (rounding and stored_coefficients)
    np.testing.assert_allclose(b["a"], a["a"], rtol=2.0**-21, atol=0, equal_nan=True)
    np.testing.assert_allclose(b["block_stats"], a["block_stats"], rtol=RTOL, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(stored_model(b), stored_model(a), rtol=2.0**-22, atol=1e-12, equal_nan=True)

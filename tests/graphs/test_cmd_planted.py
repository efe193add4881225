"""Planted modes come back: synthetic trajectories ``a * P_m(t) + b`` (+ tiny noise) written as
checkpoints and ingested; the fit recovers the modes (adjusted Rand index), the affine maps
(up to the reference's own map) and the clean trajectories. And the precision case of the
paper's reference code: weights at 1.0 moving by 1e-4."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    SYNC,
    THREADS,
    Planted,
    assert_matches_dense,
    dense_cmd,
    intercept,
    mode_profiles,
    planted_rows,
    read_analysis,
    read_trajectory,
    rows_to_state_dicts,
    store_layers,
    stored_model,
    write_safetensors_run,
)
from sklearn.metrics import adjusted_rand_score

import pipeline

T = 24


def _store(tmp_path: Path, spec: dict[str, tuple[tuple[int, ...], torch.dtype, Planted]]) -> Path:
    sds = rows_to_state_dicts({k: (shape, dt, p.noisy) for k, (shape, dt, p) in spec.items()})
    ck = write_safetensors_run(tmp_path / "ck", sds)[0].parent
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(ck)], str(store), runtime=SYNC)
    return store


def _in_row_order(store: Path, spec: dict[str, Any], field: str) -> np.ndarray:
    """A per-row planted quantity (``mode``, ``a``, ``b``, ``clean``) in the store's row order."""
    return np.concatenate([getattr(spec[name][2], field) for name, _lo, _hi in store_layers(store)])


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """4 modes (exp decay, sigmoid, sine, cosine), a of both signs, noise 1e-4 * |a|:
    2,560 float32 rows and 600 float16 rows."""
    rng = np.random.default_rng(11)
    p = mode_profiles(T)
    spec = {
        "layer1.weight": ((64, 40), torch.float32, planted_rows(2560, p, rng, noise=1e-4)),
        "layer2.weight": (
            (600,),
            torch.float16,
            planted_rows(600, p, rng, noise=1e-4, b_scale=0.2),
        ),
    }
    store = _store(tmp_path_factory.mktemp("planted"), spec)
    pipeline.fit(str(store), "m4", modes=4, samples=200, diagnostics=True, runtime=THREADS)
    pipeline.fit(str(store), "t01", threshold=0.1, samples=200, runtime=THREADS)
    pipeline.fit(str(store), "t03", threshold=0.3, samples=200, runtime=THREADS)
    return store, spec


@pytest.mark.parametrize("name", ["m4", "t01"])
def test_planted_modes_are_recovered(planted: tuple[Path, dict[str, Any]], name: str) -> None:
    store, spec = planted
    got = read_analysis(store, name)
    assert got["refs"].shape[0] == 4
    truth = _in_row_order(store, spec, "mode")
    mode = got["mode"].astype(np.int64)
    assert adjusted_rand_score(truth, mode) >= 0.99
    # the planted -> fitted mode map is a bijection
    pairs = set(zip(truth.tolist(), mode.tolist(), strict=True))
    assert len(pairs) == 4 and len({m for _t, m in pairs}) == 4
    # a and b up to the reference's own affine map: r = a_ref P + b_ref, so
    # w = a P + b = (a / a_ref) r + (b - a b_ref / a_ref)
    pa, pb = _in_row_order(store, spec, "a"), _in_row_order(store, spec, "b")
    ref_of_mode = {int(mode[r]): int(r) for r in got["ref_index"]}
    ref = np.array([ref_of_mode[int(m)] for m in mode])
    want_a = pa / pa[ref]
    want_b = pb - pa * pb[ref] / pa[ref]
    lo, hi = {n: (lo, hi) for n, lo, hi in store_layers(store)}["layer1.weight"]
    f32 = np.zeros(mode.size, dtype=bool)
    f32[lo:hi] = True
    np.testing.assert_allclose(got["a"][f32], want_a[f32], rtol=2e-3)
    scale_b = 1 + np.abs(want_a) * (1 + np.abs(pb[ref]))
    assert np.all(np.abs(intercept(got) - want_b)[f32] <= 2e-3 * scale_b[f32])
    np.testing.assert_allclose(got["a"][~f32], want_a[~f32], rtol=3e-2)
    # anti-correlated rows share the mode of the correlated ones, with a < 0
    opposite = np.sign(pa) != np.sign(pa[ref])
    assert opposite.sum() > 1000
    assert np.all(got["a"][opposite] < 0) and np.all(got["a"][~opposite] > 0)
    if "corr" in got:  # m4 stores its per-row diagnostics
        assert np.all(got["corr"][opposite] < -0.99) and np.all(got["corr"][~opposite] > 0.99)
    else:
        assert name == "t01" and "residual" not in got


def test_reconstruction_equals_planted_clean_trajectories(
    planted: tuple[Path, dict[str, Any]],
) -> None:
    store, spec = planted
    got = read_analysis(store, "m4")
    rec = stored_model(got)
    clean = _in_row_order(store, spec, "clean")
    wiggle = np.linalg.norm(clean - clean.mean(axis=1, keepdims=True), axis=1)
    rel = np.linalg.norm(rec - clean, axis=1) / wiggle
    layers = {name: (lo, hi) for name, lo, hi in store_layers(store)}
    lo, hi = layers["layer1.weight"]
    assert np.max(rel[lo:hi]) < 2e-3  # float32 rows: the noise (1e-4) of row and reference
    lo, hi = layers["layer2.weight"]
    assert np.median(rel[lo:hi]) < 1e-2 and np.max(rel[lo:hi]) < 5e-2  # float16 rounding
    overall = np.linalg.norm(rec - clean) / np.linalg.norm(clean)
    assert overall < 1e-3
    assert got["attrs"]["summary"]["relative_error"] < 1e-3


def test_threshold_cut(planted: tuple[Path, dict[str, Any]]) -> None:
    """t = 0.1 separates the 4 profiles (pairwise |corr| <= 0.85); t = 0.3 merges the sigmoid
    and the sine (|corr| = 0.84), and nothing else."""
    store, spec = planted
    m4, t01, t03 = (read_analysis(store, n) for n in ("m4", "t01", "t03"))
    assert t01["refs"].shape[0] == 4
    assert np.array_equal(t01["mode"], m4["mode"])  # same samples, same cut
    assert t03["refs"].shape[0] == 3
    truth = _in_row_order(store, spec, "mode")
    merged = np.where(truth == 2, 1, truth)  # sigmoid (1) and sine (2) together
    assert adjusted_rand_score(merged, t03["mode"]) >= 0.99
    w = read_trajectory(store)
    assert_matches_dense(t03, dense_cmd(w, t03["sample_index"], threshold=0.3), w)


def _corr_f32_one_pass(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The research code's formula: raw moments in float32, one pass (rows of x against y)."""
    x = x.astype(np.float32)
    y = y.astype(np.float32)
    n = np.float32(x.shape[1])
    sx, sy = x.sum(axis=1, dtype=np.float32), y.sum(dtype=np.float32)
    sxy = (x * y).sum(axis=1, dtype=np.float32)
    sxx, syy = (x * x).sum(axis=1, dtype=np.float32), (y * y).sum(dtype=np.float32)
    with np.errstate(all="ignore"):
        return (n * sxy - sx * sy) / np.sqrt((n * sxx - sx * sx) * (n * syy - sy * sy))


def test_weights_near_one_keep_their_precision(tmp_path: Path) -> None:
    """LayerNorm-like weights 1 + 1e-4 (a P + b): correlations exact (vs dense float64), where
    the float32 raw-moment formula is garbage; their references reconstruct bit for bit."""
    rng = np.random.default_rng(3)
    p = mode_profiles(20)
    ln = planted_rows(512, p[[0, 2]], rng, noise=1e-3, a_range=(0.5, 2.0), b_scale=1.0)
    ln_rows = Planted(
        ln.profiles, ln.mode, ln.a, ln.b, 1.0 + 1e-4 * ln.clean, 1.0 + 1e-4 * ln.noisy
    )
    fc = planted_rows(1500, p[[1, 3]], rng, noise=1e-3)
    fc.mode = fc.mode + 2
    spec = {
        "ln.weight": ((512,), torch.float32, ln_rows),
        "fc.weight": ((30, 50), torch.float32, fc),
    }
    store = _store(tmp_path, spec)
    pipeline.fit(str(store), "ln", modes=4, samples=200, diagnostics=True, runtime=SYNC)
    got = read_analysis(store, "ln")
    w = read_trajectory(store)
    layers = {name: (lo, hi) for name, lo, hi in store_layers(store)}
    lo, hi = layers["ln.weight"]
    assert np.all(np.abs(w[lo:hi] - 1.0) < 1e-3)
    dense = dense_cmd(w, got["sample_index"], modes=4)
    assert_matches_dense(got, dense, w)
    assert adjusted_rand_score(_in_row_order(store, spec, "mode"), got["mode"]) >= 0.99
    # the references of the near-1.0 modes are near-1.0 weights themselves
    ln_refs = [int(r) for r in got["ref_index"] if lo <= r < hi]
    assert len(ln_refs) == 2
    ln_mode = got["mode"][lo:hi].astype(np.int64)
    assert set(ln_mode.tolist()) == {int(got["mode"][r]) for r in ln_refs}
    # correlations: exact against dense float64 on the stored float32 values
    corr = got["corr"][lo:hi].astype(np.float64)
    assert np.max(np.abs(corr - dense.corr[lo:hi])) < 1e-6
    assert np.min(np.abs(corr)) > 0.99
    # ... where the float32 one-pass raw-moment formula fails on the same rows
    naive = np.empty(hi - lo)
    for m in set(ln_mode.tolist()):
        rows = np.flatnonzero(ln_mode == m)
        naive[rows] = _corr_f32_one_pass(w[lo:hi][rows], got["refs"][m])
    wrong = ~np.isfinite(naive) | (np.abs(naive - dense.corr[lo:hi]) > 0.05)
    assert wrong.mean() > 0.5, wrong.mean()
    # a near-1.0 reference reconstructs exactly; the others to their quantisation
    store_s = str(store)
    pipeline.reconstruct(store_s, "ln", runtime=SYNC)
    rec = read_analysis(store, "ln")["reconstructed"]
    for r in ln_refs:
        assert np.array_equal(rec[r].view(np.uint32), w[r].view(np.uint32))
    clean = 1.0 + 1e-4 * ln.clean
    err = np.linalg.norm(rec[lo:hi] - clean, axis=1) / np.linalg.norm(
        clean - clean.mean(axis=1, keepdims=True), axis=1
    )
    assert np.median(err) < 5e-3

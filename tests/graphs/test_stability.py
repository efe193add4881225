"""Basis stability (OIALR): planted layers ``W_t = U(t) diag(s_t) V(t)^T`` whose singular
vectors rotate until epoch E and are frozen afterwards (only the singular values scale, which
is no basis motion), written as safetensors checkpoints and ingested.

``stability(t)`` compares epochs ``t-1`` and ``t``; the last rotation lands on epoch E, so the
first pair without motion is ``(E, E+1)`` and ``stays_above`` (= ``first_above`` here) is
``E + 1`` exactly: one epoch after the last move, by the pair indexing."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    SYNC,
    THREADS,
    read_trajectory,
    rows_to_state_dicts,
    store_layers,
    write_safetensors_run,
)
from scipy.linalg import expm

import pipeline
from pipeline.errors import PipelineError, StoreError
from pipeline.graph.stability import LayerSVD, build_stability_tasks, pair_task
from pipeline.kernels.svd import (
    column_cosine,
    compare_factors,
    matrix_factors,
    polar_factor,
    randomized_svd,
)
from pipeline.ops.stability import (
    basis_stability,
    stability_figure,
    stability_study,
    summarise_layer,
)

T = 12  # epochs 0..11
E = 6  # the last epoch whose basis differs from its predecessor's
THRESHOLD = 0.9


def _planted(m: int, n: int, s: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """(m, n) matrices over T epochs: U, V rotated by exp(theta A) (A random skew, |A|_2 = 1,
    theta decreasing from 1.4) at epochs 1..E, frozen afterwards, where the singular values
    grow by up to 5% (unevenly)."""
    u = np.linalg.qr(rng.standard_normal((m, m)))[0]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0]
    k = len(s)
    out = []
    for t in range(T):
        if 1 <= t <= E:
            theta = 1.5 * (1 - 0.05 * t)
            rots = []
            for d in (m, n):
                a = rng.standard_normal((d, d))
                a = a - a.T
                rots.append(expm(theta * a / np.linalg.norm(a, 2)))
            u, v = rots[0] @ u, rots[1] @ v
        scale = 1 + 0.01 * max(t - E, 0) * np.linspace(0.5, 1.0, k)
        out.append((u[:, :k] * (s * scale)) @ v[:, :k].T)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(4)
    tmp = tmp_path_factory.mktemp("stability")
    fc = _planted(24, 16, np.linspace(3.0, 1.0, 16), rng)
    conv = _planted(12, 36, np.linspace(2.0, 1.0, 12), rng)  # stored as (12, 4, 3, 3)
    # a clear gap after the 8th singular value: the randomised rank-8 basis is well defined
    big = _planted(60, 40, np.r_[np.linspace(10.0, 5.0, 8), np.full(32, 0.01)], rng)
    bias = rng.standard_normal((24, T))

    def rows(ws: list[np.ndarray]) -> np.ndarray:
        return np.stack([w.reshape(-1) for w in ws], axis=1)

    spec = {
        "fc.weight": ((24, 16), torch.float32, rows(fc)),
        "fc.bias": ((24,), torch.float32, bias),
        "conv.weight": ((12, 4, 3, 3), torch.float32, rows(conv)),
        "big.weight": ((60, 40), torch.float32, rows(big)),
    }
    ck = write_safetensors_run(tmp / "ck", rows_to_state_dicts(spec))[0].parent
    store = tmp / "s.zarr"
    pipeline.ingest([str(ck)], str(store), runtime=SYNC)
    return store


@pytest.fixture(scope="module")
def result(planted: Path) -> Any:
    return basis_stability(planted, threshold=THRESHOLD, max_exact=1000, rank=8, runtime=SYNC)


def test_layers_methods_and_skips(result: Any) -> None:
    names = [lay.name for lay in result.layers]
    assert sorted(names) == ["big.weight", "conv.weight", "fc.weight"]
    assert result.skipped == ["fc.bias"]
    assert result.epochs == list(range(T))
    conv = result.layer("conv.weight")
    assert conv.tensor_shape == [12, 4, 3, 3] and conv.matrix_shape == [12, 36]
    assert (conv.method, conv.rank) == ("exact", 12)
    fc = result.layer("fc.weight")
    assert (fc.method, fc.rank, fc.matrix_shape) == ("exact", 16, [24, 16])
    big = result.layer("big.weight")
    assert (big.method, big.rank, big.matrix_shape) == ("randomized", 8, [60, 40])


@pytest.mark.parametrize("name", ["fc.weight", "conv.weight", "big.weight"])
def test_detects_the_frozen_basis(result: Any, name: str) -> None:
    lay = result.layer(name)
    assert lay.stability[0] is None and lay.sv_drift[0] is None
    st = np.array(lay.stability[1:], dtype=np.float64)  # pairs ending at epochs 1..T-1
    moving, frozen = st[:E], st[E:]  # pairs (0,1)..(E-1,E) | (E,E+1)..
    assert np.all(moving < THRESHOLD - 0.1), moving
    assert np.all(frozen > 1 - 1e-5), frozen  # 1 up to the float32 storage
    assert lay.stays_above == E + 1 and lay.first_above == E + 1 and lay.stable_epoch == E + 1
    # the singular values keep drifting (by ~0.5-1% per epoch) after the basis froze
    drift = np.array(lay.sv_drift[E + 1 :], dtype=np.float64)
    assert np.all(drift > 1e-3) and np.all(drift < 0.02), drift
    assert len(lay.top_singular_values) == T
    assert all(len(v) == min(8, lay.rank) for v in lay.top_singular_values)


def _dense_stability(w: np.ndarray, shape: tuple[int, int]) -> list[float]:
    """Straight from the definition: per epoch pair, the mean column cosine of U V^T."""
    qs = []
    for t in range(w.shape[1]):
        u, _s, vt = np.linalg.svd(w[:, t].astype(np.float64).reshape(shape), full_matrices=False)
        qs.append(u @ vt)
    out = []
    for t in range(1, len(qs)):
        a, b = qs[t - 1], qs[t]
        cos = [
            a[:, j] @ b[:, j] / (np.linalg.norm(a[:, j]) * np.linalg.norm(b[:, j]))
            for j in range(a.shape[1])
        ]
        out.append(float(np.mean(cos)))
    return out


@pytest.mark.parametrize("name,shape", [("conv.weight", (12, 36)), ("fc.weight", (24, 16))])
def test_matches_dense_numpy(planted: Path, result: Any, name: str, shape: tuple[int, int]) -> None:
    w = read_trajectory(planted)
    lo, hi = next((lo, hi) for n, lo, hi in store_layers(planted) if n == name)
    want = _dense_stability(w[lo:hi], shape)
    got = np.array(result.layer(name).stability[1:], dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_window_threads_and_json(planted: Path, result: Any) -> None:
    sub = basis_stability(planted, epochs="2:10", max_exact=1000, rank=8, runtime=THREADS)
    assert sub.epochs == list(range(2, 10))
    for lay in sub.layers:
        full = result.layer(lay.name)
        assert lay.stability[0] is None
        np.testing.assert_allclose(
            np.array(lay.stability[1:], dtype=np.float64),
            np.array(full.stability[3:10], dtype=np.float64),
            rtol=0,
            atol=1e-12,
        )
        assert lay.stays_above == E + 1
    text = json.dumps(asdict(result), allow_nan=False)
    assert json.loads(text)["layers"][0]["stability"][0] is None
    assert "stays above 7" in result.summary()
    with pytest.raises(PipelineError, match="at least 2 epochs"):
        basis_stability(planted, epochs="3:4", runtime=SYNC)


def test_randomized_svd_and_helpers() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((50, 8)) @ np.diag(np.linspace(5, 2, 8)) @ rng.standard_normal((8, 30))
    u, s, vt = randomized_svd(a, 5, seed=3)
    s_ref = np.linalg.svd(a, compute_uv=False)[:5]
    np.testing.assert_allclose(s, s_ref, rtol=1e-10)
    np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-12)
    u2, _s2, vt2 = randomized_svd(a, 5, seed=3)
    assert np.array_equal(u, u2) and np.array_equal(vt, vt2)
    q = np.eye(4)
    assert column_cosine(q, q) == 1.0 and column_cosine(q, -q) == -1.0
    assert summarise_layer([0, 1, 2, 3, 4], [None, 0.95, 0.5, 0.95, 0.99], 0.9) == (1, 3)
    assert summarise_layer([0, 1, 2], [None, 0.95, 0.5], 0.9) == (1, None)


def test_figure_is_png(result: Any) -> None:
    png = stability_figure(result)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_stride(planted: Path) -> None:
    """Epochs k apart: the basis last moves at E, so the first comparison that sees it frozen
    on both sides is at E + k; the first k positions have no value."""
    res = basis_stability(planted, threshold=THRESHOLD, stride=3, runtime=SYNC)
    lay = res.layer("fc.weight")
    assert lay.stability[:3] == [None, None, None] and lay.stability[3] is not None
    assert lay.stays_above == E + 3
    assert all(v is not None for v in lay.top_singular_values)
    with pytest.raises(PipelineError, match="stride 20"):
        basis_stability(planted, stride=20, runtime=SYNC)


# ---------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5)])
def test_matrix_factors_exact_is_the_truncated_lapack_svd(shape: tuple[int, int]) -> None:
    a = np.random.default_rng(2).standard_normal(shape)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    for r in (1, min(shape)):
        got = matrix_factors(a, "exact", r)
        assert got is not None
        for x, want in zip(got, (u[:, :r], s[:r], vt[:r]), strict=True):
            assert np.array_equal(x, want)
    bad = a.copy()
    bad[1, 2] = np.inf
    assert matrix_factors(bad, "exact", 2) is None and matrix_factors(bad, "randomized", 2) is None


def test_compare_factors_against_the_direct_formula() -> None:
    """Scaled singular values, flipped singular-vector pairs: the polar factor does not move
    (stability 1); the drift is ||s1 - s0|| / ||s0||. A rotated basis: the direct mean column
    cosine of U0 V0^T and U1 V1^T."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((9, 6))
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    flip = np.where(np.arange(6) % 2 == 0, 1.0, -1.0)
    cur = (u * flip, 1.5 * s, vt * flip[:, None])
    stability, drift = compare_factors((u, s, vt), cur)
    assert stability == pytest.approx(1.0, abs=1e-12)
    assert drift == pytest.approx(np.linalg.norm(0.5 * s) / np.linalg.norm(s), rel=1e-12)
    b = matrix_factors(rng.standard_normal((9, 6)), "exact", 6)
    assert b is not None
    q0, q1 = u @ vt, b[0] @ b[2]
    want = np.mean([q0[:, j] @ q1[:, j] / np.linalg.norm(q0[:, j]) / np.linalg.norm(q1[:, j]) for j in range(6)])
    got, _ = compare_factors((u, s, vt), b)
    assert got == pytest.approx(want, rel=1e-12)
    assert np.array_equal(polar_factor(u, vt), q0)
    # nothing left to compare, a zero spectrum: None, never NaN
    z = (np.zeros((3, 2)), np.zeros(2), np.zeros((2, 2)))
    assert compare_factors(z, z) == (None, None)
    out = pair_task(None, (u, s, vt))
    assert out["stability"] is None and out["top_prev"] is None and out["top"] == s[:8].tolist()


# ---------------------------------------------------------------------------- graph
class _NoReads:
    """A chunk grid that fails the test if a task is run while the graph is built."""

    def read_rows(self, *args: Any) -> None:
        raise AssertionError("building the graph read the trajectory")


def test_build_stability_tasks_computes_nothing() -> None:
    layers = [
        LayerSVD(0, "a.weight", 0, (4, 3), "exact", 3),
        LayerSVD(2, "b.weight", 12, (2, 5), "randomized", 1),
    ]
    cols, window = [1, 2, 4, 5], [10, 20, 40, 50]
    tasks, labels = build_stability_tasks(_NoReads(), layers, cols, window, stride=2, seed=0)  # type: ignore[arg-type]
    assert len(tasks) == len(labels) == 2 * (len(cols) - 2)
    assert labels == [
        "a.weight epochs 10-40", "a.weight epochs 20-50", "b.weight epochs 10-40", "b.weight epochs 20-50"
    ]
    assert [t.key for t in tasks] == [
        "stability-pair-0-4", "stability-pair-0-5", "stability-pair-2-4", "stability-pair-2-5"
    ]
    assert layers[1].rows == (12, 22)


# ---------------------------------------------------------------------------- the command
def test_stability_study_is_basis_stability_plus_its_report(planted: Path, result: Any) -> None:
    study = stability_study(planted, max_exact=1000, rank=8, runtime=SYNC)
    assert study.to_dict() == result.to_dict()
    assert study.summary() == result.summary()
    assert study.saved_to is None and study.mode_changes is None
    with pytest.raises(StoreError, match="no analysis 'nope'"):
        stability_study(planted, name="nope", runtime=SYNC)
    with pytest.raises(PipelineError, match="needs a study name"):
        stability_study(planted, mode_windows=(4, 2), runtime=SYNC)

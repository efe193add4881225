"""Out-of-core POD and exact DMD baselines (:mod:`pipeline.bench.baselines`) against dense numpy
on the same float32 trajectory read back: the Gram pass, POD errors from its eigenvalues, exact
DMD from Gram blocks with one error pass, NaN/Inf rows, windows, blocks, runtimes."""

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
    mode_profiles,
    planted_rows,
    read_trajectory,
    rows_to_state_dicts,
    write_safetensors_run,
)
from references import dense_cmd_residual, dense_dmd_error

import pipeline
from pipeline.bench.baselines import GramResult, cmd_errors, dmd_errors, gram, pod_errors
from pipeline.errors import PipelineError

T = 16


def _ingest(
    tmp_path: Path,
    tensors: dict[str, tuple[tuple[int, ...], np.ndarray]],
    *,
    chunk_rows: int = 128,
    nan: bool = False,
) -> Path:
    spec = {k: (shape, torch.float32, rows) for k, (shape, rows) in tensors.items()}
    sds = rows_to_state_dicts(spec)
    if nan:
        first = next(iter(tensors))
        sds[5][first].view(-1)[[3, 77]] = float("nan")
        sds[0][first].view(-1)[10] = float("inf")
    ck = write_safetensors_run(tmp_path / "ck", sds)[0].parent
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(ck)], str(store), chunk_rows=chunk_rows, runtime=SYNC)
    return store


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,363 rows in 3 tensors following 4 modes + offsets + noise 0.02, 11 chunks of 128
    rows, three rows with NaN/Inf."""
    rng = np.random.default_rng(5)
    p = mode_profiles(T)
    tensors = {
        "a.weight": ((40, 25), planted_rows(1000, p, rng, noise=0.02).noisy),
        "b.weight": ((300,), planted_rows(300, p, rng, noise=0.02, b_scale=0.3).noisy),
        "c.bias": ((7, 9), planted_rows(63, p, rng, noise=0.05).noisy),
    }
    return _ingest(tmp_path_factory.mktemp("planted"), tensors, nan=True)


def _finite(store: Path, cols: list[int] | None = None) -> tuple[np.ndarray, int]:
    """The trajectory's rows finite over the window ``cols``, in float64; how many are not."""
    w = read_trajectory(store)
    if cols is not None:
        w = w[:, cols]
    ok = np.isfinite(w).all(axis=1)
    return w[ok].astype(np.float64), int((~ok).sum())


# ------------------------------------------------------------------------------- Gram
def test_gram_matches_dense(planted: Path) -> None:
    w, n_bad = _finite(planted)
    g = gram(str(planted), runtime=SYNC)
    want = w.T @ w
    np.testing.assert_allclose(g.matrix, want, rtol=1e-12)
    assert n_bad == 3 and g.n_nonfinite == 3
    assert g.n_rows == w.shape[0] == 1363 - 3 and g.n_total_rows == 1363
    assert g.n_blocks == 11 and g.block_rows == 128
    assert g.energy == pytest.approx((w**2).sum(), rel=1e-12)
    assert g.bytes_read == 1363 * T * 4
    assert g.cols == list(range(T)) and g.epochs == list(range(T))
    json.dumps(asdict(g))  # JSON-serialisable


def test_gram_window_and_blocks(planted: Path) -> None:
    cols = [0, 3, 4, 9, 15]
    w, n_bad = _finite(planted, cols)  # the NaN rows are finite here (not the Inf row)
    g = gram(str(planted), cols=cols, block_rows=100, runtime=SYNC)  # blocks straddle chunks
    want = w.T @ w
    np.testing.assert_allclose(g.matrix, want, rtol=1e-12)
    assert g.n_blocks == 14 and g.cols == cols and g.n_nonfinite == n_bad == 1
    g2 = gram(str(planted), cols="2:10:2", runtime=SYNC)
    assert g2.cols == [2, 4, 6, 8]
    with pytest.raises(PipelineError):
        gram(str(planted), cols=[0, T], runtime=SYNC)


# ------------------------------------------------------------------------------- POD
def test_pod_matches_dense_svd(planted: Path) -> None:
    w, _ = _finite(planted)
    s = np.linalg.svd(w, compute_uv=False)
    energy = (s**2).sum()
    g = gram(str(planted), runtime=SYNC)
    got = pod_errors(g, [*range(1, T + 1), T + 5])
    n = w.shape[0]
    for p in got:
        r = p["effective_rank"]
        want = (s[r:] ** 2).sum()
        assert abs(p["residual"] - want) <= 1e-8 * energy, (r, p["residual"], want)
        assert p["relative_error"] == pytest.approx(np.sqrt(p["residual"] / g.energy))
        assert p["mse"] == pytest.approx(p["residual"] / (n * T))
        assert p["stored_floats"] == r * (n + T) and p["stored_bytes"] == 4 * r * (n + T)
        assert p["singular_value"] == pytest.approx(s[r - 1], rel=1e-6)
    assert got[-1]["rank"] == T + 5 and got[-1]["effective_rank"] == T
    assert got[T - 1]["residual"] == 0.0 and got[T - 1]["relative_error"] == 0.0
    # 4 modes + offsets: the rank-5 error is the noise
    assert got[4]["relative_error"] < 0.05 < got[2]["relative_error"]
    errs = [p["relative_error"] for p in got]
    assert errs == sorted(errs, reverse=True)
    json.dumps(got)
    with pytest.raises(PipelineError):
        pod_errors(g, [0])


# ------------------------------------------------------------------------------- DMD
def test_dmd_matches_dense(planted: Path) -> None:
    w, _ = _finite(planted)
    energy = (w**2).sum()
    g = gram(str(planted), runtime=SYNC)
    ranks = [*range(1, T), T + 3]
    got = dmd_errors(str(planted), g, ranks, runtime=SYNC)
    n = w.shape[0]
    for p, r in zip(got, ranks, strict=True):
        re = min(r, T - 1)
        assert p["effective_rank"] == re
        want = dense_dmd_error(w, re)
        assert p["relative_error"] == pytest.approx(np.sqrt(want / energy), rel=1e-6), r
        assert p["relative_error_gram"] == pytest.approx(p["relative_error"], rel=1e-6), r
        assert p["stored_floats"] == re * (n + 1) and p["stored_bytes"] == 4 * re * (n + 1)
        assert p["stored_floats_complex"] == 2 * re * n + 4 * re
        assert len(p["eigenvalues_re"]) == re
        assert p["bytes_read"] == 1363 * T * 4
    pod = pod_errors(g, ranks)
    for p, q in zip(got, pod, strict=True):  # POD is optimal for its rank
        assert p["relative_error"] >= q["relative_error"] * (1 - 1e-9)
    json.dumps(got)
    with pytest.raises(PipelineError):
        dmd_errors(str(planted), g, [0], runtime=SYNC)
    with pytest.raises(PipelineError):
        dmd_errors(str(planted), g, [2], cols=[0, 1, 2], runtime=SYNC)


def _exp_rows(rng: np.random.Generator, n: int, lams: np.ndarray, t: int) -> np.ndarray:
    """Rows x_t = sum_k c_k lambda_k^t, real: complex lambdas in conjugate pairs."""
    basis = lams[:, None] ** np.arange(t)[None, :]
    c = rng.standard_normal((n, len(lams))) + 1j * rng.standard_normal((n, len(lams)))
    real = ~np.iscomplex(lams)
    c[:, real] = c[:, real].real
    return (c @ basis).real


def test_dmd_recovers_a_sum_of_exponentials(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    t = 20
    lams = np.array([0.97, 0.8, 1.03, 0.9 * np.exp(0.4j), 0.9 * np.exp(-0.4j)])
    rows = _exp_rows(rng, 700, lams, t)
    store = _ingest(
        tmp_path, {"l1.weight": ((20, 25), rows[:500]), "l2.bias": ((200,), rows[500:])}
    )
    g = gram(str(store), block_rows=64, runtime=SYNC)
    got = dmd_errors(str(store), g, [2, 5], runtime=SYNC)
    assert got[1]["relative_error"] < 1e-6
    assert got[1]["relative_error_gram"] < 1e-6
    assert got[0]["relative_error"] > 1e-3
    found = np.sort_complex(
        np.array(got[1]["eigenvalues_re"]) + 1j * np.array(got[1]["eigenvalues_im"])
    )
    np.testing.assert_allclose(found, np.sort_complex(lams), atol=1e-5)
    w, _ = _finite(store)
    assert got[1]["relative_error"] == pytest.approx(
        np.sqrt(dense_dmd_error(w, 5) / (w**2).sum()), rel=1e-6
    )


def test_dmd_drops_zero_singular_values(tmp_path: Path) -> None:
    """Rows a + b 2^-t with small integers a, b: exactly rank 2 in float32."""
    rng = np.random.default_rng(1)
    t = 12
    a = rng.integers(-8, 9, size=300).astype(np.float64)
    b = rng.integers(-8, 9, size=300).astype(np.float64)
    rows = a[:, None] + b[:, None] * 0.5 ** np.arange(t)[None, :]
    store = _ingest(tmp_path, {"w": ((300,), rows)}, chunk_rows=64)
    g = gram(str(store), runtime=SYNC)
    got = dmd_errors(str(store), g, [1, 2, 6, 40], runtime=SYNC)
    assert [p["effective_rank"] for p in got] == [1, 2, 2, 2]
    for p in got[1:]:
        assert p["relative_error"] < 1e-12
        assert p["stored_floats"] == 2 * (300 + 1)
    pod = pod_errors(g, [2, 3])
    assert pod[0]["relative_error"] < 1e-7


# ------------------------------------------------------------------------------- CMD
def test_cmd_error_is_measured_with_the_stored_float32_model(tmp_path: Path) -> None:
    """The CMD point of the equal-bytes comparison counts the model as stored (float32 a and
    level, a one-byte anchor and mode: 10 B per parameter): its error must be that of the
    stored float32 model, not of the fit's float64 one. Noise-free planted rows on large
    offsets (|b| ~ 100, movement ~ 1): the data's own float32 rounding is the fit's whole
    error, and the float32 model adds rounding of the same size, so the two errors differ by
    far more than the tolerance of the comparison."""
    rng = np.random.default_rng(11)
    p = mode_profiles(T)
    rows = planted_rows(900, p, rng, noise=0.0, b_scale=100.0).clean
    store = _ingest(
        tmp_path, {"w.weight": ((32, 25), rows[:800]), "v.bias": ((100,), rows[800:])}, nan=True
    )
    fit = pipeline.fit(str(store), "m", modes=4, samples=300, runtime=SYNC)
    got = cmd_errors(str(store), "m", block_rows=100, runtime=SYNC)
    res32, energy = dense_cmd_residual(store, "m", np.float32)
    res64, energy64 = dense_cmd_residual(store, "m", np.float64)
    assert energy == energy64
    assert got["energy"] == pytest.approx(energy, rel=1e-12, abs=0)
    assert got["residual"] == pytest.approx(res32, rel=1e-7, abs=0)
    assert got["residual_float64"] == pytest.approx(res64, rel=1e-7, abs=0)
    assert got["relative_error"] == pytest.approx(np.sqrt(res32 / energy), rel=1e-7, abs=0)
    want64 = np.sqrt(res64 / energy)
    assert got["relative_error_float64"] == pytest.approx(want64, rel=1e-7, abs=0)
    # the check discriminates: the float64 fit would be off by far more than rel 1e-7
    assert res32 > 1.1 * res64
    # and the float64 figure is the fit's own (computed another way, from sums)
    fit_error = fit.summary["relative_error"]
    assert got["relative_error_float64"] == pytest.approx(fit_error, rel=1e-3, abs=0)
    n = 900 - 3  # rows 3 and 77 (NaN at epoch 5) and 10 (Inf at epoch 0) are left out
    assert got["n_rows"] == n and got["n_nonfinite"] == 3
    assert got["n_modes"] == fit.n_modes == 4 and got["mode_bytes"] == 1
    assert got["stored_bytes"] == 10 * n + 4 * 4 * T
    assert got["mse"] == pytest.approx(res32 / (n * T), rel=1e-7, abs=0)
    assert got["bytes_read"] == 900 * T * 4
    # the same in any block size and runtime
    again = cmd_errors(str(store), "m", runtime=THREADS)
    assert again["residual"] == pytest.approx(got["residual"], rel=1e-12, abs=0)
    json.dumps(got)


# ------------------------------------------------------------------------------- runtimes
def _strip_time(ps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in p.items() if "seconds" not in k} for p in ps]


def test_threads_and_sync_agree(planted: Path) -> None:
    gs = gram(str(planted), runtime=SYNC)
    gt = gram(str(planted), runtime=THREADS)
    assert isinstance(gt, GramResult)
    assert np.array_equal(gs.matrix, gt.matrix)
    assert (gs.n_rows, gs.n_nonfinite, gs.bytes_read) == (gt.n_rows, gt.n_nonfinite, gt.bytes_read)
    ranks = [1, 2, 4, 8]
    ds = dmd_errors(str(planted), gs, ranks, runtime=SYNC)
    dt = dmd_errors(str(planted), gt, ranks, runtime=THREADS)
    assert _strip_time(ds) == _strip_time(dt)
    assert _strip_time(pod_errors(gs, ranks)) == _strip_time(pod_errors(gt, ranks))
    # the Gram-only prediction without the error pass
    dn = dmd_errors(str(planted), gs, ranks, error_pass=False)
    for p, q in zip(dn, ds, strict=True):
        assert p["bytes_read"] == 0
        assert p["relative_error"] == p["relative_error_gram"] == q["relative_error_gram"]


# ------------------------------------------------------------------------------- kernels
# the per-block math of :mod:`pipeline.kernels.baselines` against direct float64 formulas, over
# several sub-block sizes (the kernels' own chunking of rows)
@pytest.mark.parametrize("sub_rows", [1, 7, 64, 4096])
def test_block_kernels_match_dense(sub_rows: int) -> None:
    from pipeline.kernels.baselines import (
        cmd_block_errors,
        dmd_block_errors,
        dmd_factors,
        dmd_model,
        gram_sqrt,
        partial_gram,
        zero_nonfinite,
    )

    rng = np.random.default_rng(3)
    t, rows, m = 9, 50, 3
    w = rng.standard_normal((rows, t))
    w[[4, 31], 2] = np.nan
    w[17, 0] = np.inf
    x = np.ascontiguousarray(w.T)  # time-major block
    bad = zero_nonfinite(x)
    assert np.flatnonzero(bad).tolist() == [4, 17, 31]
    ok = ~bad
    wf = w[ok]
    np.testing.assert_array_equal(x[:, bad], 0.0)
    np.testing.assert_allclose(partial_gram(x), wf.T @ wf, rtol=1e-13)

    refs = rng.standard_normal((m, t))
    mode = rng.integers(m, size=rows)
    a = rng.standard_normal(rows) * 3.0
    b = rng.standard_normal(rows) * 50.0
    a[4] = np.nan  # a model of a left-out row is never used
    got = cmd_block_errors(x, bad, mode, a, b, refs, sub_rows=sub_rows)
    for k, dt in enumerate((np.float32, np.float64)):
        ak, bk = a[ok].astype(dt).astype(np.float64), b[ok].astype(dt).astype(np.float64)
        want = ((wf - (ak[:, None] * refs[mode[ok]] + bk[:, None])) ** 2).sum()
        assert got[k] == pytest.approx(want, rel=1e-12)
    assert got[2] == pytest.approx((wf**2).sum(), rel=1e-12)

    g = wf.T @ wf
    models = [dmd_model(g, gram_sqrt(g), r) for r in (1, 3, 8)]
    at, bt, offsets = dmd_factors(models)
    errs = dmd_block_errors(x, at, bt, offsets, sub_rows=sub_rows)
    for mdl, e in zip(models, errs, strict=True):
        recon = wf[:, 1:] @ mdl.k  # Re(Phi diag(lambda^t) b) = X2 K
        assert e == pytest.approx(((wf - recon) ** 2).sum(), rel=1e-9)
        assert e == pytest.approx(mdl.residual_gram, rel=1e-6)
        if mdl.effective_rank == mdl.rank:
            assert e == pytest.approx(dense_dmd_error(wf, mdl.rank), rel=1e-6)


def test_gram_graph_builds_without_computing(planted: Path) -> None:
    """The builders only create tasks (one per block, named after the pass); combining their
    results in block order gives the Gram of the direct formula."""
    from pipeline.graph.baselines import build_gram_tasks, combine_gram, gram_block_rows

    st = pipeline.open_store(str(planted))
    meta = st.require_meta()
    grid = st.chunk_grid()
    rows = gram_block_rows(grid, T, 200)
    with pytest.raises(PipelineError, match="at least 1"):
        gram_block_rows(grid, T, 0)
    tasks, labels = build_gram_tasks(grid, meta.n_rows, rows, range(T))
    assert len(tasks) == len(labels) == 7
    assert [t.key for t in tasks] == [f"gram-{i}" for i in range(7)]
    import dask

    g, n_bad, nbytes = combine_gram(dask.compute(*tasks, scheduler="sync"), T)
    w, want_bad = _finite(planted)
    np.testing.assert_allclose(g, w.T @ w, rtol=1e-12)
    assert n_bad == want_bad and nbytes == meta.n_rows * T * 4

"""``fit`` against a dense float64 reference of the paper's algorithm (tests/helpers.py:
:func:`dense_cmd`): every chunking, every runtime, windows, edge cases (constant, NaN, indices
above 2^24, fewer modes than asked), the results' layout and summaries, idempotence,
configuration mismatches, seeded stratified sampling, and the ``fit`` command line."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import (
    F_CONSTANT,
    F_NONFINITE,
    F_REFERENCE,
    F_SAMPLED,
    PER_ROW_ARRAYS,
    SYNC,
    THREADS,
    DenseCMD,
    assert_matches_dense,
    dense_cmd,
    dense_summary,
    intercept,
    modal_state_dicts,
    mode_profiles,
    planted_rows,
    read_analysis,
    read_trajectory,
    rows_to_state_dicts,
    snapshot,
    snapshot_mtimes,
    store_layers,
    ulp_distance,
    window_of,
    write_safetensors_run,
)
from safetensors.numpy import save_file

import pipeline
from pipeline.cli import main

T = 20
MODAL_ROWS = 2000 + 50 + 1200 + 64 + 16 + 10
FIT = {"modes": 4, "samples": 200}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def modal_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 epochs of the 4-mode model (float32, bf16, fp16, float64 tensors, near-1.0 weights,
    a frozen tensor, an int64 buffer) as safetensors files."""
    root = tmp_path_factory.mktemp("modal") / "ckpts"
    write_safetensors_run(root, modal_state_dicts(T))
    return root


@pytest.fixture(scope="module")
def base_store(modal_ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model ingested with default chunking and fitted as ``base`` (read-only for tests)."""
    store = tmp_path_factory.mktemp("base") / "store.zarr"
    pipeline.ingest([str(modal_ckpts)], str(store), runtime=SYNC)
    pipeline.fit(str(store), "base", runtime=SYNC, **FIT)
    return store


def _ingest(ckpts: Path, store: Path, **kw: Any) -> Path:
    pipeline.ingest([str(ckpts)], str(store), runtime=SYNC, **kw)
    return store


def _fit(store: Path, name: str, **kw: Any) -> pipeline.FitResult:
    kw.setdefault("runtime", SYNC)
    return pipeline.fit(str(store), name, **kw)


def _dense(store: Path, name: str, **cut: Any) -> tuple[dict[str, Any], DenseCMD, np.ndarray]:
    """The analysis, the dense reference on its window and samples, and the window; checked."""
    got = read_analysis(store, name)
    w = window_of(store, name)
    d = dense_cmd(w, got["sample_index"], **cut)
    assert_matches_dense(got, d, w)
    return got, d, w


def _close(got: float | None, want: float | None, rtol: float) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return math.isclose(got, want, rel_tol=rtol, abs_tol=1e-15)


def assert_summary_matches(
    summary: dict[str, Any], want: dict[str, Any], epochs: list[int]
) -> None:
    """The stored summary equals the dense relative Frobenius errors (over the finite rows)."""
    rtol = 1e-7
    assert _close(summary["relative_error"], want["relative_error"], rtol)
    assert _close(summary["dynamics_error"], want["dynamics_error"], rtol)
    assert _close(summary["mse"], want["mse"], 1e-6)
    for g, w in zip(summary["epochs"], want["epoch_mse"] or [], strict=True):
        assert _close(g["mse"], w, 1e-6), (g, w)
    assert len(summary["modes"]) == len(want["modes"])
    for m, (g, w) in enumerate(zip(summary["modes"], want["modes"], strict=True)):
        assert g["mode"] == m and g["count"] == w["count"]
        assert _close(g["relative_error"], w["relative_error"], rtol), (m, g, w)
        assert _close(g["dynamics_error"], w["dynamics_error"], rtol), (m, g, w)
        assert _close(g["mean_abs_corr"], w["mean_abs_corr"], 1e-9), (m, g, w)
    assert [g["name"] for g in summary["layers"]] == [w["name"] for w in want["layers"]]
    for g, w in zip(summary["layers"], want["layers"], strict=True):
        assert g["count"] == w["count"]
        assert _close(g["relative_error"], w["relative_error"], rtol), (g, w)
        assert _close(g["dynamics_error"], w["dynamics_error"], rtol), (g, w)
        assert _close(g["mean_abs_corr"], w["mean_abs_corr"], 1e-9), (g, w)
    assert [e["epoch"] for e in summary["epochs"]] == epochs
    for g, w, wd in zip(summary["epochs"], want["epochs"], want["epochs_dynamics"], strict=True):
        assert _close(g["relative_error"], w, rtol), (g, w)
        assert _close(g["dynamics_error"], None if not np.isfinite(wd) else wd, rtol), (g, wd)
    assert summary["flags"] == {"constant": want["constant"], "nonfinite": want["nonfinite"]}


# --------------------------------------------------------------------------- the dense reference
@pytest.mark.parametrize(
    ("ingest_kw", "block_rows", "runtime"),
    [
        ({"chunk_rows": 97}, None, SYNC),
        ({"chunk_rows": 1000, "time_chunk": 3}, 250, SYNC),
        ({}, None, SYNC),
        ({"chunk_rows": 96, "time_chunk": 3}, 32, THREADS),
        ({"chunk_rows": 500, "codec": "lz4"}, 1000, SYNC),  # compressed; blocks of two chunks
        ({"chunk_rows": 1000}, 8, THREADS),  # 418 small tasks
    ],
    ids=[
        "chunk97",
        "chunk1000-t3-block250",
        "default",
        "chunk96-t3-block32",
        "lz4-block2chunks",
        "block8",
    ],
)
def test_fit_matches_dense_reference(
    modal_ckpts: Path,
    base_store: Path,
    tmp_path: Path,
    ingest_kw: dict[str, Any],
    block_rows: int | None,
    runtime: pipeline.RuntimeOptions,
) -> None:
    store = _ingest(modal_ckpts, tmp_path / "s.zarr", **ingest_kw)
    res = _fit(store, "m", block_rows=block_rows, runtime=runtime, **FIT)
    assert res.status == "fitted" and res.n_modes == 4
    got, dense, w = _dense(store, "m", modes=4)
    assert w.shape == (MODAL_ROWS, T)
    chunk = block_rows or (ingest_kw.get("chunk_rows") or MODAL_ROWS)
    for name in PER_ROW_ARRAYS:
        assert got[name].shape == (MODAL_ROWS,)
    assert got["block_stats"].shape[0] == -(-MODAL_ROWS // chunk) == res.blocks_run
    assert not np.isnan(got["block_stats"]).any()
    # sampling and clustering do not depend on the chunking; the results agree too
    base = read_analysis(base_store, "base")
    for k in ("sample_index", "ref_index", "sample_mode", "refs", "mode", "flags"):
        assert np.array_equal(got[k], base[k]), k
    # float32 a: the same, but where the chunking's summation order moves a float64 a across a
    # float32 rounding boundary, or the choice of roundings of a line that crosses zero
    # (stored_coefficients: one step either way) goes another way
    assert np.all(ulp_distance(got["a"], base["a"]) <= 3)
    assert (ulp_distance(got["a"], base["a"]) > 0).mean() < 0.01
    assert_summary_matches(
        got["attrs"]["summary"], dense_summary(w, dense, store_layers(store)), res.epochs
    )


def test_runtimes_give_identical_bits(modal_ckpts: Path, tmp_path: Path) -> None:
    """sync, threads and a LocalCluster of 2 worker processes write the same bytes."""
    store = _ingest(modal_ckpts, tmp_path / "s.zarr", chunk_rows=97)
    local = pipeline.RuntimeOptions(mode="local", workers=2, progress=False)
    for name, rt in (("sync", SYNC), ("threads", THREADS), ("local", local)):
        assert _fit(store, name, runtime=rt, **FIT).status == "fitted"
    files = snapshot(store)
    trees = {
        name: {k.split("/", 2)[2]: v for k, v in files.items() if k.startswith(f"analyses/{name}/")}
        for name in ("sync", "threads", "local")
    }
    assert len(trees["sync"]) > 5 * 35  # every chunk of every per-row array
    assert trees["threads"] == trees["sync"]
    assert trees["local"] == trees["sync"]
    _dense(store, "local", modes=4)


# --------------------------------------------------------------------------- results
def test_results_layout_dtypes_attributes_and_summaries(base_store: Path) -> None:
    got, dense, w = _dense(base_store, "base", modes=4)
    n, m = MODAL_ROWS, dense.n_modes
    expected = {
        "mode": (np.uint8, (n,)),
        "a": (np.float32, (n,)),
        "level": (np.float32, (n,)),
        "anchor": (np.uint8, (n,)),
        "flags": (np.uint8, (n,)),
        "refs": (np.float64, (m, T)),
        "ref_index": (np.int64, (m,)),
        "sample_index": (np.int64, (200,)),
        "sample_mode": (np.int64, (200,)),
        "epochs": (np.int64, (T,)),
    }
    for name, (dtype, shape) in expected.items():
        assert got[name].dtype == np.dtype(dtype), name
        assert got[name].shape == shape, name
    # per-row diagnostics only on request: 11 bytes per parameter
    assert "b" not in got and "corr" not in got and "residual" not in got
    assert sum(got[k].dtype.itemsize for k in PER_ROW_ARRAYS) == 11
    assert got["epochs"].tolist() == list(range(T))
    assert got["block_stats"].dtype == np.float64
    attrs = got["attrs"]
    assert attrs["schema"] == "cmd-pipeline.analysis" and attrs["version"] == 2
    assert attrs["status"] == "complete"
    assert attrs["package_version"] == pipeline.__version__
    assert attrs["n_modes"] == m == 4 and attrs["n_samples"] == 200
    cfg = attrs["config"]
    assert cfg["modes"] == 4 and cfg["threshold"] is None and cfg["samples"] == 200
    assert cfg["seed"] == 0 and cfg["window"] == ":" and cfg["epochs"] == list(range(T))
    assert cfg["diagnostics"] is False
    assert isinstance(attrs["trajectory_fingerprint"], str)
    summary = attrs["summary"]
    assert [s["reference"] for s in summary["modes"]] == got["ref_index"].tolist()
    assert_summary_matches(
        summary, dense_summary(w, dense, store_layers(base_store)), list(range(T))
    )
    # the model's structure comes through: 4 well-fitted modes, a sampled row in each
    assert 0 < summary["relative_error"] < 0.1
    assert set(got["sample_mode"].tolist()) == {0, 1, 2, 3}
    sizes = np.bincount(got["sample_mode"])
    assert np.all(np.diff(sizes) <= 0)  # modes labelled by size, largest first
    assert np.array_equal(np.flatnonzero(got["flags"] & F_SAMPLED), got["sample_index"])
    assert np.array_equal(np.flatnonzero(got["flags"] & F_REFERENCE), np.sort(got["ref_index"]))
    text = pipeline.fit(str(base_store), "base", runtime=SYNC, **FIT).summary_text()
    assert "analysis 'base' (unchanged): 4 mode(s) from 200 samples" in text


def test_constant_rows(base_store: Path, tmp_path: Path) -> None:
    """Frozen weights: flag 1, a = 0, level = the value, a valid mode, never sampled or a
    reference, and reconstructed exactly."""
    got = read_analysis(base_store, "base")
    w = read_trajectory(base_store)
    layers = {name: (lo, hi) for name, lo, hi in store_layers(base_store)}
    lo, hi = layers["frozen.weight"]
    constant = np.flatnonzero(w.max(axis=1) == w.min(axis=1))
    assert set(range(lo, hi)) <= set(constant.tolist())
    assert np.array_equal(np.flatnonzero(got["flags"] & F_CONSTANT), constant)
    assert np.all(got["flags"][constant] == F_CONSTANT)  # neither sampled nor a reference
    assert np.all(got["a"][constant] == 0.0)
    assert np.array_equal(got["level"][constant].view(np.uint32), w[constant, 0].view(np.uint32))
    assert np.all(got["mode"][constant] < 4) and np.all(got["anchor"][constant] == 0)
    assert not np.isin(got["sample_index"], constant).any()
    assert not np.isin(got["ref_index"], constant).any()
    assert got["attrs"]["summary"]["flags"]["constant"] == constant.size
    frozen = next(x for x in got["attrs"]["summary"]["layers"] if x["name"] == "frozen.weight")
    assert frozen["relative_error"] == 0.0 and frozen["mean_abs_corr"] is None
    copy = tmp_path / "copy.zarr"
    shutil.copytree(base_store, copy)
    pipeline.reconstruct(str(copy), "base", runtime=SYNC)
    rec = read_analysis(copy, "base")["reconstructed"]
    assert np.array_equal(rec[constant].view(np.uint32), w[constant].view(np.uint32))


def test_more_than_256_modes_use_uint16(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((3000, 12)).cumsum(axis=1)
    sds = rows_to_state_dicts({"w": ((3000,), torch.float32, rows)})
    store = _ingest(write_safetensors_run(tmp_path / "ck", sds)[0].parent, tmp_path / "s.zarr")
    res = _fit(store, "many", modes=300, samples=400)
    assert res.n_modes == 300
    got, _d, _w = _dense(store, "many", modes=300)
    assert got["mode"].dtype == np.uint16 and int(got["mode"].max()) >= 256
    assert got["refs"].shape == (300, 12)


def test_fewer_modes_than_asked(tmp_path: Path) -> None:
    """Two planted modes whose rows are exact multiples (+-2^k) of two profiles: asking for 5
    modes gives 2 (uint8 ids), every row in its planted mode, the negative ones with a < 0."""
    p = mode_profiles(10, ("exp", "sin"))
    rng = np.random.default_rng(2)
    truth = rng.integers(2, size=600)
    scale = rng.choice([-4.0, -1.0, -0.5, 0.25, 1.0, 2.0, 8.0], size=600)
    rows = scale[:, None] * p.astype(np.float32).astype(np.float64)[truth]
    sds = rows_to_state_dicts(
        {
            "a.weight": ((20, 20), torch.float32, rows[:400]),
            "b.weight": ((200,), torch.float32, rows[400:]),
        }
    )
    store = _ingest(write_safetensors_run(tmp_path / "ck", sds)[0].parent, tmp_path / "s.zarr")
    with pytest.warns(pipeline.PipelineWarning, match="asked for 5 modes, 2 came out"):
        res = _fit(store, "few", modes=5, samples=100)
    assert res.n_modes == 2
    got, _d, _w = _dense(store, "few", modes=5)
    assert got["mode"].dtype == np.uint8 and got["refs"].shape == (2, 10)
    row_of = {name: lo for name, lo, _hi in store_layers(store)}
    order = np.concatenate(
        [np.arange(400) + row_of["a.weight"], np.arange(400, 600) - 400 + row_of["b.weight"]]
    )
    mode = np.empty(600, dtype=np.int64)
    mode[:] = got["mode"][order]
    # the mapping planted -> fitted mode is one-to-one
    assert {(int(t), int(m)) for t, m in zip(truth, mode, strict=True)} in (
        {(0, 0), (1, 1)},
        {(0, 1), (1, 0)},
    )
    a = got["a"][order]
    # w = s_i p, r = s_ref p: a = s_i / s_ref (exact up to rounding), b = 0
    ref_scale = {}
    for r in got["ref_index"]:
        i = int(np.flatnonzero(order == r)[0])
        ref_scale[int(truth[i])] = scale[i]
    want_a = scale / np.array([ref_scale[int(t)] for t in truth])
    np.testing.assert_allclose(a, want_a, rtol=1e-6)
    assert np.all((a < 0) == (want_a < 0)) and (want_a < 0).sum() > 100
    np.testing.assert_allclose(intercept(got)[order], 0.0, atol=1e-6)
    assert got["attrs"]["summary"]["relative_error"] < 1e-6


def test_window_with_step(base_store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(base_store, copy)
    res = _fit(copy, "win", epochs="2:20:3", **FIT)
    want_epochs = [2, 5, 8, 11, 14, 17]
    assert res.epochs == want_epochs
    got = read_analysis(copy, "win")
    assert got["epochs"].tolist() == want_epochs and got["epochs"].dtype == np.int64
    assert got["refs"].shape == (res.n_modes, 6)
    assert got["attrs"]["config"]["window"] == "2:20:3"
    w = read_trajectory(copy)[:, want_epochs]  # exactly those columns (epoch e is column e)
    dense = dense_cmd(w, got["sample_index"], modes=4)
    assert_matches_dense(got, dense, w)
    assert_summary_matches(
        got["attrs"]["summary"], dense_summary(w, dense, store_layers(copy)), want_epochs
    )
    # another window is another analysis; the base one is untouched
    assert read_analysis(copy, "base")["refs"].shape == (4, T)
    for bad in ("5:6", "30:40"):
        with pytest.raises(pipeline.PipelineError, match="needs at least 3"):
            _fit(copy, "bad", epochs=bad, **FIT)
    with pytest.raises(pipeline.PipelineError, match="cannot parse window"):
        _fit(copy, "bad", epochs="a:b", **FIT)


@pytest.mark.slow
def test_indices_above_2_24(tmp_path: Path) -> None:
    """N = 2^24 + 64, T = 3; only the last 64 rows (a second tensor) vary, so every sample and
    reference sits above 2^24, where float32 can no longer hold an index."""
    big_n = 2**24
    ck = tmp_path / "ck"
    ck.mkdir()
    big = np.arange(big_n, dtype=np.float32)  # constant over the epochs: -1 + i 2^-23, exact
    big *= np.float32(2.0**-23)
    big -= np.float32(1.0)
    rng = np.random.default_rng(4)
    prof = np.array([[0.0, 1.0, 3.0], [1.0, -1.0, 0.5]])
    tail = planted_rows(64, prof, rng, noise=1e-3)
    for e in range(3):
        tensors = {"big.weight": big, "tail.weight": tail.noisy[:, e].astype(np.float32)}
        save_file(tensors, str(ck / f"epoch_{e}.safetensors"))
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(ck)], str(store), runtime=SYNC)
    assert store_layers(store) == [("big.weight", 0, big_n), ("tail.weight", big_n, big_n + 64)]
    res = _fit(store, "hi", modes=2, samples=64, block_rows=2**18)
    assert res.n_modes == 2
    import zarr

    g = zarr.open_group(str(store), mode="r", use_consolidated=False)
    an = g["analyses/hi"]
    smp, refi = an["sample_index"][...], an["ref_index"][...]
    assert smp.dtype == np.int64 and refi.dtype == np.int64
    assert np.all(smp >= big_n) and np.all(refi >= big_n)
    assert any(int(np.float32(i)) != int(i) for i in smp)  # not representable in float32
    w_tail = np.asarray(g["trajectory"][big_n:, :])
    assert np.array_equal(an["refs"][...], w_tail[refi - big_n].astype(np.float64))
    got = {k: np.asarray(an[k][big_n:]) for k in PER_ROW_ARRAYS}
    got.update(
        sample_index=smp - big_n,
        ref_index=refi - big_n,
        sample_mode=an["sample_mode"][...],
        refs=an["refs"][...],
    )
    dense = dense_cmd(w_tail, smp - big_n, modes=2)
    assert_matches_dense(got, dense, w_tail)
    # every other row is constant: a = 0, level = its value, exactly
    assert np.all(an["flags"][:big_n] == F_CONSTANT)
    step = 2**21
    for r0 in range(0, big_n, step):
        assert np.array_equal(an["level"][r0 : r0 + step], big[r0 : r0 + step])
        assert np.all(an["a"][r0 : r0 + step] == 0.0)
    summary = an.attrs["cmd_pipeline_analysis"]["summary"]
    assert summary["flags"] == {"constant": big_n, "nonfinite": 0}
    assert summary["layers"][0]["relative_error"] == 0.0


def test_nonfinite_rows(tmp_path: Path) -> None:
    """NaN/Inf in a checkpoint (ingest policy keep): flag 2, a = 0, level (b) = NaN, never
    sampled nor a reference, and left out of every error sum (per-row diagnostics stored:
    their residual is 0)."""
    rng = np.random.default_rng(9)
    p = mode_profiles(12)
    w1 = planted_rows(600, p, rng, noise=0.02)
    w2 = planted_rows(90, p, rng, noise=0.02)
    sds = rows_to_state_dicts(
        {
            "l1.weight": ((600,), torch.float32, w1.noisy),
            "l2.weight": ((90,), torch.float16, w2.noisy),
        }
    )
    sds[4]["l1.weight"][[3, 50]] = float("nan")
    sds[7]["l2.weight"][7] = float("inf")
    sds[0]["l2.weight"][8] = float("-inf")
    store = _ingest(write_safetensors_run(tmp_path / "ck", sds)[0].parent, tmp_path / "s.zarr")
    # K = 689 asked, 686 finite rows: all are sampled, and the fit says so
    with pytest.warns(pipeline.PipelineWarning, match="only 686 parameters vary"):
        res = _fit(store, "nan", modes=4, samples=689, diagnostics=True)
    got, dense, w = _dense(store, "nan", modes=4)
    row = {name: lo for name, lo, _hi in store_layers(store)}
    bad = np.array(
        sorted(
            [
                row["l1.weight"] + 3,
                row["l1.weight"] + 50,
                row["l2.weight"] + 7,
                row["l2.weight"] + 8,
            ]
        )
    )
    assert np.array_equal(np.flatnonzero(~np.isfinite(w).all(axis=1)), bad)
    assert np.array_equal(np.flatnonzero(got["flags"] & F_NONFINITE), bad)
    assert np.all(got["flags"][bad] == F_NONFINITE)
    assert np.all(got["a"][bad] == 0) and np.all(np.isnan(got["level"][bad]))
    assert np.all(got["residual"][bad] == 0) and np.all(got["mode"][bad] < res.n_modes)
    assert not np.isin(got["sample_index"], bad).any()
    assert got["sample_index"].size == 690 - 4  # all the others were sampled
    assert got["attrs"]["n_varying"] == 686
    summary = got["attrs"]["summary"]
    assert summary["flags"]["nonfinite"] == 4
    assert math.isfinite(summary["relative_error"])
    assert_summary_matches(summary, dense_summary(w, dense, store_layers(store)), list(range(12)))


# --------------------------------------------------------------------------- behaviour
def test_analyses_coexist_and_rerun_changes_nothing(modal_ckpts: Path, tmp_path: Path) -> None:
    store = _ingest(modal_ckpts, tmp_path / "s.zarr", chunk_rows=500)
    runs = {
        "m4": {"modes": 4, "samples": 200},
        "t01": {"threshold": 0.1, "samples": 150, "seed": 3},
        "win": {"modes": 3, "samples": 100, "epochs": "4:16:2"},
    }
    before: dict[str, dict[str, bytes]] = {}
    for name, kw in runs.items():
        assert _fit(store, name, **kw).status == "fitted"
        before[name] = {
            k: v for k, v in snapshot(store).items() if k.startswith(f"analyses/{name}/")
        }
    # a later fit leaves the earlier analyses alone
    after = snapshot(store)
    for files in before.values():
        assert {k: after[k] for k in files} == files
    assert pipeline.info(str(store))["analyses"] == ["m4", "t01", "win"]
    for name, kw in runs.items():
        cut = {k: kw[k] for k in ("modes", "threshold") if k in kw}
        _dense(store, name, **cut)
    state = snapshot_mtimes(store)
    for name, kw in runs.items():
        again = _fit(store, name, **kw)
        assert again.status == "unchanged" and again.blocks_run == 0
    assert snapshot_mtimes(store) == state  # no file written, not even rewritten


def test_other_configuration_needs_force(base_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "copy.zarr"
    shutil.copytree(base_store, store)
    _fit(store, "other", modes=2, samples=100)
    state = snapshot_mtimes(store)
    for change in (
        {"modes": 3},
        {"modes": None, "threshold": 0.2},
        {"samples": 150},
        {"seed": 1},
        {"epochs": "0:10"},
    ):
        kw = {**FIT, **change}
        with pytest.raises(pipeline.ConfigMismatchError, match="force=True"):
            _fit(store, "base", **kw)
    assert snapshot_mtimes(store) == state
    res = _fit(store, "base", modes=3, samples=150, seed=1, force=True)
    assert res.status == "fitted" and res.n_modes == 3
    got, _dense_ref, _w = _dense(store, "base", modes=3)
    assert got["attrs"]["config"]["seed"] == 1 and got["sample_index"].size == 150
    # the sibling analysis is untouched
    files = snapshot_mtimes(store)
    assert {k: v for k, v in files.items() if k.startswith("analyses/other/")} == {
        k: v for k, v in state.items() if k.startswith("analyses/other/")
    }
    assert pipeline.info(str(store))["analyses"] == ["base", "other"]


def test_appended_epochs(tmp_path: Path) -> None:
    """After epochs are appended, a study with an explicit window is unchanged, while the
    default window (all epochs) now selects others: the error says exactly that."""
    sds = modal_state_dicts(10, seed=4)
    write_safetensors_run(tmp_path / "ck8", sds[:8])
    write_safetensors_run(tmp_path / "ck10", sds)
    store = _ingest(tmp_path / "ck8", tmp_path / "s.zarr")
    _fit(store, "all", modes=3, samples=90)
    _fit(store, "w", modes=3, samples=90, epochs="0:8")
    _ingest(tmp_path / "ck10", store)
    assert pipeline.info(str(store))["epochs"] == list(range(10))
    assert _fit(store, "w", modes=3, samples=90, epochs="0:8").status == "unchanged"
    with pytest.raises(pipeline.ConfigMismatchError) as e:
        _fit(store, "all", modes=3, samples=90)
    assert "epochs: stored [0, 1, ..., 7] (8 epochs), requested [0, 1, ..., 9] (10 epochs)" in str(
        e.value
    )
    res = _fit(store, "all", modes=3, samples=90, force=True)
    assert res.status == "fitted" and res.epochs == list(range(10))
    _dense(store, "all", modes=3)


def test_bad_arguments(base_store: Path, tmp_path: Path) -> None:
    with pytest.raises(pipeline.PipelineError, match="exactly one"):
        _fit(base_store, "x")
    with pytest.raises(pipeline.PipelineError, match="exactly one"):
        _fit(base_store, "x", modes=2, threshold=0.1)
    with pytest.raises(pipeline.PipelineError, match="at least 1"):
        _fit(base_store, "x", modes=0)
    with pytest.raises(pipeline.PipelineError, match="at least 2"):
        _fit(base_store, "x", modes=2, samples=1)
    with pytest.raises(pipeline.PipelineError, match="divide"):
        _fit(base_store, "x", modes=2, block_rows=7)
    with pytest.raises(pipeline.StoreError):
        _fit(tmp_path / "nothing.zarr", "x", modes=2)
    with pytest.raises(pipeline.StoreError, match="invalid analysis name"):
        _fit(base_store, "a/b", modes=2)
    assert pipeline.info(str(base_store))["analyses"] == ["base"]


# --------------------------------------------------------------------------- sampling
def test_sampling_is_seeded_stratified_and_skips_constants(tmp_path: Path) -> None:
    """40 small tensors (5 rows), 3 frozen small ones and one of 20,000 rows: with K/2 > L
    every varying layer is sampled, with K/2 <= L the draws are uniform; seeds reproduce."""
    rng = np.random.default_rng(0)
    p = mode_profiles(6)
    spec: dict[str, tuple[tuple[int, ...], torch.dtype, np.ndarray]] = {}
    for i in range(40):
        spec[f"small{i:02d}.weight"] = (
            (5,),
            torch.float32,
            planted_rows(5, p, rng, noise=0.1).noisy,
        )
    for i in range(3):
        spec[f"frozen{i}.weight"] = (
            (5,),
            torch.float32,
            np.repeat(rng.standard_normal((5, 1)), 6, axis=1),
        )
    spec["huge.weight"] = ((100, 200), torch.float32, planted_rows(20_000, p, rng, noise=0.1).noisy)
    store = _ingest(
        write_safetensors_run(tmp_path / "ck", rows_to_state_dicts(spec))[0].parent,
        tmp_path / "s.zarr",
    )
    layers = store_layers(store)
    assert len(layers) == 44
    for name, kw in {
        "k200": {"samples": 200, "seed": 0},
        "k200-again": {"samples": 200, "seed": 0},
        "k200-seed1": {"samples": 200, "seed": 1},
        "k60": {"samples": 60, "seed": 0},
    }.items():
        _fit(store, name, modes=4, **kw)
    smp = {
        name: read_analysis(store, name)["sample_index"]
        for name in ("k200", "k200-again", "k200-seed1", "k60")
    }
    assert np.array_equal(smp["k200"], smp["k200-again"])
    assert not np.array_equal(smp["k200"], smp["k200-seed1"])
    for name in ("k200", "k200-seed1", "k60"):
        assert smp[name].size == (60 if name == "k60" else 200)
        assert np.array_equal(smp[name], np.unique(smp[name]))
    frozen = [(lo, hi) for n, lo, hi in layers if n.startswith("frozen")]
    small = [(lo, hi) for n, lo, hi in layers if n.startswith("small")]
    for name in ("k200", "k200-seed1", "k60"):
        for lo, hi in frozen:  # constant rows are never sampled
            assert not ((smp[name] >= lo) & (smp[name] < hi)).any()
    for name in ("k200", "k200-seed1"):  # K/2 = 100 > 44 layers: K/(2L) = 2 rows per layer
        for lo, hi in small:
            assert ((smp[name] >= lo) & (smp[name] < hi)).sum() >= 2
    # K/2 = 30 <= 44: uniform, so the 200 small rows (1% of N) get about 0.6 of 60 draws
    in_small = sum(int(((smp["k60"] >= lo) & (smp["k60"] < hi)).sum()) for lo, hi in small)
    assert in_small <= 5
    flags = read_analysis(store, "k200")["flags"]
    assert np.array_equal(np.flatnonzero(flags & F_SAMPLED), smp["k200"])
    assert not np.any((flags & F_SAMPLED) & (flags & F_CONSTANT))


# --------------------------------------------------------------------------- command line
def _cli(*args: str | Path) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_fit_help() -> None:
    r = _cli("fit", "--help")
    assert r.exit_code == 0
    for opt in (
        "--store",
        "--name",
        "--modes",
        "--threshold",
        "--samples",
        "--seed",
        "--epochs",
        "--block-rows",
        "--diagnostics",
        "--force",
    ):
        assert opt in r.output
    assert "fit" in _cli("--help").output and "reconstruct" in _cli("--help").output
    # the installed console script
    exe = Path(sys.executable).parent / "cmd-pipeline"
    out = subprocess.run([str(exe), "fit", "--help"], capture_output=True, text=True, check=True)
    assert "Post-hoc CMD" in out.stdout and "--threshold" in out.stdout


@pytest.mark.parametrize(
    "cut", [(), ("--modes", "2", "--threshold", "0.1")], ids=["neither", "both"]
)
def test_cli_fit_needs_exactly_one_cut(base_store: Path, cut: tuple[str, ...]) -> None:
    r = _cli("fit", "--store", base_store, "--name", "x", *cut, "--sync", "--no-progress")
    assert r.exit_code != 0
    assert "exactly one of --modes or --threshold" in r.output
    assert "Traceback" not in r.output
    assert pipeline.info(str(base_store))["analyses"] == ["base"]


def test_cli_fit_runs_reports_and_refuses_other_config(base_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "copy.zarr"
    shutil.copytree(base_store, store)
    args = (
        "fit",
        "--store",
        store,
        "--name",
        "cli",
        "-m",
        "3",
        "-k",
        "90",
        "--sync",
        "--no-progress",
    )
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    assert "analysis 'cli' (fitted): 3 mode(s) from 90 samples" in r.output
    assert "constant parameters: 16" in r.output
    _dense(store, "cli", modes=3)
    r = _cli(*args)
    assert r.exit_code == 0 and "(unchanged)" in r.output
    r = _cli(
        "fit", "--store", store, "--name", "cli", "-m", "4", "-k", "90", "--sync", "--no-progress"
    )
    assert r.exit_code == 4
    assert r.stderr.strip().startswith("error: analysis 'cli' exists with another configuration")
    assert "--force" in r.stderr
    # per-row diagnostics are part of the configuration: asked for, they need --force
    r = _cli(*args, "--diagnostics")
    assert r.exit_code == 4 and "diagnostics: stored False, requested True" in r.stderr
    r = _cli(*args, "--diagnostics", "--force")
    assert r.exit_code == 0, r.output
    got, _d, _w = _dense(store, "cli", modes=3)  # corr and residual checked there
    assert got["attrs"]["config"]["diagnostics"] is True
    assert got["corr"].dtype == got["residual"].dtype == np.float32
    assert sum(got[k].dtype.itemsize for k in (*PER_ROW_ARRAYS, "corr", "residual")) == 19

"""``fit`` must never hand a user a number that is wrong or smaller than asked without saying so:
per-layer summaries across empty tensors, the sample count when most parameters are frozen,
windows too short to correlate, fewer modes than asked, and the headline error measured
against the dynamics rather than the weights' magnitude."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    SYNC,
    dense_cmd,
    dense_summary,
    mode_profiles,
    planted_rows,
    read_analysis,
    rows_to_state_dicts,
    store_layers,
    window_of,
    write_safetensors_run,
)

import pipeline
from pipeline.errors import PipelineError


def _store(tmp_path: Path, spec: dict[str, Any], **ingest: Any) -> Path:
    ck = tmp_path / "ck"
    write_safetensors_run(ck, rows_to_state_dicts(spec))
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(ck)], str(store), runtime=SYNC, **ingest)
    return store


def test_per_layer_summary_across_an_empty_tensor(tmp_path: Path) -> None:
    """An empty tensor between two stored tensors: every layer's rows are counted under its
    own name (on main, c.weight's 200 rows were reported under b.empty)."""
    rng = np.random.default_rng(0)
    p = mode_profiles(12, ("exp", "sin"))
    rows = planted_rows(300, p, rng, noise=1e-3).noisy
    store = _store(
        tmp_path,
        {
            "a.weight": ((100,), torch.float32, rows[:100]),
            "b.empty": ((0, 4), torch.float32, np.zeros((0, 12))),
            "c.weight": ((10, 20), torch.float32, rows[100:]),
        },
        chunk_rows=64,  # blocks that start inside a.weight, span b.empty, end inside c.weight
    )
    res = pipeline.fit(str(store), "s", modes=2, samples=60, runtime=SYNC)
    layers = {entry["name"]: entry for entry in res.summary["layers"]}
    assert layers["a.weight"]["count"] == 100
    assert layers["c.weight"]["count"] == 200
    assert layers.get("b.empty", {"count": 0})["count"] == 0
    got = read_analysis(store, "s")
    w = window_of(store, "s")
    want = dense_summary(w, dense_cmd(w, got["sample_index"], modes=2), store_layers(store))
    for entry in want["layers"]:
        g = layers[entry["name"]]
        assert g["count"] == entry["count"]
        if entry["relative_error"] is None:
            assert g["relative_error"] is None
        else:
            assert g["relative_error"] == pytest.approx(entry["relative_error"], rel=1e-7)
            assert g["dynamics_error"] == pytest.approx(entry["dynamics_error"], rel=1e-7)


def test_headline_error_is_relative_to_the_dynamics(tmp_path: Path) -> None:
    """Weights of magnitude ~10 moving by ~1e-2 with noise: ‖W − Ŵ‖/‖W‖ is tiny whatever the
    fit, ‖W − Ŵ‖/‖W − mean_t W‖ is what the fit explains; the headline is the latter."""
    rng = np.random.default_rng(1)
    p = mode_profiles(15, ("exp", "sin", "cos"))
    pl = planted_rows(400, p, rng, noise=0.3, a_range=(0.005, 0.02), b_scale=10.0)
    store = _store(tmp_path, {"w": ((400,), torch.float32, pl.noisy)})
    res = pipeline.fit(str(store), "s", modes=3, samples=100, runtime=SYNC)
    got = read_analysis(store, "s")
    w = window_of(store, "s")
    x = w.astype(np.float64)
    d = dense_cmd(w, got["sample_index"], modes=3)
    centred = x - x.mean(axis=1, keepdims=True)
    want = np.linalg.norm(x - d.recon) / np.linalg.norm(centred)
    assert res.summary["dynamics_error"] == pytest.approx(want, rel=1e-7)
    assert res.summary["relative_error"] == pytest.approx(
        np.linalg.norm(x - d.recon) / np.linalg.norm(x), rel=1e-7
    )
    assert res.summary["dynamics_error"] > 100 * res.summary["relative_error"]
    text = res.summary_text()
    assert f"error relative to the dynamics {want:.4g}" in text
    assert "‖W‖" in text  # the other measure stays, labelled


def test_window_of_fewer_than_three_epochs_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    p = mode_profiles(6, ("exp", "sin"))
    store = _store(tmp_path, {"w": ((50,), torch.float32, planted_rows(50, p, rng).noisy)})
    for window in ("0:2", "0:1", "4:6"):
        with pytest.raises(PipelineError, match="at least 3"):
            pipeline.fit(str(store), "s", modes=2, samples=20, epochs=window, runtime=SYNC)
    assert pipeline.fit(str(store), "s", modes=2, samples=20, epochs="0:3", runtime=SYNC)


def test_more_modes_than_samples_says_why_fewer_came_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    p = mode_profiles(10, ("exp", "sin"))
    store = _store(tmp_path, {"w": ((300,), torch.float32, planted_rows(300, p, rng).noisy)})
    with pytest.warns(pipeline.PipelineWarning, match="at most 20 modes from 20 samples"):
        res = pipeline.fit(str(store), "s", modes=50, samples=20, runtime=SYNC)
    assert res.n_modes <= 20
    assert any("samples" in n for n in res.summary["notes"])
    # two planted modes of exact multiples (powers of 2 of float32 profiles), ten asked:
    # two come out, and the result says why
    p32 = p.astype(np.float32).astype(np.float64)
    scale = rng.choice([-2.0, -0.5, 0.25, 1.0, 4.0], size=300)
    rows = scale[:, None] * p32[rng.integers(2, size=300)]
    exact = _store(tmp_path / "exact", {"w": ((300,), torch.float32, rows)})
    with pytest.warns(pipeline.PipelineWarning, match="asked for 10 modes, 2 came out"):
        res = pipeline.fit(str(exact), "t", modes=10, samples=100, runtime=SYNC)
    assert res.n_modes == 2
    assert any("asked for 10" in n for n in res.summary["notes"])
    assert "asked for 10" in res.summary_text()


@pytest.fixture(scope="module")
def frozen_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 frozen tensors of 2,000 rows and one trained head of 500 rows (120,500 rows): the
    fine-tuning case, where almost every draw of a stratified sample is constant."""
    tmp = tmp_path_factory.mktemp("frozen")
    rng = np.random.default_rng(4)
    t_steps = 8
    p = mode_profiles(t_steps, ("exp", "sin", "cos"))
    spec: dict[str, Any] = {}
    for i in range(60):
        spec[f"backbone.{i}.weight"] = (
            (40, 50),
            torch.float32,
            np.repeat(rng.standard_normal((2000, 1)), t_steps, axis=1),
        )
    spec["head.weight"] = ((500,), torch.float32, planted_rows(500, p, rng, noise=1e-3).noisy)
    return _store(tmp, spec, chunk_rows=8192)


def test_sampling_finds_k_varying_rows_behind_a_frozen_backbone(frozen_backbone: Path) -> None:
    """K = 300 of the 500 varying rows exist: exactly 300 distinct varying rows are sampled
    (on main: 188 of K = 1000 and fewer than asked for K = 300, silently)."""
    head = dict((n, (lo, hi)) for n, lo, hi in store_layers(frozen_backbone))["head.weight"]
    res = pipeline.fit(str(frozen_backbone), "k300", modes=3, samples=300, runtime=SYNC)
    got = read_analysis(frozen_backbone, "k300")
    idx = got["sample_index"]
    assert res.n_samples == 300 == idx.size == np.unique(idx).size
    assert np.all((idx >= head[0]) & (idx < head[1]))
    assert res.summary["notes"] == []
    # the same seed gives the same sample again (the scan is seeded per block)
    again = pipeline.fit(str(frozen_backbone), "again", modes=3, samples=300, runtime=SYNC)
    assert np.array_equal(read_analysis(frozen_backbone, "again")["sample_index"], idx)
    assert again.n_samples == 300


def test_sampling_says_when_fewer_than_k_vary(frozen_backbone: Path) -> None:
    with pytest.warns(pipeline.PipelineWarning, match="only 500 parameters vary"):
        res = pipeline.fit(str(frozen_backbone), "k1000", modes=3, samples=1000, runtime=SYNC)
    assert res.n_samples == 500
    assert any("only 500 parameters vary" in n for n in res.summary["notes"])
    assert "only 500 parameters vary" in res.summary_text()
    got = read_analysis(frozen_backbone, "k1000")
    assert got["attrs"]["n_varying"] == 500


def test_study_interrupted_under_the_old_stats_layout_is_refitted(tmp_path: Path) -> None:
    """A study interrupted under the previous release (block statistics without layer ids or
    centred energies, no ``stats_layout``) is fitted again from the start, not resumed with
    rows it would misread; a complete one of that release still shows in ``info``."""
    import zarr

    rng = np.random.default_rng(6)
    p = mode_profiles(8, ("exp", "sin"))
    store = _store(tmp_path, {"w": ((200,), torch.float32, planted_rows(200, p, rng).noisy)})
    first = pipeline.fit(str(store), "s", modes=2, samples=50, runtime=SYNC)
    g = zarr.open_group(str(store / "analyses" / "s"), mode="r+", use_consolidated=False)
    attrs = dict(g.attrs["cmd_pipeline_analysis"])
    old = {k: v for k, v in attrs.items() if k != "stats_layout"}
    old["summary"] = {k: v for k, v in attrs["summary"].items() if k != "dynamics_error"}
    g.attrs["cmd_pipeline_analysis"] = old
    text = pipeline.ops.info.format_info(pipeline.info(str(store)))
    assert "error relative to the dynamics -" in text
    g.attrs["cmd_pipeline_analysis"] = {**old, "status": "running"}
    again = pipeline.fit(str(store), "s", modes=2, samples=50, runtime=SYNC)
    assert again.status == "fitted" and again.blocks_kept == 0
    assert again.summary["dynamics_error"] == first.summary["dynamics_error"]

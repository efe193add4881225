"""A study smaller than what it models (study version 2): the default study's arrays cost 11
bytes per parameter (the float32 trajectory: 4 T), its float32 anchored model stays within one
float32 ulp of the dense float64 fit (:func:`helpers.dense_cmd`, written from the paper)
wherever the fitted values keep their sign, per-row diagnostics come only on request, and
version-1 studies (``tests/fixtures/store_v1.zarr``, written by an older release: float64 a
and b, float32 corr and residual) are still read by every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.make_store_v1 import checkpoint, model
from helpers import (
    DIAGNOSTIC_ARRAYS,
    PER_ROW_ARRAYS,
    PER_ROW_ARRAYS_V1,
    SYNC,
    DenseCMD,
    Planted,
    assert_matches_dense,
    dense_cmd,
    mode_profiles,
    planted_rows,
    read_analysis,
    read_trajectory,
    rows_to_state_dicts,
    stored_model,
    ulp_distance,
    window_of,
    write_safetensors_run,
)

import pipeline
from pipeline.ops.compare import compare
from pipeline.ops.info import format_info
from pipeline.ops.report import _stored_cell
from pipeline.ops.stability import stability_study

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "store_v1.zarr"
T = 16


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows that defeat float32 a and b: LayerNorm-like weights near 1.0 moving by 1e-4 on a
    reference that moves by 1e-2 (|b| ~ 100 |w|), weights that cross zero, weights that grow
    from 1e-3 to 1 (large relative movement), and ordinary ones; fitted as ``m`` (default)
    and ``d`` (with per-row diagnostics)."""
    rng = np.random.default_rng(7)
    p = mode_profiles(T)
    ln = planted_rows(400, p[[0, 2]], rng, noise=1e-3, a_range=(0.5, 2.0))
    near_one = Planted(ln.profiles, ln.mode, ln.a, ln.b, 1 + 1e-4 * ln.clean, 1 + 1e-4 * ln.noisy)
    big_ref = 1.0 + 1e-2 * planted_rows(40, p[[0, 2]], rng, noise=1e-3, b_scale=0.0).noisy
    crossing = planted_rows(600, p, rng, noise=1e-3, b_scale=0.3)
    growing = planted_rows(300, p[[0]], rng, noise=1e-4, a_range=(0.5, 1.0), b_scale=0.0)
    growing.noisy = 1e-3 + np.abs(growing.noisy)
    spec = {
        "ln.weight": ((400,), torch.float32, near_one.noisy),
        "ref.weight": ((40,), torch.float32, big_ref),
        "fc.weight": ((20, 30), torch.float32, crossing.noisy),
        "grow.weight": ((300,), torch.float32, growing.noisy),
    }
    sds = rows_to_state_dicts(spec)
    ck = write_safetensors_run(tmp_path_factory.mktemp("ck"), sds)[0].parent
    store = tmp_path_factory.mktemp("planted") / "s.zarr"
    pipeline.ingest([str(ck)], str(store), runtime=SYNC)
    pipeline.fit(str(store), "m", modes=4, samples=120, runtime=SYNC)
    pipeline.fit(str(store), "d", modes=4, samples=120, diagnostics=True, runtime=SYNC)
    return store


@pytest.fixture(scope="module")
def dense(planted: Path) -> DenseCMD:
    """The dense float64 reference on the studies' window and samples (the same for both)."""
    got = read_analysis(planted, "m")
    assert np.array_equal(got["sample_index"], read_analysis(planted, "d")["sample_index"])
    return dense_cmd(window_of(planted, "m"), got["sample_index"], modes=4)


def _bytes_per_row(store: Path, name: str) -> int:
    """Bytes per parameter of the study's (N,) arrays, from their Zarr metadata."""
    import zarr

    g = zarr.open_group(str(store), mode="r", use_consolidated=False)[f"analyses/{name}"]
    n = pipeline.info(str(store))["n_rows"]
    return sum(np.dtype(g[k].dtype).itemsize for k in g.array_keys() if g[k].shape == (n,))


def test_a_default_study_costs_11_bytes_per_parameter(planted: Path) -> None:
    got = read_analysis(planted, "m")
    assert got["attrs"]["version"] == 2 and got["attrs"]["config"]["diagnostics"] is False
    per_row = {k for k, v in got.items() if isinstance(v, np.ndarray) and v.shape == got["a"].shape}
    assert per_row == set(PER_ROW_ARRAYS)
    assert _bytes_per_row(planted, "m") == 11 < 12 < 4 * T
    info = pipeline.info(str(planted))["analysis_details"]
    brief = {a["name"]: a for a in info}
    assert brief["m"]["bytes_per_parameter"] == 11 and brief["m"]["version"] == 2
    assert brief["d"]["bytes_per_parameter"] == 19 and brief["d"]["diagnostics"] is True
    assert _bytes_per_row(planted, "d") == 19
    assert set(PER_ROW_ARRAYS) | set(DIAGNOSTIC_ARRAYS) <= set(read_analysis(planted, "d"))
    # the v1 fixture: 26 bytes per parameter (float64 a and b, float32 corr and residual)
    assert _bytes_per_row(FIXTURE, "s1") == 26


def test_the_stored_model_is_within_one_ulp_of_the_float64_fit(planted: Path, dense: DenseCMD) -> None:
    """Against the dense float64 fit (modes, a and b from the paper's formulas) rounded to
    float32: at most 1 ulp at every value of every row whose fitted values keep their sign
    (3 where they cross zero), where float32 a and b would be tens of ulps off."""
    got = read_analysis(planted, "m")
    assert_matches_dense(got, dense, window_of(planted, "m"))  # the 1 / 3 ulp bounds too
    want = dense.recon.astype(np.float32)
    same = got["mode"].astype(np.int64) == dense.mode
    crossing = (dense.recon.min(axis=1) < 0) & (dense.recon.max(axis=1) > 0)
    assert crossing.sum() > 100 and (~crossing).sum() > 500
    far = ulp_distance(stored_model(got).astype(np.float32), want)[same]
    assert far[~crossing[same]].max() <= 1
    assert (far > 1).mean() < 1e-3  # values off by 2-3 ulps: near zero crossings only
    # the same rows in float32 a and b (the intercept form) cancel
    naive = (
        dense.a.astype(np.float32).astype(np.float64)[:, None] * dense.refs[dense.mode]
        + dense.b.astype(np.float32).astype(np.float64)[:, None]
    ).astype(np.float32)
    off = ulp_distance(naive, want)[same]
    assert off[~crossing[same]].max() > 10 and (off > 1).mean() > 10 * (far > 1).mean()
    # and reconstruct writes that model
    pipeline.reconstruct(str(planted), "m", runtime=SYNC)
    rec = read_analysis(planted, "m")["reconstructed"]
    assert np.array_equal(rec.view(np.uint32), stored_model(got).astype(np.float32).view(np.uint32))


def test_diagnostics_are_the_same_fit_with_corr_and_residual(planted: Path, dense: DenseCMD) -> None:
    m, d = read_analysis(planted, "m"), read_analysis(planted, "d")
    for k in PER_ROW_ARRAYS:
        assert np.array_equal(m[k], d[k], equal_nan=True), k
    assert m["attrs"]["summary"] == d["attrs"]["summary"]
    assert_matches_dense(d, dense, window_of(planted, "d"))  # corr and residual too
    # the report says what is stored
    attrs = m["attrs"]
    assert _stored_cell(attrs, T).startswith("11 B (mode uint8, a float32, level float32, anchor uint8")
    assert "with per-row diagnostics" in _stored_cell(d["attrs"], T)


# --------------------------------------------------------------------------- version 1
@pytest.fixture
def v1(tmp_path: Path) -> Path:
    dest = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE, dest)
    return dest


def _v1_model(store: Path) -> tuple[dict, np.ndarray]:
    """The fixture study's arrays and its model a r + b (float64, by the documented formula)."""
    got = read_analysis(store, "s1")
    assert got["attrs"]["version"] == 1 and set(PER_ROW_ARRAYS_V1) <= set(got)
    assert got["a"].dtype == got["b"].dtype == np.float64
    mode = got["mode"].astype(np.int64)
    return got, got["a"][:, None] * got["refs"][mode] + got["b"][:, None]


def test_a_version_1_study_is_read_by_info_export_reconstruct_and_report(v1: Path, tmp_path: Path) -> None:
    got, want = _v1_model(v1)
    info = pipeline.info(str(v1))
    brief = info["analysis_details"][0]
    assert brief["status"] == "complete" and brief["version"] == 1
    assert brief["bytes_per_parameter"] == 26 and brief["diagnostics"] is True
    assert "26 B per parameter (study v1, with per-row diagnostics)" in format_info(info)
    # export of the CMD weights: a r + b at the epoch, as float32, in the original layout
    sd = pipeline.state_dict(str(v1), 2, analysis="s1")
    flat = torch.cat([sd[t.name].reshape(-1) for t in _stored(v1)]).numpy()
    assert np.array_equal(flat.view(np.uint32), want[:, 2].astype(np.float32).view(np.uint32))
    m = model()
    m.load_state_dict(sd, strict=True)
    res = pipeline.reconstruct(str(v1), "s1", runtime=SYNC)
    assert res.blocks_written == 3
    rec = read_analysis(v1, "s1")["reconstructed"]
    assert np.array_equal(rec.view(np.uint32), want.astype(np.float32).view(np.uint32))
    out = pipeline.report(str(v1), "s1", out=tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "26 B (mode uint8, a float64, b float64, flags uint8, corr float32, residual float32" in page
    data = pipeline.load_study_data(str(v1), "s1")
    np.testing.assert_array_equal(data.sample_b, got["b"][got["sample_index"]])
    assert out.figures
    assert read_analysis(v1, "s1")["attrs"]["version"] == 1  # nothing relabelled


def test_a_version_1_study_is_read_by_compare_stability_and_evaluate(v1: Path) -> None:
    # a version-2 study beside it, on the same trajectory: fit writes the new layout there
    pipeline.fit(str(v1), "s2", modes=2, samples=30, runtime=SYNC)
    assert read_analysis(v1, "s2")["attrs"]["version"] == 2
    res = compare([(str(v1), "s1"), (str(v1), "s2")], delays=1, shuffles=4, runtime=SYNC)
    assert len(res.runs) == 2 and np.isfinite(res.distances).all()
    st = stability_study(str(v1), name="s1", runtime=SYNC)
    assert st.saved_to is not None and st.result.layers
    inputs = torch.linspace(-1, 1, 5 * 6).reshape(5, 6)

    def evaluator(sd: dict) -> tuple[float, float]:
        net = model()
        net.load_state_dict(sd, strict=True)
        net.eval()
        with torch.no_grad():
            out = net(inputs)
        return float((out**2).mean()), float((out.argmax(dim=1) == 0).float().mean())

    ev = pipeline.evaluate(str(v1), "s1", evaluator=evaluator, sweep_modes=None, runtime=SYNC)
    attrs = read_analysis(v1, "s1")["attrs"]
    assert attrs["version"] == 1 and attrs["evaluation"]["final"]["epoch"] == 3
    # the GD weights are the recorded ones, the CMD weights the v1 model's
    gd = evaluator(checkpoint(3))
    assert ev.evaluation["epochs"][-1]["gd_loss"] == pytest.approx(gd[0], rel=1e-6, abs=1e-12)
    json.dumps(ev.evaluation)


def test_refitting_a_version_1_study(v1: Path) -> None:
    """The same configuration: unchanged (a complete study of version 1 is read as it is);
    with diagnostics asked for, refused without force, then refitted as version 2."""
    res = pipeline.fit(str(v1), "s1", modes=2, samples=30, block_rows=40, runtime=SYNC)
    assert res.status == "unchanged"
    with pytest.raises(pipeline.ConfigMismatchError, match="diagnostics: stored False, requested True"):
        pipeline.fit(str(v1), "s1", modes=2, samples=30, block_rows=40, diagnostics=True, runtime=SYNC)
    pipeline.fit(str(v1), "s1", modes=2, samples=30, diagnostics=True, force=True, runtime=SYNC)
    got = read_analysis(v1, "s1")
    assert got["attrs"]["version"] == 2 and "b" not in got and "corr" in got


def test_an_interrupted_version_1_study_is_fitted_again(v1: Path) -> None:
    """A version-1 study left ``running`` (interrupted under the older release) cannot be
    finished with version-2 arrays: the same fit starts it again, as version 2."""
    import zarr

    g = zarr.open_group(str(v1), mode="r+", use_consolidated=False)["analyses/s1"]
    g.attrs["cmd_pipeline_analysis"] = {**g.attrs["cmd_pipeline_analysis"], "status": "running"}
    res = pipeline.fit(str(v1), "s1", modes=2, samples=30, block_rows=40, runtime=SYNC)
    assert res.status == "fitted"
    got = read_analysis(v1, "s1")
    assert got["attrs"]["version"] == 2 and set(PER_ROW_ARRAYS) <= set(got) and "b" not in got
    assert "s1: complete" in format_info(pipeline.info(str(v1)))


def _stored(store: Path) -> list:
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    return meta.stored_tensors()


def test_the_v1_fixture_is_untouched() -> None:
    """The tests above work on copies (the fixture holds the older release's bytes)."""
    attrs = json.loads((FIXTURE / "analyses" / "s1" / "zarr.json").read_text())["attributes"]
    assert attrs["cmd_pipeline_analysis"]["version"] == 1
    assert not (FIXTURE / "analyses" / "s1" / "reconstructed").exists()
    assert read_trajectory(FIXTURE).shape[1] == 4


def test_the_report_plots_the_kept_samples_without_reading_the_trajectory(
    planted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fit keeps the K sampled profiles (K x Tw float32, the values it clustered); the
    report plots them from the study, not from K scattered reads of the store."""
    from pipeline.store.trajectory import ChunkGrid

    got = read_analysis(planted, "m")
    want = window_of(planted, "m")[got["sample_index"]]
    assert got["sample_profiles"].dtype == np.float32
    assert np.array_equal(got["sample_profiles"], want.astype(np.float32))

    def no_read(*_a, **_k):
        raise AssertionError("the report read the trajectory")

    monkeypatch.setattr(ChunkGrid, "read_scattered", no_read)
    rep = pipeline.report(str(planted), "m", out=tmp_path / "r.html")
    assert Path(rep.html).read_text().count("<img") >= 3

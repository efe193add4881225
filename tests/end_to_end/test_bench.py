"""`cmd-pipeline bench` at tiny sizes: every section runs and is reported, and the figures it
reports are checked against dense numpy on the kept stores. No timing assertions (the real
figures are in docs/benchmarks.md, with their command)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import read_trajectory
from references import dense_cmd_residual, dense_dmd_error

from pipeline.cli import main


def _dense_cmd_error(store: Path, name: str, coeff_dtype: type) -> float:
    """||W - model|| / ||W|| of a study: its stored float32 model, or the float64 fit
    (:func:`references.dense_cmd_residual`)."""
    res, energy = dense_cmd_residual(store, name, coeff_dtype)
    return float(np.sqrt(res / energy))


def assert_same_error(fit: float, dense: float) -> None:
    """The fit's relative error (from its per-row sums, ``|w_c|^2 (1 - corr^2)``) against the
    dense one: their squares, fractions of ||W||^2, agree to float64 rounding of the sums
    (a noise-free store's error is at float32 rounding, 1e-8 of ||W||, where the sums keep
    only a few digits of it)."""
    assert abs(fit**2 - dense**2) <= 1e-13, (fit, dense)


def _check_baselines(label: str, d: dict[str, Any], store: Path) -> None:
    """Every point of one trajectory's Pareto table against dense numpy on the same store."""
    w = read_trajectory(store).astype(np.float64)
    assert np.isfinite(w).all()
    n, t = w.shape
    assert (d["n"], d["epochs"]) == (n, t), label
    energy = (w**2).sum()
    s = np.linalg.svd(w, compute_uv=False)
    pts = d["points"]
    assert {p["method"] for p in pts} == {"CMD", "POD", "DMD"}, label
    for p in pts:
        err, where = p["relative_error"], (label, p["method"], p["rank"])
        if p["method"] == "CMD":
            m = p["n_modes"]
            # the error of what the 10 bytes hold: the stored float32 model
            name = f"pareto{p['rank']}"
            want32 = _dense_cmd_error(store, name, np.float32)
            assert err == pytest.approx(want32, rel=1e-7, abs=0), where
            want64 = _dense_cmd_error(store, name, np.float64)
            assert p["relative_error_float64"] == pytest.approx(want64, rel=1e-7, abs=0), where
            assert_same_error(p["relative_error_fit"], want64)
            assert p["stored_bytes"] == 10 * n + 4 * m * t, where
            assert m == p["rank"] or (m < p["rank"] and p["notes"]), where
        elif p["method"] == "POD":
            r = p["effective_rank"]
            tail = (s[r:] ** 2).sum()
            assert abs(p["residual"] - tail) <= 1e-8 * energy, where
            assert err == pytest.approx(np.sqrt(p["residual"] / energy), rel=1e-9, abs=0), where
            assert p["stored_bytes"] == 4 * r * (n + t), where
        else:
            r = p["effective_rank"]
            assert 1 <= r <= min(p["rank"], t - 1), where  # zero singular values dropped
            want = np.sqrt(dense_dmd_error(w, r) / energy)
            assert err == pytest.approx(want, rel=1e-6, abs=0), where
            assert p["stored_bytes"] == 4 * r * (n + 1), where
            # and POD is optimal at its rank
            assert err >= np.sqrt((s[r:] ** 2).sum() / energy) * (1 - 1e-9), where


@pytest.mark.slow
def test_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    work = tmp_path / "work"
    r = CliRunner().invoke(
        main,
        ["bench", "--out", str(out), "--quick", "--sizes", "20000,50000", "--epochs", "12",
         "--main-n", "60000", "--beyond-ram", "30000", "--workdir", str(work), "--keep",
         "--threads", "--no-progress"],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"limits", "throughput", "growth", "beyond_ram", "baselines", "numerics"}
    tp = res["throughput"]
    assert set(tp["ops"]) == {"ingest", "fit", "reconstruct"}
    for op in tp["ops"].values():
        assert op["seconds"] > 0 and op["of_memcpy"] > 0 and op["peak_rss"] > 0
        # the ratios are the measured bytes over the measured seconds and limits
        assert op["throughput"] == pytest.approx(op["bytes"] / op["seconds"], rel=1e-12)
        assert op["of_read"] == pytest.approx(op["throughput"] / op["limit_read"], rel=1e-12)
        memcpy = res["limits"]["memcpy"]
        assert op["of_memcpy"] == pytest.approx(op["throughput"] / memcpy, rel=1e-12)
    assert tp["ops"]["fit"]["bytes"] == 60000 * 12 * 4
    # the throughput store and its 10-mode study are kept: the reported error is theirs
    main_store = Path(tp["store"])
    assert main_store.parent == work
    assert_same_error(tp["fit_relative_error"], _dense_cmd_error(main_store, "m10", np.float64))
    g = res["growth"]
    assert [p["n"] for p in g["n"]] == [20000, 50000]
    for key, x in (("n", "n"), ("t", "epochs"), ("m", "modes")):
        pts = g[key]
        slope = np.polyfit(np.log([p[x] for p in pts]), np.log([p["seconds"] for p in pts]), 1)[0]
        assert g[f"exponent_{key}"] == pytest.approx(slope, rel=1e-9, abs=1e-12), key
    for label, store in (("synthetic", main_store), ("digits CNN", work / "digits.zarr")):
        _check_baselines(label, res["baselines"][label], store)
    assert res["baselines"]["in_memory"]["out_of_memory_n_extrapolated"] > 0
    # the pipeline's kernel against a dense float64 refit on a subsample: rounding only
    nm = res["numerics"]
    # (float32 a: its rounding, or one step from it, under 2^-22 relative; the model within
    # the anchored form's bound; corr is not stored by default)
    assert nm["checked"] > 1000 and nm["a_max_rel"] <= 2.0**-22
    assert nm["model_max_ulps"] <= 3 and nm["model_share_over_1_ulp"] < 1e-3
    assert nm["corr_max_abs"] is None
    md = (out / "results.md").read_text()
    for heading in ("Hardware limits", "Throughput", "Growth", "Beyond RAM", "Baselines", "Numerics"):
        assert heading in md
    for png in ("growth.png", "pareto.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    assert "results" in r.output or "Throughput" in r.output


def test_bench_removes_its_stores(tmp_path: Path) -> None:
    """Without --keep the working folder (stores, checkpoints) is removed."""
    out = tmp_path / "bench"
    r = CliRunner().invoke(
        main,
        ["bench", "--out", str(out), "--sections", "beyond-ram", "--beyond-ram", "20000",
         "--epochs", "6", "--sync", "--no-progress"],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["beyond_ram"]["n"] == 20000 and res["beyond_ram"]["fit"]["relative_error"] >= 0
    assert not (out / "work").exists()

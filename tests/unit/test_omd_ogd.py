"""Seed 003's check: OGD on the reparametrisation x = u^2 and OMD (exponentiated gradient) on x
are conjugate; projected OGD on x is not. Through the pipeline: recorded, ingested, compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import SYNC

import pipeline
from pipeline.ops.compare import compare
from workflows.omd_ogd import record_runs, trajectories


def test_the_runs_are_conjugate_in_x() -> None:
    tr = trajectories()
    assert np.abs(tr["omd_x"] - tr["ogd_u"] ** 2).max() < 1e-3  # x = u^2 along the whole run
    assert np.abs(tr["ogd_x"] - tr["ogd_u"] ** 2).max() > 0.1


def test_conjugate_pair_is_closest(tmp_path: Path) -> None:
    dirs = record_runs(tmp_path)
    stores = []
    for name in ("ogd_u", "omd_x", "ogd_x"):
        store = str(tmp_path / f"{name}.zarr")
        pipeline.ingest([str(dirs[name])], store, runtime=SYNC)
        pipeline.fit(store, "m", modes=4, samples=64, runtime=SYNC)
        stores.append((store, "m"))
    res = compare(stores, source="pcs", d=4, delays=2, shuffles=20, runtime=SYNC)
    d = np.asarray(res.distances)
    assert d[0, 1] < 0.35 * min(d[0, 2], d[1, 2]), d
    pair = next(p for p in res.pairs if (p["i"], p["j"]) == (0, 1))
    assert pair["normalised"] < 0.1 and pair["p_close"] == 0.0

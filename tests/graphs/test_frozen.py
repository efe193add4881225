"""Frozen tensors, known exactly from the digests ingest records per tensor and epoch: never
sampled, fitted without reading their other epochs, shown by info and the report."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import (
    SYNC,
    assert_matches_dense,
    dense_cmd,
    net_state_dicts,
    read_analysis,
    save_checkpoint,
    store_layers,
    window_of,
)

import pipeline
from pipeline.graph import fit as graph_fit
from pipeline.kernels.cmd import FLAG_CONSTANT
from pipeline.plan import plan_fit
from pipeline.store.trajectory import TrajectoryStore

FROZEN = ("conv.weight", "bn.weight")


def _run(tmp_path: Path, n: int = 8) -> list[Path]:
    """The test Net where conv.weight and bn.weight never change, and fc.bias stops changing
    after epoch 3."""
    sds = net_state_dicts(n)
    for e, sd in enumerate(sds):
        for name in FROZEN:
            sd[name] = sds[0][name].clone()
        if e > 3:
            sd["fc.bias"] = sds[3]["fc.bias"].clone()
    return [save_checkpoint(tmp_path / "run", e, sd, "pt") for e, sd in enumerate(sds)]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    s = tmp_path / "s.zarr"
    pipeline.ingest(_run(tmp_path), s, runtime=SYNC, chunk_rows=16)
    return s


def _frozen_names(store: Path, window: str | None) -> list[str]:
    meta = TrajectoryStore.open(store).require_meta()
    plan = plan_fit(
        meta, "x", chunk_rows=16, raw=True, modes=2, threshold=None, samples=10, seed=0, window=window
    )
    stored = meta.stored_tensors()
    return [stored[i].name for i in plan.frozen]


def test_digests_say_which_tensors_never_change(store: Path) -> None:
    assert _frozen_names(store, None) == list(FROZEN)
    assert _frozen_names(store, "4:") == [*FROZEN, "fc.bias"]  # frozen over a later window
    d = pipeline.info(store)["frozen"]
    assert d["names"] == list(FROZEN) and d["tensors"] == 2
    sizes = {name: hi - lo for name, lo, hi in store_layers(store)}
    assert d["rows"] == sizes["conv.weight"] + sizes["bn.weight"]


def test_digests_of_a_resumed_ingest_equal_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _run(tmp_path)
    clean, resumed = tmp_path / "clean.zarr", tmp_path / "resumed.zarr"
    pipeline.ingest(paths, clean, runtime=SYNC, chunk_rows=16)

    def crash(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(TrajectoryStore, "commit", crash)
        with pytest.raises(KeyboardInterrupt):
            pipeline.ingest(paths, resumed, runtime=SYNC, chunk_rows=16)
    # interrupted after every chunk was written: a Zarr client sees no epoch yet
    assert zarr.open_array(str(resumed), path="trajectory", mode="r").shape[1] == 0
    result = pipeline.ingest(paths, resumed, runtime=SYNC, chunk_rows=16)
    assert result.resumed and result.chunks_kept > 0 and result.chunks_written == 0
    a = TrajectoryStore.open(clean).require_meta()
    b = TrajectoryStore.open(resumed).require_meta()
    assert [e.digests for e in a.epochs] == [e.digests for e in b.epochs]
    assert all(len(e.digests) == len(a.stored_tensors()) for e in a.epochs)


def test_frozen_tensors_are_never_sampled_and_fitted_from_one_epoch(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = graph_fit._fit_frozen

    def counting(grid, plan, cols):  # type: ignore[no-untyped-def]
        calls.append(plan.index)
        return real(grid, plan, cols)

    monkeypatch.setattr(graph_fit, "_fit_frozen", counting)
    pipeline.fit(store, "s", modes=2, samples=40, runtime=SYNC, block_rows=16)
    got = read_analysis(store, "s")
    layers = {name: (lo, hi) for name, lo, hi in store_layers(store)}
    frozen_rows = np.zeros(len(got["mode"]), dtype=bool)
    for name in FROZEN:
        lo, hi = layers[name]
        frozen_rows[lo:hi] = True
    assert not frozen_rows[got["sample_index"]].any()
    # blocks wholly inside frozen tensors took the one-epoch path: rows 0-47 of conv.weight
    assert {0, 1, 2} <= set(calls)
    assert (got["flags"][frozen_rows] & FLAG_CONSTANT).all()
    # and everything equals the dense float64 reference on the same samples
    w = window_of(store, "s")
    assert_matches_dense(got, dense_cmd(w, got["sample_index"], modes=2), w)
    assert got["attrs"]["frozen"]["tensors"] == list(FROZEN)
    assert got["attrs"]["frozen"]["known"] is True


def test_without_digests_the_same_rows_come_out_constant(store: Path, tmp_path: Path) -> None:
    """A store whose digests are unknown (as after an upgrade from schema 1) fits every row
    with the kernel; the frozen rows' results are the same, bit for bit."""
    plain = tmp_path / "plain.zarr"
    shutil.copytree(store, plain)
    zarr.open_array(str(plain), path="meta/digest", mode="r+")[:] = ""
    assert pipeline.info(plain)["frozen"] is None
    for s in (store, plain):
        pipeline.fit(s, "s", modes=2, samples=40, runtime=SYNC, block_rows=16, diagnostics=True)
    a, b = read_analysis(store, "s"), read_analysis(plain, "s")
    assert b["attrs"]["frozen"]["known"] is False
    lo, hi = 0, sum(hi - lo for name, lo, hi in store_layers(store) if name == "conv.weight")
    for key in ("mode", "a", "level", "anchor", "corr", "residual", "flags"):
        np.testing.assert_array_equal(a[key][lo:hi], b[key][lo:hi], err_msg=key)


def test_report_shows_the_frozen_share(store: Path, tmp_path: Path) -> None:
    pipeline.fit(store, "s", modes=2, samples=40, runtime=SYNC)
    pipeline.report(store, "s", out=tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "frozen tensors" in page and "fitted without reading their other epochs" in page

"""``reconstruct`` and ``export --analysis``: the CMD weights a * r + b (computed in float64,
stored as float32), references and constant rows exact, idempotent and resumable; exported
state_dicts load into the real module with strict=True, tensors left out at ingest keep their
recorded values; and the errors of both commands."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import (
    NET_KEYS,
    SYNC,
    THREADS,
    Net,
    Run,
    dense_cmd,
    load_export,
    modal_state_dicts,
    read_analysis,
    read_trajectory,
    snapshot_mtimes,
    store_layers,
    stored_model,
    ulp_distance,
    window_of,
    write_safetensors_run,
)

import pipeline
from pipeline.cli import main
from pipeline.graph.reconstruct import RECONSTRUCTED, build_reconstruct_tasks
from pipeline.kernels.reconstruct import reconstruct_block
from pipeline.ops.export import from_float32
from pipeline.store.analysis import AnalysisGroup

T = 12


@pytest.fixture(scope="module")
def modal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    """The 4-mode model (several dtypes, a frozen tensor, an int64 buffer), fitted as ``m``."""
    tmp = tmp_path_factory.mktemp("modal")
    sds = modal_state_dicts(T, seed=1)
    ck = write_safetensors_run(tmp / "ck", sds)[0].parent
    store = tmp / "s.zarr"
    pipeline.ingest([str(ck)], str(store), runtime=SYNC, chunk_rows=500)
    pipeline.fit(str(store), "m", modes=4, samples=150, block_rows=250, runtime=SYNC)
    return store, sds


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """Net checkpoints (.pt, 10 epochs) ingested without ``fc.bias`` (exclude pattern);
    ``bn.num_batches_tracked`` (int64) is not in the trajectory either. Fitted as ``all`` and,
    on epochs 3..8, as ``win``."""
    from helpers import net_state_dicts, write_run

    tmp = tmp_path_factory.mktemp("net")
    sds = net_state_dicts(10)
    run = Run(tmp / "ck", sds, write_run(tmp / "ck", sds, "pt"))
    store = tmp / "s.zarr"
    pipeline.ingest([str(run.root)], str(store), exclude=["fc.bias"], runtime=SYNC)
    pipeline.fit(str(store), "all", modes=3, samples=60, runtime=SYNC)
    pipeline.fit(str(store), "win", modes=3, samples=60, epochs="3:9", runtime=SYNC)
    return store, run


def _copy(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy.zarr"
    shutil.copytree(store, out)
    return out


# --------------------------------------------------------------------------- reconstruct
def test_reconstruct_equals_dense(modal: tuple[Path, list[Any]], tmp_path: Path) -> None:
    store = _copy(modal[0], tmp_path)
    res = pipeline.reconstruct(str(store), "m", runtime=THREADS)
    n = pipeline.info(str(store))["n_rows"]
    assert res.shape == (n, T) and res.blocks_written == -(-n // 250) and res.blocks_kept == 0
    got = read_analysis(store, "m")
    rec = got["reconstructed"]
    assert rec.dtype == np.float32 and rec.shape == (n, T)
    # level + a (r - r(anchor)) in float64 from the stored results, rounded once to float32
    mode = got["mode"].astype(np.int64)
    want = stored_model(got).astype(np.float32)
    assert np.array_equal(rec.view(np.uint32), want.view(np.uint32))
    # and the dense reference's a * r + b, to float32 rounding: same references, and per row
    # the same mode, unless the row's |corr| ties to rounding (relative 1e-12) between two
    # modes, where either may be picked (other BLAS kernels round otherwise)
    w = window_of(store, "m")
    dense = dense_cmd(w, got["sample_index"], modes=4)
    assert np.array_equal(got["ref_index"], dense.ref_index)
    abs_corr = np.abs(dense.corr_all)
    best = abs_corr.max(axis=1)
    same = mode == dense.mode
    rows = np.flatnonzero(~same)
    assert np.all(abs_corr[rows, mode[rows]] >= best[rows] * (1 - 1e-12)), rows
    scale = np.abs(dense.recon).max(axis=1, keepdims=True)
    assert np.all((np.abs(rec - dense.recon) <= 2.0**-22 * scale)[same])
    # ... and within 1 float32 ulp of it where the fitted values keep their sign, 3 where
    # they cross zero (the anchored float32 form's bound)
    finite = np.isfinite(dense.recon).all(axis=1) & same
    crossing = (dense.recon.min(axis=1) < 0) & (dense.recon.max(axis=1) > 0)
    far = ulp_distance(rec, dense.recon.astype(np.float32)).max(axis=1)
    assert far[finite & ~crossing].max() <= 1 and far[finite & crossing].max(initial=0) <= 3
    # references and constant rows come back bit for bit
    for r in got["ref_index"]:
        assert np.array_equal(rec[r].view(np.uint32), w[r].view(np.uint32))
    const = np.flatnonzero(got["flags"] & 1)
    assert const.size >= 16
    assert np.array_equal(rec[const].view(np.uint32), w[const].view(np.uint32))
    assert pipeline.info(str(store))["analyses"] == ["m"]


def test_reconstruct_is_idempotent_and_resumable(
    modal: tuple[Path, list[Any]], tmp_path: Path
) -> None:
    store = _copy(modal[0], tmp_path)
    pipeline.reconstruct(str(store), "m", runtime=SYNC)
    state = snapshot_mtimes(store)
    again = pipeline.reconstruct(str(store), "m", runtime=SYNC)
    assert again.blocks_written == 0 and again.blocks_kept == -(-again.shape[0] // 250)
    assert snapshot_mtimes(store) == state
    # a lost chunk (an interrupted run) is the only one written again
    lost = store / "analyses" / "m" / "reconstructed" / "c" / "3" / "0"
    before = lost.read_bytes()
    lost.unlink()
    stray = lost.parent / "0.0123456789abcdef.partial"  # the temporary file of the cut write
    stray.write_bytes(b"\0" * 64)
    third = pipeline.reconstruct(str(store), "m", runtime=SYNC)
    assert third.blocks_written == 1
    assert lost.read_bytes() == before
    assert not stray.exists()
    after = snapshot_mtimes(store)
    changed = {k for k in after if after[k] != state.get(k)}
    assert changed == {"analyses/m/reconstructed/c/3/0"}
    # re-fitting the same study changes nothing, the reconstruction included
    res = pipeline.fit(str(store), "m", modes=4, samples=150, block_rows=250, runtime=SYNC)
    assert res.status == "unchanged"
    assert snapshot_mtimes(store) == after


def test_nonfinite_rows_reconstruct_as_nan(tmp_path: Path) -> None:
    sds = modal_state_dicts(8, seed=2)
    sds[3]["enc.weight"][0, :3] = float("nan")
    ck = write_safetensors_run(tmp_path / "ck", sds)[0].parent
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(ck)], str(store), runtime=SYNC)
    pipeline.fit(str(store), "m", modes=4, samples=100, runtime=SYNC)
    pipeline.reconstruct(str(store), "m", runtime=SYNC)
    got = read_analysis(store, "m")
    lo = {n: lo for n, lo, _hi in store_layers(store)}["enc.weight"]
    bad = np.flatnonzero(got["flags"] & 2)
    assert bad.tolist() == [lo, lo + 1, lo + 2]
    assert np.isnan(got["reconstructed"][bad]).all()
    good = np.ones(len(got["flags"]), dtype=bool)
    good[bad] = False
    assert np.isfinite(got["reconstructed"][good]).all()


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_analysis_loads_into_the_module(
    net: tuple[Path, Run], tmp_path: Path, suffix: str
) -> None:
    store, run = net
    store = _copy(store, tmp_path)
    pipeline.reconstruct(str(store), "all", runtime=SYNC)
    rec = read_analysis(store, "all")["reconstructed"]
    layers = {n: (lo, hi) for n, lo, hi in store_layers(store)}
    assert "fc.bias" not in layers and "bn.num_batches_tracked" not in layers
    for epoch in (0, 7):
        out = pipeline.export(str(store), epoch, tmp_path / f"cmd_{epoch}{suffix}", analysis="all")
        sd = load_export(out)
        model = Net()
        model.load_state_dict(sd, strict=True)
        assert sorted(sd) == sorted(NET_KEYS)
        original = run.sds[epoch]
        for name, (lo, hi) in layers.items():
            t = sd[name]
            assert t.dtype == original[name].dtype and t.shape == original[name].shape
            assert np.array_equal(t.reshape(-1).numpy(), rec[lo:hi, epoch]), name
        # left out of the trajectory: the recorded values of that epoch
        assert torch.equal(sd["fc.bias"], original["fc.bias"])
        assert torch.equal(sd["bn.num_batches_tracked"], original["bn.num_batches_tracked"])
        model.eval()
        assert torch.isfinite(model(torch.randn(4, 2, 4, 4))).all()
        # the CMD weights are an approximation: not the recorded ones
        assert not torch.equal(sd["fc.weight"], original["fc.weight"])


def test_export_keeps_dtypes(modal: tuple[Path, list[Any]], tmp_path: Path) -> None:
    """bf16/fp16/float64 tensors are exported in their dtype, rounded from the float32 CMD
    value; the frozen tensor and the int64 buffer are exactly the recorded ones."""
    store, sds = modal
    epoch = 5
    out = pipeline.export(str(store), epoch, tmp_path / "e.safetensors", analysis="m")
    sd = load_export(out)
    assert sorted(sd) == sorted(sds[epoch])
    got = read_analysis(store, "m")
    col = stored_model(got)[:, epoch].astype(np.float32)
    for name, lo, hi in store_layers(store):
        t, orig = sd[name], sds[epoch][name]
        assert t.dtype == orig.dtype and t.shape == orig.shape, name
        dtype = str(orig.dtype).removeprefix("torch.")
        want = from_float32(col[lo:hi], dtype)
        raw = (
            t.reshape(-1).view(torch.int16).numpy().view(np.uint16)
            if dtype == "bfloat16"
            else t.reshape(-1).numpy()
        )
        assert np.array_equal(raw, want), name
        if dtype in ("float16", "bfloat16"):  # torch rounds float32 the same way
            assert torch.equal(t.reshape(-1), torch.from_numpy(col[lo:hi]).to(orig.dtype))
    assert torch.equal(sd["frozen.weight"], sds[epoch]["frozen.weight"])
    assert torch.equal(sd["steps.num_batches_tracked"], sds[epoch]["steps.num_batches_tracked"])


def test_export_epoch_outside_the_window(net: tuple[Path, Run], tmp_path: Path) -> None:
    store, _run = net
    assert read_analysis(store, "win")["epochs"].tolist() == [3, 4, 5, 6, 7, 8]
    with pytest.raises(
        pipeline.PipelineError, match=r"epoch 0 is not in analysis 'win'.s window \(3\.\.8\)"
    ):
        pipeline.export(str(store), 0, tmp_path / "x.pt", analysis="win")
    assert not (tmp_path / "x.pt").exists()
    # inside the window it works, and equals the full-window study's weights only approximately
    out = pipeline.export(str(store), 4, tmp_path / "y.pt", analysis="win")
    Net().load_state_dict(load_export(out), strict=True)
    with pytest.raises(pipeline.StoreError, match="epoch 99 is not in the store"):
        pipeline.export(str(store), 99, tmp_path / "x.pt", analysis="win")
    with pytest.raises(pipeline.StoreError, match=r"no analysis 'nope'.*all, win"):
        pipeline.export(str(store), 4, tmp_path / "x.pt", analysis="nope")
    r = CliRunner().invoke(
        main,
        [
            "export",
            "--store",
            str(store),
            "--epoch",
            "9",
            "--out",
            str(tmp_path / "z.pt"),
            "--analysis",
            "win",
        ],
    )
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [
        "error: epoch 9 is not in analysis 'win''s window (3..8)"
    ]
    assert list(tmp_path.glob("z.pt*")) == []


# --------------------------------------------------------------------------- errors
def test_reconstruct_missing_or_incomplete_analysis(net: tuple[Path, Run], tmp_path: Path) -> None:
    store = _copy(net[0], tmp_path)
    with pytest.raises(pipeline.StoreError, match="no analysis 'nope'"):
        pipeline.reconstruct(str(store), "nope", runtime=SYNC)
    r = CliRunner().invoke(
        main, ["reconstruct", "--store", str(store), "--name", "nope", "--sync", "--no-progress"]
    )
    assert r.exit_code == 3
    assert r.stderr.strip().startswith("error: no analysis 'nope'")
    r = CliRunner().invoke(
        main, ["reconstruct", "--store", str(tmp_path / "none.zarr"), "--name", "all", "--sync"]
    )
    assert r.exit_code != 0 and "error:" in r.stderr
    # an analysis whose fit did not finish cannot be reconstructed or exported
    AnalysisGroup(str(store), "all").set_attrs(status="running")
    with pytest.raises(pipeline.StoreError, match="not complete"):
        pipeline.reconstruct(str(store), "all", runtime=SYNC)
    with pytest.raises(pipeline.StoreError, match="not complete"):
        pipeline.export(str(store), 3, tmp_path / "x.pt", analysis="all")
    assert "reconstructed" not in read_analysis(store, "all")


def test_cli_reconstruct(net: tuple[Path, Run], tmp_path: Path) -> None:
    store = _copy(net[0], tmp_path)
    args = ["reconstruct", "--store", str(store), "--name", "win", "--sync", "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    n = pipeline.info(str(store))["n_rows"]
    assert (
        f"analysis 'win': reconstructed ({n:,} x 6) float32; 1 block(s) written, 0 kept" in r.output
    )
    rec = read_analysis(store, "win")["reconstructed"]
    w = read_trajectory(store)[:, 3:9]
    assert rec.shape == w.shape
    assert np.linalg.norm(rec - w) / np.linalg.norm(w) < 0.5
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "0 block(s) written, 1 kept" in r.output


# --------------------------------------------------------------------------- layers
def test_reconstruct_block_kernel_matches_the_direct_formula() -> None:
    rng = np.random.default_rng(3)
    refs = rng.standard_normal((4, 9))
    mode = rng.integers(4, size=30).astype(np.uint8)
    a, b = rng.standard_normal(30), rng.standard_normal(30)
    want = np.array([[a[i] * refs[mode[i], t] + b[i] for t in range(9)] for i in range(30)])
    got = reconstruct_block(mode, a, b, refs, slice(None))
    assert got.dtype == np.float64 and np.array_equal(got, want)
    cols = np.array([7, 2])
    assert np.array_equal(reconstruct_block(mode, a, b, refs, cols), want[:, cols])
    # a reference row (a = 1, b = 0) gives back its profile exactly
    one = reconstruct_block(np.array([2]), np.array([1.0]), np.array([0.0]), refs, slice(None))
    assert np.array_equal(one[0], refs[2])


def test_reconstruct_graph_computes_nothing_and_matches_the_op(
    modal: tuple[Path, list[Any]], tmp_path: Path
) -> None:
    """Building the tasks writes nothing; computing them writes what ``reconstruct`` writes,
    into an array made by the store's one result-array helper (uncompressed, like ``mode``)."""
    import dask
    import zarr

    store = _copy(modal[0], tmp_path)
    ag = AnalysisGroup(pipeline.open_store(str(store)).url, "m")
    refs = np.asarray(ag.array("refs")[...])
    n = pipeline.info(str(store))["n_rows"]
    arr = ag.require_array(
        RECONSTRUCTED, shape=(n, T), chunks=(250, T), dtype="float32", fill_value=np.float32("nan")
    )
    again = ag.require_array(  # already there: opened, not re-created
        RECONSTRUCTED, shape=(1, 1), chunks=(1, 1), dtype="float64", fill_value=0.0
    )
    assert again.shape == (n, T) and again.chunks == (250, T) and again.dtype == np.float32
    codecs = [c.to_dict()["name"] for c in arr.metadata.codecs]
    assert codecs == [c.to_dict()["name"] for c in ag.array("mode").metadata.codecs] == ["bytes"]
    todo = [(0, 250), (500, 750)]
    tasks, labels = build_reconstruct_tasks(ag.url, "m", todo, refs, ag.layout())
    assert labels == ["reconstructed rows 0-250", "reconstructed rows 500-750"]
    assert ag.written_chunks(RECONSTRUCTED) == set()
    dask.compute(*tasks, scheduler="sync")
    assert ag.written_chunks(RECONSTRUCTED) == {"0/0", "2/0"}
    res = pipeline.reconstruct(str(store), "m", runtime=SYNC)
    assert res.blocks_written == -(-n // 250) - 2 and res.blocks_kept == 2
    full = np.asarray(zarr.open_array(str(store), path="analyses/m/reconstructed", mode="r")[...])
    other = _copy(modal[0], tmp_path / "other")
    pipeline.reconstruct(str(other), "m", runtime=SYNC)
    want = np.asarray(zarr.open_array(str(other), path="analyses/m/reconstructed", mode="r")[...])
    assert np.array_equal(full.view(np.uint32), want.view(np.uint32))

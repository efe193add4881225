"""Stores named by fsspec URLs: ``file://`` (what workers on other machines use with a shared
filesystem) on a LocalCluster, and ``memory://`` (a non-local filesystem: every read and write
goes through fsspec, as with an object store) in-process. Same bytes as a plain path."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
from distributed import Client, LocalCluster
from helpers import SYNC, read_analysis, read_trajectory

import pipeline


@pytest.mark.slow
def test_file_url_store_on_a_local_cluster(tmp_path: Path, run5) -> None:
    plain = tmp_path / "plain.zarr"
    pipeline.ingest([str(run5.root)], str(plain), runtime=SYNC)
    pipeline.fit(str(plain), "m", modes=3, samples=50, runtime=SYNC)
    url = (tmp_path / "url.zarr").as_uri()
    assert url.startswith("file:///")
    # one cluster of worker processes (the user's client) for both: each process opens the URL
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster),
    ):
        res = pipeline.ingest([str(run5.root)], url, runtime=pipeline.RuntimeOptions(progress=False))
        assert res.chunks_written > 0
        pipeline.fit(url, "m", modes=3, samples=50, runtime=pipeline.RuntimeOptions(progress=False))
    assert np.array_equal(read_trajectory(plain), read_trajectory(tmp_path / "url.zarr"))
    a, b = read_analysis(plain, "m"), read_analysis(tmp_path / "url.zarr", "m")
    for k in ("mode", "a", "level", "anchor", "flags", "block_stats"):
        assert np.array_equal(a[k], b[k], equal_nan=True), k
    sd = pipeline.state_dict(url, 4, analysis="m")
    assert set(sd) == set(run5.sds[0])


def test_memory_url_store(tmp_path: Path, run5) -> None:
    """An in-memory fsspec filesystem stands in for an object store (no local paths at all)."""
    plain = tmp_path / "plain.zarr"
    pipeline.ingest([str(run5.root)], str(plain), runtime=SYNC)
    pipeline.fit(str(plain), "m", modes=3, samples=50, runtime=SYNC)
    url = "memory://cmd-pipeline-test/store.zarr"
    try:
        pipeline.ingest([str(run5.root)], url, runtime=SYNC)
        pipeline.fit(url, "m", modes=3, samples=50, runtime=SYNC)
        st = pipeline.open_store(url)
        got = np.asarray(pipeline.trajectory_dask(st).compute(scheduler="sync"))
        assert np.array_equal(got, read_trajectory(plain))
        info = pipeline.info(url)
        assert info["analyses"] == ["m"]
        ev_plain = pipeline.state_dict(str(plain), 3, analysis="m")
        ev_url = pipeline.state_dict(url, 3, analysis="m")
        for k, v in ev_plain.items():
            assert (v == ev_url[k]).all(), k
        rep = pipeline.report(url, "m")
        assert rep.html.startswith("memory://") and fsspec.filesystem("memory").exists(rep.html)
    finally:
        fsspec.filesystem("memory").rm("/cmd-pipeline-test", recursive=True)


def test_checkpoints_on_a_non_local_filesystem(tmp_path: Path) -> None:
    """Checkpoints read through fsspec (``memory://``: listings, ``info`` and ranged reads,
    never a local path) give the same trajectory and the same file digests as from disk, in
    every layout: Hugging Face shards, a .pt nested under "model" with bf16 and transposed
    strides (read without torch), a Lightning-style .ckpt, a Distributed Checkpoint."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from helpers import net_state_dicts, write_run

    sds = net_state_dicts(3, "float32", 1)
    odd = [
        {**sd, "fc.weight": sd["fc.weight"].t().contiguous().t(), "conv.weight": sd["conv.weight"].bfloat16()}
        for sd in sds
    ]
    write_run(tmp_path / "sharded", sds, "sharded")
    write_run(tmp_path / "pt", odd, "pt", wrapper="model")
    (tmp_path / "ckpt").mkdir()
    for e, sd in enumerate(sds):
        extras = {"epoch": e, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}]}
        state = {**extras, "state_dict": {f"model.{k}": v for k, v in sd.items()}}
        torch.save(state, tmp_path / "ckpt" / f"epoch={e}-step={2 * e}.ckpt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save({"model": sd, "step": e}, checkpoint_id=tmp_path / "dcp" / f"step-{e}")
    mem = fsspec.filesystem("memory")
    try:
        for name, kw in (
            ("sharded", {}),
            ("pt", {}),
            ("ckpt", {"strip_prefix": "model."}),
            ("dcp", {}),
        ):
            mem.put(f"{tmp_path / name}/", f"/ckpts-test/{name}/", recursive=True)
            local, far = tmp_path / f"{name}-local.zarr", tmp_path / f"{name}-far.zarr"
            pipeline.ingest([str(tmp_path / name)], str(local), runtime=SYNC, **kw)
            pipeline.ingest([f"memory://ckpts-test/{name}"], str(far), runtime=SYNC, **kw)
            assert np.array_equal(read_trajectory(local), read_trajectory(far), equal_nan=True)
            a = pipeline.open_store(str(local)).require_meta().epochs
            b = pipeline.open_store(str(far)).require_meta().epochs
            assert [[f.sha256 for f in e.files] for e in a] == [[f.sha256 for f in e.files] for e in b]
            assert b[0].files[0].path.startswith(f"memory:///ckpts-test/{name}/"), name
    finally:
        mem.rm("/ckpts-test", recursive=True)

"""Schema 2 as any Zarr or xarray client sees it: small root metadata at thousands of epochs
and tensors, labelled dimensions everywhere, studies and Online CMD groups in a datatree."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import zarr
from helpers import SYNC, net_state_dicts, save_checkpoint

import pipeline
from pipeline.store.schema import EpochEntry, IngestSettings, SourceFile, StoreMeta, TensorEntry
from pipeline.store.trajectory import TrajectoryStore


def _meta(n_tensors: int, n_epochs: int) -> StoreMeta:
    tensors = tuple(
        TensorEntry(f"blocks.{k}.weight", (4,), "float32", "parameter", 4 * k)
        for k in range(n_tensors)
    )
    epochs = tuple(
        EpochEntry(
            e,
            (SourceFile(f"/runs/x/epoch_{e}.pt", 1000, hashlib.sha256(str(e).encode()).hexdigest()),),
            nonfinite=1,
            nonfinite_by_tensor=((f"blocks.{e % n_tensors}.weight", 1),),
            digests=tuple(f"xxh3-128:{e:032x}" for _ in range(n_tensors)),
        )
        for e in range(n_epochs)
    )
    return StoreMeta(IngestSettings(chunk_rows=64), tensors, 4 * n_tensors, epochs)


def test_root_metadata_stays_small_at_thousands_of_epochs_and_tensors(tmp_path: Path) -> None:
    sizes = {}
    for t in (10, 2000):
        url = str(tmp_path / f"s{t}.zarr")
        st = TrajectoryStore.open_or_create(url)
        st.write_meta(_meta(1000, t))
        back = TrajectoryStore.open(url).require_meta()
        assert back == _meta(1000, t)  # every epoch and tensor round-trips through the arrays
        raw = (tmp_path / f"s{t}.zarr" / "zarr.json").read_text()
        sizes[t] = (len(json.dumps(json.loads(raw)["attributes"])), len(raw))
    # the root attributes do not grow with the epochs (nor hold the 1000-tensor table); the
    # whole document (with the consolidated metadata) grows by the digits of the shapes only
    assert sizes[10][0] < 1000 and abs(sizes[2000][0] - sizes[10][0]) < 10, sizes
    assert abs(sizes[2000][1] - sizes[10][1]) < 100, sizes


def test_every_array_has_dimension_names_and_xarray_reads_all_groups(tmp_path: Path) -> None:
    import xarray as xr

    paths = [save_checkpoint(tmp_path / "run", e, sd, "pt") for e, sd in enumerate(net_state_dicts(6))]
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths, store, runtime=SYNC, chunk_rows=32)
    pipeline.fit(store, "s", modes=2, samples=40, runtime=SYNC)
    # the fit consolidates once, at its end: the study is there, complete, every array of it
    import json

    cons = json.loads((store / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    assert cons["analyses/s"]["attributes"]["cmd_pipeline_analysis"]["status"] == "complete"
    on_disk = {str(p.parent.relative_to(store)) for p in (store / "analyses" / "s").rglob("zarr.json")}
    assert on_disk - {"analyses/s"} and on_disk <= set(cons)
    pipeline.reconstruct(store, "s", runtime=SYNC)
    missing = []

    def walk(g: zarr.Group, prefix: str) -> None:
        for name, arr in g.arrays():
            if not arr.metadata.dimension_names or None in arr.metadata.dimension_names:
                missing.append(prefix + name)
        for name, sub in g.groups():
            walk(sub, f"{prefix}{name}/")

    walk(zarr.open_group(str(store), mode="r", use_consolidated=False), "")
    assert missing == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. xarray's "failed to open consolidated metadata"
        ds = xr.open_zarr(store)
        tree = xr.open_datatree(store, engine="zarr")
    assert set(ds["trajectory"].dims) == {"param", "epoch"}
    assert ds["epoch"].values.tolist() == list(range(6))
    assert "tensor_id" in ds.coords and "tensor" in ds.coords
    study = tree["analyses/s"]
    assert study["reconstructed"].dims == ("param", "window")
    assert study["refs"].dims == ("mode_id", "window")
    labelled = pipeline.open_dataset(store, analysis="s")
    assert labelled["trajectory"].chunks is not None  # lazy
    labelled = labelled.load()
    fc = labelled["a"].where(labelled["tensor_name"] == "fc.weight", drop=True)
    assert fc.sizes["param"] == 60
    np.testing.assert_array_equal(
        labelled["reconstructed"].sel(window=5).values,
        (labelled["level"] + labelled["a"].astype(np.float64)
         * (labelled["refs"].isel(mode_id=labelled["mode"]).sel(window=5)
            - labelled["refs"].isel(mode_id=labelled["mode"], window=labelled["anchor"])))
        .astype(np.float32).values,
    )

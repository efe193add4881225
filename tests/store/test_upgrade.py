"""Stores of schema 1, made by the previous release (``tests/fixtures/store_v1.zarr``, written
by ``tests/fixtures/make_store_v1.py`` at commit b8c7b9d): read in place, refused for writes,
migrated by ``upgrade`` without touching a chunk, then appended to and read by xarray."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.make_store_v1 import checkpoint
from helpers import SYNC

import pipeline
from pipeline.errors import StoreError

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "store_v1.zarr"


def _copy(tmp_path: Path) -> Path:
    dest = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE, dest)
    return dest


def _files(store: Path, below: str) -> dict[str, str]:
    """sha256 of every file under ``store/below`` except the arrays' metadata documents."""
    out = {}
    for p in sorted((store / below).rglob("*")):
        if p.is_file() and p.name != "zarr.json":
            out[str(p.relative_to(store))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _exported(store: Path, epoch: int, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"e{epoch}.pt"
    pipeline.export(store, epoch, out, progress=False)
    return torch.load(out)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].nan_to_num(7.0), b[k].nan_to_num(7.0))
        for k in a
    )


def test_the_fixture_is_schema_1() -> None:
    attrs = json.loads((FIXTURE / "zarr.json").read_text())["attributes"]["cmd_pipeline"]
    assert attrs["version"] == 1 and len(attrs["epochs"]) == 4


def test_schema_1_reads_in_place(tmp_path: Path) -> None:
    store = _copy(tmp_path)
    before = _files(store, ".")
    st = pipeline.open_store(str(store))
    assert st.meta is not None and st.meta.version == 1 and st.meta.epoch_numbers == [0, 1, 2, 3]
    for e in range(4):  # bit-exact, NaN included, integer buffers from the attributes
        assert _same(_exported(store, e, tmp_path), checkpoint(e))
    assert pipeline.info(store)["n_epochs"] == 4
    data = pipeline.load_study_data(store, "s1")
    assert data is not None
    assert _files(store, ".") == before  # reading wrote nothing


def test_writing_to_schema_1_is_refused_until_upgraded(tmp_path: Path) -> None:
    store = _copy(tmp_path)
    before = _files(store, ".")
    meta_before = (store / "zarr.json").read_text()
    path = tmp_path / "epoch_4.pt"
    torch.save(checkpoint(4), path)
    with pytest.raises(StoreError, match=r"schema version 1; upgrade it.*cmd-pipeline upgrade"):
        pipeline.ingest([path], store, epochs=[4], runtime=SYNC)
    assert _files(store, ".") == before and (store / "zarr.json").read_text() == meta_before
    with pytest.raises(pipeline.StoreError, match="upgrade"):
        pipeline.open_dataset(store)


def test_upgrade_keeps_every_chunk_and_the_metadata(tmp_path: Path) -> None:
    store = _copy(tmp_path)
    old_meta = pipeline.open_store(str(store)).meta
    chunks = _files(store, "trajectory")
    studies = _files(store, "analyses")
    assert pipeline.upgrade(store) == (1, 2)
    assert pipeline.upgrade(store) == (2, 2)  # idempotent
    new_meta = pipeline.open_store(str(store)).meta
    assert new_meta is not None and old_meta is not None
    assert new_meta.version == 2 and new_meta == old_meta.with_(version=2)
    assert _files(store, "trajectory") == chunks and _files(store, "analyses") == studies
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["cmd_pipeline"]
    assert "epochs" not in attrs and attrs["n_epochs"] == 4
    for e in range(4):
        assert _same(_exported(store, e, tmp_path), checkpoint(e))


def test_an_upgraded_store_takes_new_epochs_and_opens_in_xarray(tmp_path: Path) -> None:
    import xarray as xr

    store = _copy(tmp_path)
    pipeline.upgrade(store)
    paths = []
    for e in (4, 5):
        paths.append(tmp_path / f"epoch_{e}.pt")
        torch.save(checkpoint(e), paths[-1])
    result = pipeline.ingest(paths, store, runtime=SYNC)
    assert result.added == [4, 5] and result.n_epochs == 6
    for e in (2, 5):
        assert _same(_exported(store, e, tmp_path), checkpoint(e))
    ds = xr.open_zarr(store)  # consolidated metadata, no warning
    assert ds["trajectory"].dims == ("param", "epoch") and ds["epoch"].values.tolist() == list(
        range(6)
    )
    want = np.concatenate(
        [checkpoint(5)[t.name].numpy().ravel() for t in new_tensors(store)]
    )
    np.testing.assert_array_equal(ds["trajectory"].sel(epoch=5).values, want)
    lab = pipeline.open_dataset(store, analysis="s1")
    assert lab["window"].values.tolist() == [0, 1, 2, 3]
    assert set(lab["tensor_name"].values.tolist()) == {t.name for t in new_tensors(store)}
    dt = xr.open_datatree(store, engine="zarr")
    assert dt["analyses/s1"]["a"].dims == ("param",)


def new_tensors(store: Path) -> list[pipeline.store.TensorEntry]:
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    return meta.stored_tensors()

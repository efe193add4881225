"""The store's schema (values, validation, versioning) and its on-disk Zarr layout."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import NET_ROWS, SYNC, Run, add_study

import pipeline
from pipeline.errors import InputError, SchemaVersionError, StoreError
from pipeline.store.schema import (
    ATTR_KEY,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    EpochEntry,
    IngestSettings,
    InlineTensor,
    SourceFile,
    StoreMeta,
    TensorEntry,
    _ranges,
)


def _meta(**changes: object) -> StoreMeta:
    tensors = (
        TensorEntry("a.weight", (2, 3), "float32", "parameter", 0),
        TensorEntry("a.steps", (), "int64", "buffer", -1),
        TensorEntry("a.bias", (3,), "bfloat16", "parameter", 6),
        TensorEntry("a.empty", (0, 4), "float16", "parameter", 9),
    )
    inline = InlineTensor.from_array("a.steps", "int64", np.array(41, dtype=np.int64))
    epochs = (
        EpochEntry(0, (SourceFile("/ck/e0.pt", 123, "ab" * 32),), 0, (), (inline,)),
        EpochEntry(3, (SourceFile("/ck/e3.pt", 123, "cd" * 32),), 2, (("a.weight", 2),), (inline,)),
    )
    pending = (EpochEntry(5, (SourceFile("/ck/e5.pt", 9, "ef" * 32),)),)
    meta = StoreMeta(
        IngestSettings(exclude=("x.*",), chunk_rows=4), tensors, 9, epochs, pending, "0.1.0"
    )
    return meta.with_(**changes)


def test_meta_round_trips_through_json() -> None:
    meta = _meta()
    d = json.loads(json.dumps(meta.to_dict()))
    assert d["schema"] == SCHEMA_NAME and d["version"] == SCHEMA_VERSION == 2
    back = StoreMeta.from_dict(d)
    assert back == meta
    assert back.to_dict() == meta.to_dict()
    assert back.n_epochs == 2 and back.epoch_numbers == [0, 3]
    assert back.column_of(3) == 1
    assert [t.name for t in back.stored_tensors()] == ["a.weight", "a.bias", "a.empty"]
    assert back.epochs[0].inline[0].to_bytes() == np.int64(41).tobytes()
    assert dict(back.epochs[1].nonfinite_by_tensor) == {"a.weight": 2}


def test_tensor_entry_sizes() -> None:
    assert TensorEntry("s", (), "float32", "parameter", 0).size == 1
    assert TensorEntry("e", (3, 0), "float32", "parameter", 0).size == 0
    assert TensorEntry("m", (2, 3, 4), "float32", "parameter", -1).stored is False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["tensors"][2].update(offset=7), "offset 7 != 6"),
        (lambda d: d.update(n_rows=10), "add up to 9, not n_rows=10"),
        (lambda d: d["tensors"][1].update(name="a.weight"), "duplicate tensor"),
        (lambda d: d["tensors"][0].update(kind="weight"), "tensor kind"),
        (lambda d: d["epochs"][1].update(epoch=0), "not strictly increasing"),
        (lambda d: d["pending"][0].update(epoch=3), "not strictly increasing"),
        (lambda d: d["settings"].update(codec="zstd"), "codec must be one of"),
        (lambda d: d["settings"].update(chunk_rows=0), "must be positive"),
        (lambda d: d.pop("tensors"), "lacks 'tensors'"),
        (lambda d: d.update(epochs={}), "epochs has type dict"),
        (lambda d: d.update(pending=3), "pending is neither null nor a list"),
    ],
)
def test_invalid_metadata_is_a_store_error(change, message: str) -> None:  # type: ignore[no-untyped-def]
    d = json.loads(json.dumps(_meta().to_dict()))
    change(d)
    with pytest.raises(StoreError, match=message) as err:
        StoreMeta.from_dict(d)
    assert "invalid store metadata" in str(err.value)
    assert not isinstance(err.value, SchemaVersionError)


def test_other_versions_and_schemas_are_refused() -> None:
    d = _meta().to_dict()
    with pytest.raises(
        SchemaVersionError, match="store schema version 999 is not supported"
    ) as err:
        StoreMeta.from_dict({**d, "version": 999})
    assert "reads versions 1, 2" in str(err.value)
    with pytest.raises(SchemaVersionError, match="not a cmd-pipeline store"):
        StoreMeta.from_dict({**d, "schema": "something.else"})
    assert issubclass(SchemaVersionError, StoreError)


def test_settings_validation() -> None:
    s = IngestSettings()
    assert (s.include, s.float_buffers, s.nonfinite, s.codec, s.time_chunk) == (
        ("*",),
        True,
        "keep",
        "none",
        1,
    )
    assert "chunk_rows" not in s.content_fields() and "exclude" in s.content_fields()
    for bad in ({"codec": "gzip"}, {"nonfinite": "ignore"}, {"chunk_rows": 0}, {"time_chunk": 0}):
        with pytest.raises(ValueError):
            IngestSettings(**bad)  # type: ignore[arg-type]


def test_ranges() -> None:
    assert _ranges([]) == "none"
    assert _ranges([4]) == "4"
    assert _ranges([0, 1, 2, 5, 7, 8, 10]) == "0-2, 5, 7-8, 10"


def test_input_error_fields_and_pickling() -> None:
    e = InputError("bad bytes", path="/x/e3.pt", epoch=3, key="fc.weight")
    assert str(e) == "file /x/e3.pt, epoch 3, key 'fc.weight': bad bytes"
    back = pickle.loads(pickle.dumps(e))  # errors cross process boundaries on a cluster
    assert (back.reason, back.path, back.epoch, back.key) == (
        "bad bytes",
        "/x/e3.pt",
        3,
        "fc.weight",
    )
    assert str(back) == str(e)
    assert str(InputError("plain")) == "plain"
    assert InputError.exit_code == 2 and StoreError.exit_code == 3
    assert pipeline.ConfigMismatchError.exit_code == 4


def test_tensor_id_written_in_batches_matches_every_row(
    run5: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batches of 14 rows (two chunks of 7): tensors start and end inside batches and span them
    from pipeline.store import meta_arrays

    monkeypatch.setattr(meta_arrays, "_ID_BATCH_ROWS", 16)
    store = tmp_path / "s.zarr"
    pipeline.ingest([run5.root], store, runtime=SYNC, chunk_rows=7)
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    meta = pipeline.open_store(str(store)).meta
    want = np.full(meta.n_rows, -1, dtype=np.int32)
    for k, t in enumerate(meta.tensors):
        if t.stored:
            want[t.offset : t.offset + t.size] = k
    assert (want >= 0).any() and len({t.size for t in meta.tensors if t.stored}) > 1
    np.testing.assert_array_equal(root["tensor_id"][:], want)


def test_tensor_id_chunks_inside_one_tensor_are_copied_and_match_every_row(
    run5: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full chunk of one tensor's rows takes the stored bytes of that tensor's first such
    chunk; every row still holds its tensor's index (a copy from the wrong chunk, or of a
    chunk not yet written, would not)."""
    from pipeline.store import meta_arrays

    copied: list[tuple[int, int]] = []
    original = meta_arrays._copy_chunks

    def recording(array: object, pairs: list[tuple[int, int]]) -> None:
        copied.extend(pairs)
        original(array, pairs)

    monkeypatch.setattr(meta_arrays, "_copy_chunks", recording)
    monkeypatch.setattr(meta_arrays, "_ID_BATCH_ROWS", 8)  # one chunk per zarr call
    store = tmp_path / "s.zarr"
    pipeline.ingest([run5.root], store, runtime=SYNC, chunk_rows=4)
    meta = pipeline.open_store(str(store)).meta
    want = np.full(meta.n_rows, -1, dtype=np.int32)
    for k, t in enumerate(meta.tensors):
        if t.stored:
            want[t.offset : t.offset + t.size] = k
    assert len(copied) >= 2 and len({want[src * 4] for src, _dst in copied}) >= 2
    for src, dst in copied:  # chunks of one tensor, the source chunk before its copies
        assert src < dst and (want[src * 4 : src * 4 + 4] == want[dst * 4]).all()
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    np.testing.assert_array_equal(root["tensor_id"][:], want)


def test_on_disk_layout(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest([run5.root], store, runtime=SYNC, chunk_rows=50, time_chunk=2)
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    assert root.metadata.zarr_format == 3
    attrs = root.attrs[ATTR_KEY]
    assert attrs["schema"] == "cmd-pipeline.store" and attrs["version"] == 2
    assert attrs["package_version"] == pipeline.__version__
    assert attrs["pending"] is None and attrs["n_epochs"] == 5 and attrs["store_dtype"] == "float32"
    # schema 2: the root attributes stay small; epochs and tensors live in arrays
    assert "epochs" not in attrs and "tensors" not in attrs
    assert root["epoch"][:].tolist() == [0, 1, 2, 3, 4]
    assert root["epoch"].metadata.dimension_names == ("epoch",)
    names = root["tensor"][:].tolist()
    assert names == [t.name for t in pipeline.open_store(str(store)).meta.tensors]
    ids = root["tensor_id"][:]
    offsets = root["tensor_offset"][:]
    for k, off in enumerate(offsets):
        if off >= 0:
            assert (ids[off : off + root["tensor_size"][k]] == k).all()
    assert root["meta/nonfinite"].shape == (5, len(names))
    arr = root["trajectory"]
    assert arr.shape == (NET_ROWS, 5) and arr.chunks == (50, 2)
    assert arr.metadata.dimension_names == ("param", "epoch")
    assert arr.dtype == np.float32 and np.isnan(arr.fill_value)
    assert arr.compressors == ()
    # consolidated metadata (what xarray opens) is current
    consolidated = zarr.open_group(str(store), mode="r").metadata.consolidated_metadata
    assert consolidated is not None and consolidated.metadata["trajectory"].shape == (NET_ROWS, 5)
    # chunk keys: 3 row blocks x 3 time blocks, nothing else under trajectory/c
    keys = sorted(
        str(p.relative_to(store / "trajectory" / "c"))
        for p in (store / "trajectory" / "c").rglob("*")
        if p.is_file()
    )
    assert keys == [f"{i}/{j}" for i in range(3) for j in range(3)]
    assert (store / "zarr.json").is_file() and (store / "trajectory" / "zarr.json").is_file()
    info = pipeline.info(store)
    assert info["n_chunks"] == 9 and info["chunk_shape"] == (50, 2)
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


def test_lz4_codec_layout(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest([run5.root], store, runtime=SYNC, codec="lz4")
    arr = zarr.open_group(str(store), mode="r", use_consolidated=False)["trajectory"]
    (codec,) = arr.compressors
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "lz4"
    assert arr.chunks == (NET_ROWS, 1)  # default: 8 MiB chunks, capped at N rows


def test_open_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no cmd-pipeline store at"):
        pipeline.open_store(str(tmp_path / "missing.zarr"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", use_consolidated=False)
    with pytest.raises(StoreError, match="not a cmd-pipeline store"):
        pipeline.open_store(str(tmp_path / "plain.zarr"))
    with pytest.raises(StoreError, match="not a cmd-pipeline store"):
        pipeline.info(tmp_path / "plain.zarr")


def _set_version(store: Path, version: object) -> None:
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    attrs = dict(root.attrs[ATTR_KEY])
    attrs["version"] = version
    root.attrs[ATTR_KEY] = attrs


def test_schema_version_999_fails_to_open(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest(run5.paths[:2], store, runtime=SYNC)
    _set_version(store, 999)
    with pytest.raises(SchemaVersionError, match="schema version 999 is not supported") as err:
        pipeline.open_store(str(store))
    assert "use the cmd-pipeline release that wrote it" in str(err.value)
    for op in (lambda: pipeline.info(store), lambda: pipeline.export(store, 0, tmp_path / "e.pt")):
        with pytest.raises(SchemaVersionError, match="999"):
            op()
    _set_version(store, 2)
    assert pipeline.open_store(str(store)).meta is not None


def test_analyses_are_listed_and_kept_apart(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest(run5.paths[:2], store, runtime=SYNC)
    assert pipeline.info(store)["analyses"] == []
    add_study(store, "b_study")
    add_study(store, "a_study")
    assert pipeline.info(store)["analyses"] == ["a_study", "b_study"]
    st = pipeline.open_store(str(store))
    assert st.meta is not None and st.meta.n_epochs == 2

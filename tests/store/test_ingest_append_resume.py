"""Appending, re-running and rebuilding: byte-identical stores, no-op re-runs, clear refusals
without --force, correct rebuilds with it, selections, and studies that are never touched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import (
    NET_KEYS,
    NET_PARAMETERS,
    NET_ROWS,
    NET_SHAPES,
    SYNC,
    THREADS,
    Run,
    add_study,
    assert_same_bits,
    assert_state_dict_equal,
    checkpoint_order,
    expected_trajectory,
    load_export,
    net_state_dicts,
    read_trajectory,
    save_checkpoint,
    snapshot,
    snapshot_mtimes,
    study_files,
)

import pipeline


@pytest.mark.parametrize(
    ("time_chunk", "split", "total", "whole_dir_second"),
    [(1, 3, 5, False), (1, 3, 5, True), (2, 4, 6, False), (3, 3, 5, True)],
)
def test_append_equals_one_go(
    make_run, tmp_path: Path, time_chunk: int, split: int, total: int, whole_dir_second: bool
) -> None:
    run: Run = make_run(total)
    appended, one_go = tmp_path / "appended.zarr", tmp_path / "one_go.zarr"
    kw = {"chunk_rows": 7, "time_chunk": time_chunk, "runtime": SYNC}

    first = pipeline.ingest(run.paths[:split], appended, **kw)
    second_inputs = [run.root] if whole_dir_second else run.paths[split:]
    second = pipeline.ingest(second_inputs, appended, **kw)
    pipeline.ingest([run.root], one_go, **kw)

    assert first.added == list(range(split))
    assert second.added == list(range(split, total))
    assert second.already_present == (list(range(split)) if whole_dir_second else [])
    assert second.n_epochs == total
    assert snapshot(appended) == snapshot(one_go)
    assert_same_bits(read_trajectory(appended), expected_trajectory(run.sds))


def test_append_with_defaults_keeps_the_store_settings(run5: Run, tmp_path: Path) -> None:
    """Settings left out on an append are the store's, not the defaults."""
    store = tmp_path / "s.zarr"
    pipeline.ingest(
        run5.paths[:2], store, runtime=SYNC, chunk_rows=10, exclude=["fc.*"], codec="lz4"
    )
    result = pipeline.ingest(run5.paths[2:], store, runtime=SYNC)
    assert result.added == [2, 3, 4]
    d = pipeline.info(store)
    assert d["chunk_shape"] == (10, 1) and d["codec"] == "lz4"
    assert d["settings"]["exclude"] == ["fc.*"]
    stored = [k for k in NET_KEYS if not k.startswith("fc.")]
    assert_same_bits(read_trajectory(store), expected_trajectory(run5.sds, stored))


def test_rerun_is_a_noop(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest([run5.root], store, runtime=SYNC, chunk_rows=16)
    before = snapshot_mtimes(store)

    for inputs in ([run5.root], run5.paths[1:3], [str(run5.root / "epoch_*.pt")]):
        result = pipeline.ingest(inputs, store, runtime=SYNC)
        assert result.added == [] and result.chunks_written == 0
        assert result.already_present == ([0, 1, 2, 3, 4] if len(inputs) != 2 else [1, 2])
        assert result.n_epochs == 5
        assert snapshot_mtimes(store) == before
    # same settings given explicitly: still nothing to do
    result = pipeline.ingest(
        [run5.root], store, runtime=THREADS, chunk_rows=16, codec="none", time_chunk=1
    )
    assert result.added == [] and snapshot_mtimes(store) == before


@pytest.mark.parametrize("how", ["in-place", "replaced"])
def test_changed_checkpoint_needs_force(run5: Run, tmp_path: Path, how: str) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest([run5.root], store, runtime=SYNC, chunk_rows=16)
    add_study(store)
    studies = study_files(store)
    before = snapshot(store)

    new_sd = net_state_dicts(1, seed=7)[0]  # other values, same keys/shapes/dtypes
    if how == "in-place":
        torch.save(new_sd, run5.paths[1])
    else:  # written elsewhere and renamed over the old file (a new inode)
        tmp = save_checkpoint(tmp_path / "elsewhere", 1, new_sd, "pt")
        os.replace(tmp, run5.paths[1])

    with pytest.raises(
        pipeline.ConfigMismatchError, match="epoch 1 is already stored from other files"
    ) as err:
        pipeline.ingest([run5.root], store, runtime=SYNC)
    assert "force=True" in str(err.value) and str(run5.paths[1]) in str(err.value)
    assert snapshot(store) == before

    result = pipeline.ingest([run5.root], store, runtime=SYNC, force=True)

    assert result.added == [0, 1, 2, 3, 4]
    sds = [run5.sds[0], new_sd, *run5.sds[2:]]
    assert_same_bits(read_trajectory(store), expected_trajectory(sds))
    got = torch.load(pipeline.export(store, 1, tmp_path / "e1.pt"), weights_only=True)
    assert_state_dict_equal(got, new_sd)
    assert study_files(store) == studies
    assert pipeline.info(store)["chunk_shape"] == (16, 1)  # kept: the store's setting


SETTING_CHANGES = {
    "exclude": {"exclude": ("*.bias",)},
    "include": {"include": ("conv.*",)},
    "float_buffers": {"float_buffers": False},
    "buffer_patterns": {"buffer_patterns": ("fc.*",)},
    "codec": {"codec": "lz4"},
    "chunk_rows": {"chunk_rows": 5},
    "time_chunk": {"time_chunk": 2},
    "nonfinite": {"nonfinite": "error"},
}


@pytest.mark.parametrize("change", list(SETTING_CHANGES))
def test_changed_settings_need_force(run5: Run, tmp_path: Path, change: str) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest([run5.root], store, runtime=SYNC, chunk_rows=16)
    data = add_study(store)
    studies = study_files(store)
    before = snapshot_mtimes(store)
    kw = SETTING_CHANGES[change]

    with pytest.raises(pipeline.ConfigMismatchError, match="other settings") as err:
        pipeline.ingest([run5.root], store, runtime=SYNC, **kw)  # type: ignore[arg-type]
    assert change in str(err.value) and "force=True" in str(err.value)
    # an append with other settings is refused just the same
    extra = save_checkpoint(run5.root, 5, net_state_dicts(6)[5], "pt")
    with pytest.raises(pipeline.ConfigMismatchError):
        pipeline.ingest([extra], store, runtime=SYNC, **kw)  # type: ignore[arg-type]
    assert snapshot_mtimes(store) == before

    result = pipeline.ingest([run5.root], store, runtime=SYNC, force=True, **kw)  # type: ignore[arg-type]

    assert result.added == [0, 1, 2, 3, 4, 5]
    settings = pipeline.info(store)["settings"]
    for k, v in kw.items():
        assert settings[k] == (list(v) if isinstance(v, tuple) else v)
    sds = [*run5.sds, net_state_dicts(6)[5]]
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    stored = [t.name for t in meta.tensors if t.stored]
    want_stored = {
        "exclude": [
            k for k in NET_KEYS if not k.endswith(".bias") and k != "bn.num_batches_tracked"
        ],
        "include": ["conv.weight", "conv.bias"],
        "float_buffers": list(NET_PARAMETERS),
        "buffer_patterns": [k for k in NET_KEYS if k != "bn.num_batches_tracked"],
    }.get(change, [k for k in NET_KEYS if k != "bn.num_batches_tracked"])
    assert stored == want_stored
    assert_same_bits(read_trajectory(store), expected_trajectory(sds, stored))
    for epoch in (0, 5):
        got = torch.load(pipeline.export(store, epoch, tmp_path / "e.pt"), weights_only=True)
        assert_state_dict_equal(got, sds[epoch])
    assert study_files(store) == studies
    assert pipeline.info(store)["analyses"] == ["study1"]
    assert np.array_equal(zarr.open_group(str(store), mode="r", use_consolidated=False)["analyses/study1/modes"][:], data)


def test_appending_an_earlier_epoch_is_an_error(make_run, tmp_path: Path) -> None:
    sds = net_state_dicts(5)
    root = tmp_path / "ckpts"
    for e in (0, 2, 4):
        save_checkpoint(root, e, sds[e], "pt")
    late = save_checkpoint(tmp_path / "late", 3, sds[3], "pt")
    store = tmp_path / "s.zarr"
    pipeline.ingest([root], store, runtime=SYNC)
    assert pipeline.info(store)["epochs"] == [0, 2, 4]
    before = snapshot(store)

    with pytest.raises(pipeline.InputError, match="epoch 3 comes before the last stored epoch 4"):
        pipeline.ingest([late], store, runtime=SYNC)
    assert snapshot(store) == before


def test_time_chunk_two_appends_only_on_a_chunk_boundary(make_run, tmp_path: Path) -> None:
    run: Run = make_run(6)
    three, four, six = tmp_path / "three.zarr", tmp_path / "four.zarr", tmp_path / "six.zarr"
    kw = {"chunk_rows": 20, "time_chunk": 2, "runtime": SYNC}
    pipeline.ingest(run.paths[:3], three, **kw)
    before = snapshot(three)
    with pytest.raises(pipeline.ConfigMismatchError, match="holds 3 epochs in time chunks of 2"):
        pipeline.ingest(run.paths[3:], three, **kw)
    with pytest.raises(pipeline.ConfigMismatchError):
        pipeline.ingest([run.root], three, runtime=SYNC)
    assert snapshot(three) == before
    assert pipeline.info(three)["epochs"] == [0, 1, 2]

    pipeline.ingest(run.paths[:4], four, **kw)
    result = pipeline.ingest(run.paths[4:], four, runtime=SYNC)
    assert result.added == [4, 5]
    pipeline.ingest([run.root], six, **kw)
    assert snapshot(four) == snapshot(six)
    assert_same_bits(read_trajectory(four), expected_trajectory(run.sds))


def test_studies_survive_every_ingest(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest(run5.paths[:3], store, runtime=SYNC, chunk_rows=16)
    add_study(store, "study1")
    add_study(store, "study2")
    studies = study_files(store)
    assert len(studies) >= 6

    pipeline.ingest(run5.paths[:3], store, runtime=SYNC)  # no-op
    pipeline.ingest([run5.root], store, runtime=SYNC)  # append
    pipeline.ingest([run5.root], store, runtime=SYNC, codec="lz4", force=True)  # rebuild
    with pytest.raises(pipeline.InputError):  # a failed append rolls back
        bad = run5.root / "epoch_5.pt"
        bad.write_bytes(b"")
        pipeline.ingest([bad], store, runtime=SYNC)

    assert study_files(store) == studies
    assert pipeline.info(store)["analyses"] == ["study1", "study2"]
    assert_same_bits(read_trajectory(store), expected_trajectory(run5.sds))


def test_selection_and_tensor_index(run5: Run, tmp_path: Path) -> None:
    """Index of a .pt run (state_dict order), checked field by field."""
    store = tmp_path / "s.zarr"
    pipeline.ingest(
        [run5.root],
        store,
        runtime=SYNC,
        include=["conv.*", "bn.*"],
        exclude=["*.bias"],
        float_buffers=False,
    )
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    index = [(t.name, t.shape, t.dtype, t.offset, t.kind) for t in meta.tensors]
    assert index == [
        ("conv.weight", (3, 2, 3, 3), "float32", 0, "parameter"),
        ("conv.bias", (3,), "float32", -1, "parameter"),
        ("bn.weight", (3,), "float32", 54, "parameter"),
        ("bn.bias", (3,), "float32", -1, "parameter"),
        ("bn.running_mean", (3,), "float32", -1, "buffer"),
        ("bn.running_var", (3,), "float32", -1, "buffer"),
        ("bn.num_batches_tracked", (), "int64", -1, "buffer"),
        ("fc.weight", (5, 12), "float32", -1, "parameter"),
        ("fc.bias", (5,), "float32", -1, "parameter"),
    ]
    d = pipeline.info(store)
    assert d["n_rows"] == 57 and d["n_epochs"] == 5
    assert (d["tensors"], d["tensors_stored"], d["parameters"], d["buffers"]) == (9, 2, 6, 3)
    assert d["not_stored"] == [
        "conv.bias",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    ]
    assert_same_bits(
        read_trajectory(store), expected_trajectory(run5.sds, ["conv.weight", "bn.weight"])
    )
    # excluded tensors come back from the original files, bit for bit
    for epoch in range(5):
        for suffix in (".pt", ".safetensors"):
            out = pipeline.export(store, epoch, tmp_path / f"e{epoch}{suffix}")
            got = load_export(out)
            assert_state_dict_equal(got, run5.sds[epoch])
    assert {k: tuple(v.shape) for k, v in got.items()} == NET_SHAPES


@pytest.mark.parametrize("fmt", ["safetensors", "sharded"])
def test_selection_reads_excluded_tensors_back_from_any_format(
    make_run, tmp_path: Path, fmt: str
) -> None:
    run: Run = make_run(3, fmt, "bfloat16")
    store = tmp_path / "s.zarr"
    pipeline.ingest(
        [run.root], store, runtime=SYNC, exclude=["fc.weight", "conv.*"], float_buffers=False
    )
    order = checkpoint_order(run.paths[0], run.sds[0])
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    assert [t.name for t in meta.tensors] == order
    stored = ["bn.weight", "bn.bias", "fc.bias"]
    offset = 0
    for t in meta.tensors:  # offsets follow the file's order over the stored tensors
        assert t.kind == ("buffer" if "running" in t.name or "batches" in t.name else "parameter")
        assert t.dtype == ("int64" if t.name == "bn.num_batches_tracked" else "bfloat16")
        assert t.shape == NET_SHAPES[t.name]
        if t.name in stored:
            assert t.offset == offset
            offset += t.size
        else:
            assert t.offset == -1
    assert meta.n_rows == offset == 3 + 3 + 5
    assert_same_bits(read_trajectory(store), expected_trajectory(run.sds, stored, order))
    for epoch in range(3):
        got = load_export(pipeline.export(store, epoch, tmp_path / f"e{epoch}.safetensors"))
        assert_state_dict_equal(got, run.sds[epoch], ordered=False)


def test_failed_forced_rebuild_leaves_a_consistent_store(make_run, tmp_path: Path) -> None:
    """--force deletes the old trajectory before writing; if the rebuild then fails, the store
    must not keep metadata of epochs it no longer holds (a re-run would skip them)."""
    run: Run = make_run(3)
    store = tmp_path / "s.zarr"
    pipeline.ingest([run.root], store, runtime=SYNC)
    add_study(store)
    studies = study_files(store)
    nan_sd = dict(run.sds[2])
    nan_sd["fc.bias"] = nan_sd["fc.bias"].clone()
    nan_sd["fc.bias"][1] = float("inf")
    torch.save(nan_sd, run.paths[2])

    with pytest.raises(pipeline.InputError, match="nonfinite=error") as err:
        pipeline.ingest([run.root], store, runtime=SYNC, nonfinite="error", force=True)
    assert err.value.epoch == 2 and err.value.key == "fc.bias"
    assert not (store / "trajectory").exists()
    with pytest.raises(pipeline.StoreError, match="not a cmd-pipeline store"):
        pipeline.open_store(str(store))
    assert study_files(store) == studies

    result = pipeline.ingest([run.root], store, runtime=SYNC)  # starts afresh
    assert result.added == [0, 1, 2] and result.nonfinite == {2: 1}
    assert_same_bits(read_trajectory(store), expected_trajectory([*run.sds[:2], nan_sd]))
    assert study_files(store) == studies


def test_buffer_patterns_and_float_buffers(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest([run5.root], store, runtime=SYNC, buffer_patterns=["fc.*"], float_buffers=False)
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    kinds = {t.name: (t.kind, t.stored) for t in meta.tensors}
    assert kinds["fc.weight"] == ("buffer", False) and kinds["fc.bias"] == ("buffer", False)
    assert kinds["bn.running_mean"] == ("buffer", False)
    assert kinds["conv.weight"] == ("parameter", True)
    assert meta.n_rows == NET_ROWS - 60 - 5 - 3 - 3


def test_nothing_selected_is_an_error(run5: Run, tmp_path: Path) -> None:
    with pytest.raises(pipeline.InputError, match="no floating-point tensor is selected"):
        pipeline.ingest([run5.root], tmp_path / "s.zarr", runtime=SYNC, include=["nothing.*"])
    assert not (tmp_path / "s.zarr" / "trajectory").exists()


def test_schema_version_999_is_refused_by_ingest(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest(run5.paths[:2], store, runtime=SYNC)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    attrs = dict(root.attrs["cmd_pipeline"])
    attrs["version"] = 999
    root.attrs["cmd_pipeline"] = attrs
    before = snapshot(store)
    with pytest.raises(pipeline.SchemaVersionError, match="version 999"):
        pipeline.ingest([run5.root], store, runtime=SYNC)
    with pytest.raises(pipeline.SchemaVersionError):
        pipeline.ingest([run5.root], store, runtime=SYNC, force=True)
    assert snapshot(store) == before


def test_copied_store_is_independent(run5: Run, tmp_path: Path) -> None:
    """A store is self-contained: a copy opens and exports on its own."""
    store = tmp_path / "s.zarr"
    pipeline.ingest([run5.root], store, runtime=SYNC)
    shutil.copytree(store, tmp_path / "copy.zarr")
    shutil.rmtree(store)
    assert_same_bits(read_trajectory(tmp_path / "copy.zarr"), expected_trajectory(run5.sds))
    got = torch.load(
        pipeline.export(tmp_path / "copy.zarr", 4, tmp_path / "e.pt"), weights_only=True
    )
    assert_state_dict_equal(got, run5.sds[4])

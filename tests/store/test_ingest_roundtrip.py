"""Ingest then export, for every checkpoint format and dtype: bit for bit, and loadable."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    DTYPES,
    FORMATS,
    NET_KEYS,
    NET_ROWS,
    NET_SHAPES,
    SYNC,
    THREADS,
    Net,
    as_float32,
    assert_same_bits,
    assert_state_dict_equal,
    checkpoint_order,
    expected_trajectory,
    load_export,
    net_state_dicts,
    read_trajectory,
    write_run,
)
from safetensors.torch import load_file

import pipeline


def _reference_export(sd: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """What export must give back: the originals, float64 rounded through float32."""
    return OrderedDict(
        (k, v.to(torch.float32).to(torch.float64) if v.dtype == torch.float64 else v)
        for k, v in sd.items()
    )


def _load_into_net(sd: dict[str, torch.Tensor], dtype: str) -> Net:
    net = Net().to(DTYPES[dtype])
    net.load_state_dict(sd, strict=True)
    return net


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_every_format_and_dtype(tmp_path: Path, fmt: str, dtype: str) -> None:
    sds = net_state_dicts(3, dtype)
    paths = write_run(tmp_path / "ckpts", sds, fmt)
    order = checkpoint_order(paths[0], sds[0])
    if fmt in ("pt", "pth", "sharded"):
        assert order == list(NET_KEYS)
    store = tmp_path / "store.zarr"

    result = pipeline.ingest([tmp_path / "ckpts"], store, chunk_rows=16, runtime=SYNC)

    assert result.added == [0, 1, 2] and result.n_epochs == 3
    assert result.n_rows == NET_ROWS and result.nonfinite == {}
    # the trajectory: tensors in the first checkpoint's order, flattened in C order, upcast
    # exactly
    traj = read_trajectory(store)
    assert_same_bits(traj, expected_trajectory(sds, order=order))
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    assert [t.name for t in meta.tensors] == order
    assert {t.name: t.dtype for t in meta.tensors} == {
        k: str(v.dtype).removeprefix("torch.") for k, v in sds[0].items()
    }
    for epoch, sd in enumerate(sds):
        for suffix in (".safetensors", ".pt"):
            out = pipeline.export(store, epoch, tmp_path / f"out{epoch}{suffix}")
            assert out == tmp_path / f"out{epoch}{suffix}"
            got = load_export(out)
            assert list(got) == order  # the store's order, whatever the output format
            assert_state_dict_equal(got, _reference_export(sd), ordered=False)
            net = _load_into_net(got, dtype)
            assert torch.equal(net.bn.num_batches_tracked, sd["bn.num_batches_tracked"])
            assert net.bn.num_batches_tracked.dtype == torch.int64
    assert not list(tmp_path.glob("*.partial"))


def test_bfloat16_rows_are_the_bits_shifted_left_by_16(tmp_path: Path) -> None:
    bits = np.array(
        [0x0000, 0x8000, 0x3F80, 0xBF80, 0x0001, 0x807F, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x7F81],
        dtype=np.uint16,
    )
    w = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
    # (safetensors lists same-dtype tensors by name: "a" comes first)
    sds = [{"a": w, "b": torch.zeros_like(w)}, {"a": w.flip(0), "b": w}]
    write_run(tmp_path / "ckpts", sds, "safetensors")
    pipeline.ingest([tmp_path / "ckpts"], tmp_path / "s.zarr", runtime=SYNC)

    traj = read_trajectory(tmp_path / "s.zarr")
    want0 = np.concatenate([bits, np.zeros_like(bits)]).astype(np.uint32) << 16
    want1 = np.concatenate([bits[::-1], bits]).astype(np.uint32) << 16
    assert np.array_equal(traj.view(np.uint32), np.stack([want0, want1], axis=1))
    # even a signalling NaN comes back with its bits
    out = pipeline.export(tmp_path / "s.zarr", 1, tmp_path / "e1.safetensors")
    got = load_file(str(out))
    assert np.array_equal(got["b"].view(torch.int16).numpy().view(np.uint16), bits)


@pytest.mark.parametrize("codec", ["none", "lz4"])
def test_all_nan_chunks_are_written_with_their_bits(tmp_path: Path, codec: str) -> None:
    """A chunk holding only NaNs equals zarr's fill value: it must be written all the same
    (a missing chunk would read back as the canonical NaN, and look unfinished to a resume)."""
    bits = np.array([0x7F800001, 0xFFC00001, 0x7FC00000, 0x7FFFFFFF] * 2, dtype=np.uint32)
    sds = [{"a": torch.from_numpy(bits.view(np.int32).copy()).view(torch.float32)}]
    write_run(tmp_path / "ckpts", sds, "safetensors")
    store = tmp_path / "s.zarr"
    result = pipeline.ingest([tmp_path / "ckpts"], store, runtime=SYNC, codec=codec, chunk_rows=3)
    assert result.nonfinite == {0: 8} and result.chunks_written == 3
    assert sorted(p.name for p in (store / "trajectory" / "c").rglob("*") if p.is_file()) == [
        "0",
        "0",
        "0",
    ]
    assert np.array_equal(read_trajectory(store)[:, 0].view(np.uint32), bits)


def test_float64_is_stored_rounded_to_float32_and_exported_as_float64(tmp_path: Path) -> None:
    exact = torch.tensor([0.5, -2.0, 1024.0, 0.0, -0.0], dtype=torch.float64)
    inexact = torch.tensor([0.1, 1 / 3, 1e-40, 3.0000001, -7.123456789], dtype=torch.float64)
    big = torch.tensor([1e39, -1e300], dtype=torch.float64)  # beyond float32's range
    sds = [
        {"exact": exact, "inexact": inexact, "big": big},
        {"exact": -exact, "inexact": inexact * 2, "big": big},
    ]
    write_run(tmp_path / "ckpts", sds, "pt")

    result = pipeline.ingest([tmp_path / "ckpts"], tmp_path / "s.zarr", runtime=SYNC)

    traj = read_trajectory(tmp_path / "s.zarr")
    col0 = np.concatenate([as_float32(exact), as_float32(inexact), as_float32(big)])
    assert_same_bits(traj[:, 0], col0)
    assert traj[1, 0] == np.float32(-2.0) and np.signbit(traj[4, 0])
    assert traj[5, 0] == np.float32(0.1) and np.float64(traj[5, 0]) != 0.1
    assert list(traj[10:12, 0]) == [np.inf, -np.inf]  # overflow rounds to ±Inf ...
    assert result.nonfinite == {0: 2, 1: 2}  # ... and is counted as non-finite
    meta = pipeline.open_store(str(tmp_path / "s.zarr")).meta
    assert meta is not None and [t.dtype for t in meta.tensors] == ["float64"] * 3
    assert dict(meta.epochs[0].nonfinite_by_tensor) == {"big": 2}

    for suffix in (".pt", ".safetensors"):
        got = load_export(pipeline.export(tmp_path / "s.zarr", 0, tmp_path / f"e0{suffix}"))
        assert got["exact"].dtype == torch.float64
        assert torch.equal(got["exact"], exact)  # representable values survive exactly
        assert torch.equal(got["inexact"], inexact.to(torch.float32).to(torch.float64))
        assert not torch.equal(got["inexact"], inexact)


@pytest.mark.parametrize("suffix", ["pt", "pth"])
@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "model"])
def test_torch_wrappers(tmp_path: Path, wrapper: str, suffix: str) -> None:
    sds = net_state_dicts(2)
    paths = write_run(tmp_path / "ckpts", sds, suffix, wrapper=wrapper)
    raw = torch.load(paths[1], weights_only=True)
    if wrapper == "model":
        assert raw["epoch"] == 1 and set(raw) == {"model", "epoch"}
    elif wrapper == "state_dict":
        assert set(raw) == {"state_dict"}

    pipeline.ingest(paths, tmp_path / "s.zarr", runtime=SYNC)

    assert_same_bits(read_trajectory(tmp_path / "s.zarr"), expected_trajectory(sds))
    got = torch.load(
        pipeline.export(tmp_path / "s.zarr", 1, tmp_path / "e1.pth"), weights_only=True
    )
    assert_state_dict_equal(got, sds[1])
    _load_into_net(got, "float32")


def test_mixed_dtypes_in_one_checkpoint(tmp_path: Path) -> None:
    sds = net_state_dicts(2)
    for sd in sds:
        sd["conv.weight"] = sd["conv.weight"].to(torch.bfloat16)
        sd["fc.weight"] = sd["fc.weight"].to(torch.float16)
        sd["fc.bias"] = sd["fc.bias"].to(torch.float64)
    write_run(tmp_path / "ckpts", sds, "sharded")
    pipeline.ingest([tmp_path / "ckpts"], tmp_path / "s.zarr", runtime=SYNC, chunk_rows=5)

    assert_same_bits(read_trajectory(tmp_path / "s.zarr"), expected_trajectory(sds))
    for epoch, sd in enumerate(sds):
        got = load_export(pipeline.export(tmp_path / "s.zarr", epoch, tmp_path / "e.safetensors"))
        assert_state_dict_equal(got, _reference_export(sd), ordered=False)


def test_sharded_rows_follow_the_index_order(tmp_path: Path) -> None:
    """Hugging Face writes weight_map sorted by name: the index order is the state_dict order."""
    import json

    sds = net_state_dicts(2)
    write_run(tmp_path / "ckpts", sds, "sharded")
    for d in (tmp_path / "ckpts").iterdir():
        index_path = d / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index_path.write_text(json.dumps(index))

    pipeline.ingest([tmp_path / "ckpts"], tmp_path / "s.zarr", runtime=SYNC)

    names = sorted(NET_KEYS)
    meta = pipeline.open_store(str(tmp_path / "s.zarr")).meta
    assert meta is not None and [t.name for t in meta.tensors] == names
    reordered = [OrderedDict((k, sd[k]) for k in names) for sd in sds]
    assert_same_bits(read_trajectory(tmp_path / "s.zarr"), expected_trajectory(reordered))
    offsets = {t.name: t.offset for t in meta.tensors}
    assert offsets["bn.bias"] == 0 and offsets["bn.num_batches_tracked"] == -1


def test_trajectory_row_order_and_index(tmp_path: Path) -> None:
    """Row r of the trajectory is element r of the C-ordered concatenation of the tensors."""
    a = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    b = torch.tensor(7.5)  # 0-d
    c = torch.empty(0, 3)  # empty
    d = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # not contiguous
    sds = [{"a": a, "b": b, "c": c, "d": d}, {"a": -a, "b": -b, "c": c, "d": d + 1}]
    write_run(tmp_path / "ckpts", sds, "pt")
    pipeline.ingest([tmp_path / "ckpts"], tmp_path / "s.zarr", runtime=SYNC, chunk_rows=4)

    traj = read_trajectory(tmp_path / "s.zarr")
    assert traj.shape == (24 + 1 + 0 + 6, 2)
    assert np.array_equal(traj[:24, 0], np.arange(24, dtype=np.float32))
    assert traj[24, 0] == 7.5 and traj[24, 1] == -7.5
    assert np.array_equal(traj[25:, 0], np.array([0, 3, 1, 4, 2, 5], dtype=np.float32))
    meta = pipeline.open_store(str(tmp_path / "s.zarr")).meta
    assert meta is not None
    assert [(t.name, t.shape, t.offset) for t in meta.tensors] == [
        ("a", (2, 3, 4), 0),
        ("b", (), 24),
        ("c", (0, 3), 25),
        ("d", (3, 2), 25),
    ]
    got = torch.load(pipeline.export(tmp_path / "s.zarr", 1, tmp_path / "e.pt"), weights_only=True)
    assert_state_dict_equal(got, {k: v.contiguous() for k, v in sds[1].items()})


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_non_float_tensors_round_trip(tmp_path: Path, fmt: str) -> None:
    """Integer and bool buffers stay out of the trajectory: small ones inline, big ones read
    back from the checkpoint files."""
    gen = torch.Generator().manual_seed(0)
    sds = []
    for e in range(2):
        sds.append(
            {
                "w": torch.randn(4, 3, generator=gen),
                "mask": torch.rand(5, generator=gen) > 0.5,
                "i32": torch.arange(6, dtype=torch.int32) * (e + 1),
                "u8": torch.arange(250, 256, dtype=torch.uint8),
                "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
                "i16": torch.tensor([[-(2**15)], [2**15 - 1]], dtype=torch.int16),
                "big": torch.arange(70_000, dtype=torch.int64) - e,  # > 65536: not inline
            }
        )
    paths = write_run(tmp_path / "ckpts", sds, fmt)
    store = tmp_path / "s.zarr"
    result = pipeline.ingest(paths, store, runtime=SYNC)
    assert result.n_rows == 12
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    kinds = {t.name: (t.kind, t.stored, t.dtype) for t in meta.tensors}
    assert kinds["w"] == ("parameter", True, "float32")
    assert kinds["mask"] == ("buffer", False, "bool")
    assert kinds["big"] == ("buffer", False, "int64")
    inline = {t.name for t in meta.epochs[1].inline}
    assert inline == {"mask", "i32", "u8", "i8", "i16"}
    for suffix in (".pt", ".safetensors"):
        got = load_export(pipeline.export(store, 1, tmp_path / f"e{suffix}"))
        assert_state_dict_equal(got, sds[1], ordered=False)
    # the inline ones need no file, the big one does
    paths[1].unlink()
    with pytest.raises(pipeline.InputError, match="missing or changed"):
        pipeline.export(store, 1, tmp_path / "e.pt")


def test_export_does_not_need_the_checkpoints_when_everything_is_stored(tmp_path: Path) -> None:
    """Integer buffers are kept inline, so the store alone is enough."""
    sds = net_state_dicts(2)
    paths = write_run(tmp_path / "ckpts", sds, "safetensors")
    pipeline.ingest(paths, tmp_path / "s.zarr", runtime=SYNC)
    for p in paths:
        p.unlink()
    got = load_export(pipeline.export(tmp_path / "s.zarr", 1, tmp_path / "e.safetensors"))
    assert_state_dict_equal(got, sds[1], ordered=False)
    assert got["bn.num_batches_tracked"].item() == 34


def test_export_errors(tmp_path: Path) -> None:
    sds = net_state_dicts(2)
    paths = write_run(tmp_path / "ckpts", sds, "pt")
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths, store, runtime=SYNC, exclude=["fc.*"])
    with pytest.raises(
        pipeline.StoreError, match=r"epoch 5 is not in the store \(stored epochs: 0-1\)"
    ):
        pipeline.export(store, 5, tmp_path / "e.pt")
    with pytest.raises(pipeline.InputError, match=r"unsupported output type \.npz"):
        pipeline.export(store, 1, tmp_path / "e.npz")
    assert not (tmp_path / "e.npz").exists()
    # excluded tensors are read back from the original file, which must still be there...
    size = paths[1].stat().st_size
    paths[1].unlink()
    with pytest.raises(pipeline.InputError, match="missing or changed") as err:
        pipeline.export(store, 1, tmp_path / "e.pt")
    assert err.value.path == str(paths[1]) and err.value.epoch == 1
    assert not (tmp_path / "e.pt").exists() and not list(tmp_path.glob("*.partial"))
    # ... and unchanged: a file of the same size with other values is refused too
    torch.save(net_state_dicts(1, seed=3)[0], paths[1])
    assert paths[1].stat().st_size == size
    for suffix in (".pt", ".safetensors"):
        with pytest.raises(pipeline.InputError, match="missing or changed") as err:
            pipeline.export(store, 1, tmp_path / f"e{suffix}")
        assert err.value.path == str(paths[1]) and not (tmp_path / f"e{suffix}").exists()
    got = load_export(pipeline.export(store, 0, tmp_path / "e0.pt"))  # epoch 0 is untouched
    assert_state_dict_equal(got, sds[0])
    with pytest.raises(pipeline.StoreError, match="no cmd-pipeline store"):
        pipeline.export(tmp_path / "missing.zarr", 0, tmp_path / "e.pt")


def test_threads_runtime_roundtrip(tmp_path: Path) -> None:
    sds = net_state_dicts(4, "bfloat16")
    paths = write_run(tmp_path / "ckpts", sds, "safetensors")
    result = pipeline.ingest(
        [tmp_path / "ckpts"], tmp_path / "s.zarr", runtime=THREADS, chunk_rows=10, time_chunk=3
    )
    assert result.chunks_written == -(-NET_ROWS // 10) * 2
    order = checkpoint_order(paths[0], sds[0])
    assert_same_bits(read_trajectory(tmp_path / "s.zarr"), expected_trajectory(sds, order=order))
    got = load_export(pipeline.export(tmp_path / "s.zarr", 3, tmp_path / "e.safetensors"))
    assert_state_dict_equal(got, sds[3], ordered=False)


@pytest.mark.slow
def test_local_cluster_roundtrip(tmp_path: Path) -> None:
    """The default runtime: an embedded LocalCluster with worker processes."""
    sds = net_state_dicts(3, "float16")
    write_run(tmp_path / "ckpts", sds, "sharded")
    runtime = pipeline.RuntimeOptions(mode="local", workers=2, progress=False)
    result = pipeline.ingest(
        [tmp_path / "ckpts"], tmp_path / "s.zarr", runtime=runtime, chunk_rows=32
    )
    assert result.added == [0, 1, 2] and result.chunks_written == 5 * 3
    assert_same_bits(read_trajectory(tmp_path / "s.zarr"), expected_trajectory(sds))
    for epoch, sd in enumerate(sds):
        got = torch.load(
            pipeline.export(tmp_path / "s.zarr", epoch, tmp_path / f"e{epoch}.pt"),
            weights_only=True,
        )
        assert_state_dict_equal(got, sd)
        _load_into_net(got, "float16")
    assert {k: tuple(v.shape) for k, v in got.items()} == NET_SHAPES

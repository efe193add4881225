"""What a tensor's per-epoch digest digests (``pipeline.kernels.digests``): a float32 store its
float32 values; a bfloat16/float16 store its stored 16-bit bytes, taken where they lie at
ingest, with no upcast; a 16-bit store whose epochs were digested as float32 values (the
definition before) keeps that definition when epochs are appended, so that its tensors stay
comparable across all its epochs (frozen tensors stay known).

The expected digests are computed here from the checkpoints' tensors by the documented
definition (each tensor one piece: XXH3-128 over the piece's element range and the XXH3-128
of its bytes), not by the ingest code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from helpers import SYNC, net_state_dicts, save_checkpoint

import pipeline
import pipeline.ops.ingest as ops_ingest
from pipeline.kernels.digests import PREFIX, PREFIX_STORED
from pipeline.store.trajectory import TrajectoryStore

FROZEN = ("conv.weight", "bn.weight")
ONE_PIECE = 1 << 20  # chunk rows beyond the Net's size: every tensor is one piece


def _run(root: Path, dtype: str, n: int = 6) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """safetensors checkpoints of the test Net in ``dtype``, two tensors never changing."""
    sds = net_state_dicts(n, dtype)
    for sd in sds:
        for name in FROZEN:
            sd[name] = sds[0][name].clone()
    return [save_checkpoint(root, e, sd, "safetensors") for e, sd in enumerate(sds)], sds


def _bytes(t: torch.Tensor, as_float32: bool) -> bytes:
    """The tensor's values as the digest sees them: its own little-endian bytes, or float32's."""
    t = t.detach().contiguous().reshape(-1)
    if as_float32:
        return t.float().numpy().astype("<f4").tobytes()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype("<f4").tobytes()


def _want(t: torch.Tensor, prefix: str) -> str:
    piece = xxhash.xxh3_128_digest(_bytes(t, as_float32=prefix == PREFIX))
    n = t.numel()
    return prefix + xxhash.xxh3_128_hexdigest(
        (0).to_bytes(8, "little") + n.to_bytes(8, "little") + piece
    )


def _digests(store: Path) -> tuple[list[str], list[tuple[str, ...]]]:
    meta = TrajectoryStore.open(store).require_meta()
    return [t.name for t in meta.stored_tensors()], [e.digests for e in meta.epochs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_digests_are_of_the_stored_values(tmp_path: Path, dtype: str) -> None:
    paths, sds = _run(tmp_path / "run", dtype)
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths, store, runtime=SYNC, chunk_rows=ONE_PIECE)
    assert pipeline.info(store)["store_dtype"] == dtype
    prefix = PREFIX if dtype == "float32" else PREFIX_STORED
    names, got = _digests(store)
    assert len(got) == len(sds) and all(len(d) == len(names) for d in got)
    for e, sd in enumerate(sds):
        assert list(got[e]) == [_want(sd[n], prefix) for n in names], e
    assert sorted(pipeline.info(store)["frozen"]["names"]) == sorted(FROZEN)
    # the chunks written from float32 buffers (a compressed store: not copied from the
    # files) digest alike, chunk by chunk
    packed, plain = tmp_path / "lz4.zarr", tmp_path / "plain.zarr"
    pipeline.ingest(paths, packed, runtime=SYNC, chunk_rows=16, codec="lz4")
    pipeline.ingest(paths, plain, runtime=SYNC, chunk_rows=16)
    assert _digests(packed) == _digests(plain)
    assert all(d.startswith(prefix) for e in _digests(plain)[1] for d in e)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_store_digested_as_float32_values_keeps_that_definition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """A 16-bit store written before (its digests of the float32 values) gets its appended
    epochs digested the same way: every tensor compares across all epochs."""
    paths, sds = _run(tmp_path / "run", dtype)
    store = tmp_path / "s.zarr"
    with monkeypatch.context() as m:  # the earlier definition, for the first four epochs
        m.setattr(ops_ingest, "scheme", lambda *_a: PREFIX)
        pipeline.ingest(paths[:4], store, runtime=SYNC, chunk_rows=ONE_PIECE)
    names, got = _digests(store)
    for e in range(4):
        assert list(got[e]) == [_want(sds[e][n], PREFIX) for n in names], e
    result = pipeline.ingest(paths, store, runtime=SYNC)
    assert result.added == [4, 5]
    names, got = _digests(store)
    for e, sd in enumerate(sds):
        assert list(got[e]) == [_want(sd[n], PREFIX) for n in names], e
    assert sorted(pipeline.info(store)["frozen"]["names"]) == sorted(FROZEN)
    # a new store of the same run digests the stored bytes: other digests, the same frozen set
    fresh = tmp_path / "fresh.zarr"
    pipeline.ingest(paths, fresh, runtime=SYNC, chunk_rows=ONE_PIECE)
    assert _digests(fresh)[1][0][0].startswith(PREFIX_STORED)
    assert sorted(pipeline.info(fresh)["frozen"]["names"]) == sorted(FROZEN)
    assert not np.any([a == b for a, b in zip(_digests(fresh)[1][0], got[0], strict=True)])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_nan_and_inf_are_counted_from_their_bits(tmp_path: Path, dtype: str) -> None:
    """Copied 16-bit chunks are checked without an upcast: every NaN and Inf bit pattern
    (quiet, signalling, negative) is counted, the largest finite values are not."""
    paths, sds = _run(tmp_path / "run", dtype, n=2)
    bits = {"bfloat16": [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x7F7F, 0xFF7F],
            "float16": [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x7BFF, 0xFBFF]}[dtype]
    sd = dict(sds[1])
    w = sd["fc.weight"].clone().reshape(-1)
    w.view(torch.int16)[: len(bits)] = torch.tensor(np.array(bits, np.uint16).view(np.int16))
    sd["fc.weight"] = w.reshape(sds[1]["fc.weight"].shape)
    paths[1].unlink()
    paths[1] = save_checkpoint(tmp_path / "run", 1, sd, "safetensors")
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths, store, runtime=SYNC)
    meta = TrajectoryStore.open(store).require_meta()
    assert dict(meta.epochs[1].nonfinite_by_tensor) == {"fc.weight": 5}
    assert meta.epochs[0].nonfinite == 0
    with pytest.raises(pipeline.InputError, match="5 NaN/Inf"):
        pipeline.ingest(paths, tmp_path / "strict.zarr", runtime=SYNC, nonfinite="error")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_16_bit_pattern_alone_is_judged_as_its_value(dtype: str) -> None:
    """The bit check against the values' own isfinite, each of the 65,536 patterns as a
    tensor of its own (a positive NaN alone, a negative Inf alone, ...), and all at once."""
    from pipeline.graph.ingest import _count_nonfinite16

    bits = np.arange(1 << 16, dtype=np.uint16)
    if dtype == "bfloat16":
        values = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        values = bits.view(np.float16)
    bad = ~np.isfinite(values)
    parts = [(str(i), bits[i : i + 1].view(np.uint8)) for i in range(bits.size)]
    got = dict(_count_nonfinite16(parts, dtype))
    assert got == {str(i): 1 for i in np.flatnonzero(bad)}
    assert _count_nonfinite16([("all", bits.view(np.uint8))], dtype) == (("all", int(bad.sum())),)
    assert _count_nonfinite16([("none", bits[~bad].view(np.uint8))], dtype) == ()

"""Property tests: over shapes (0-d and empty included), chunkings, dtypes and raw values
(NaN/Inf, subnormals, -0.0 ...), the stored trajectory is the numpy reference bit for bit,
the NaN/Inf counts are right, and export gives the checkpoints back."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SYNC, assert_same_bits, load_export, read_trajectory, save_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import pipeline
from pipeline.plan import RowLayout, blocks

# raw storage of each dtype as unsigned integers, and bit patterns worth trying often
_UINT = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16, "float64": np.uint64}
# fmt: off
_F32_SPECIAL = [
    0x00000000, 0x80000000,                          # ±0
    0x7F800000, 0xFF800000,                          # ±Inf
    0x7FC00000, 0xFFC00000, 0x7FC12345,              # quiet NaNs
    0x7F800001, 0x7FBFFFFF,                          # signalling NaNs
    0x00000001, 0x807FFFFF, 0x00400000,              # subnormals
    0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000,  # smallest normal, ±max, 1.0
]
_SPECIAL = {
    "float32": _F32_SPECIAL,
    # the upper halves (the NaN 0x7F800001 would be Inf there: left out)
    "bfloat16": sorted({b >> 16 for b in _F32_SPECIAL if b >> 16 != 0x7F80 or b & 0xFFFF == 0}),
    "float16": [
        0x0000, 0x8000, 0x7C00, 0xFC00,              # ±0, ±Inf
        0x7E00, 0xFE00, 0x7C01, 0x7D55,              # NaNs, signalling ones too
        0x0001, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00,  # subnormals, normal, ±max, 1.0
    ],
    "float64": [
        0x0, 0x8000000000000000, 0x7FF0000000000000, 0xFFF0000000000000,  # ±0, ±Inf
        0x7FF8000000000000, 0x7FF0000000000001,      # NaNs
        0x0000000000000001,                          # subnormal: rounds to 0
        0x3810000000000000,                          # 2**-126: float32's smallest normal
        0x36A0000000000000,                          # 2**-149: float32's smallest subnormal
        0x47EFFFFFE0000000,                          # float32's max
        0x47EFFFFFF0000000,                          # half way above float32's max: Inf
        0x3FF0000000000000, 0x3FB999999999999A,      # 1.0, 0.1
    ],
}
# fmt: on
DTYPE_NAMES = tuple(_UINT)
TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_VIEW = {
    "float32": torch.int32,
    "float16": torch.int16,
    "bfloat16": torch.int16,
    "float64": torch.int64,
}
_SIGNED = {"float32": np.int32, "float16": np.int16, "bfloat16": np.int16, "float64": np.int64}


@dataclass(frozen=True)
class Case:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    values: tuple[tuple[np.ndarray, ...], ...]  # [epoch][tensor]: raw bits, shaped
    steps: np.ndarray | None  # an int64 buffer kept out of the trajectory, or None

    @property
    def n_rows(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)


def _bits(dtype: str, shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    u = _UINT[dtype]
    elements = st.one_of(st.sampled_from(_SPECIAL[dtype]), st.integers(0, int(np.iinfo(u).max)))
    return arrays(u, shape, elements=elements)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 4))
    shapes = tuple(tuple(draw(st.lists(st.integers(0, 4), max_size=3))) for _ in range(n))
    dtypes = tuple(draw(st.sampled_from(DTYPE_NAMES)) for _ in range(n))
    n_epochs = draw(st.integers(1, 4))
    values = tuple(
        tuple(draw(_bits(d, s)) for d, s in zip(dtypes, shapes, strict=True))
        for _ in range(n_epochs)
    )
    steps = draw(st.none() | arrays(np.int64, st.sampled_from([(), (2,)])))
    return Case(tuple(f"layer{i}.w" for i in range(n)), shapes, dtypes, values, steps)


def _tensor(bits: np.ndarray, dtype: str) -> torch.Tensor:
    signed = bits.copy(order="C").view(_SIGNED[dtype])  # (ascontiguousarray makes 0-d 1-d)
    return torch.from_numpy(signed.copy()).view(TORCH[dtype])


def _state_dict(case: Case, epoch: int) -> dict[str, torch.Tensor]:
    sd = {
        name: _tensor(bits, dtype)
        for name, bits, dtype in zip(case.names, case.values[epoch], case.dtypes, strict=True)
    }
    if case.steps is not None:
        sd["steps"] = torch.from_numpy(np.asarray(case.steps + epoch))
    return sd


def _reference_column(case: Case, epoch: int) -> np.ndarray:
    """float32 rows of one epoch, computed from the raw bits with numpy only."""
    parts = []
    for bits, dtype in zip(case.values[epoch], case.dtypes, strict=True):
        flat = bits.reshape(-1)
        if dtype == "float32":
            parts.append(flat.view(np.float32))
        elif dtype == "bfloat16":
            parts.append((flat.astype(np.uint32) << 16).view(np.float32))
        elif dtype == "float16":
            parts.append(flat.view(np.float16).astype(np.float32))
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                parts.append(flat.view(np.float64).astype(np.float32))
    return np.concatenate(parts) if parts else np.empty(0, np.float32)


def _expected_export_bits(case: Case, epoch: int, i: int) -> np.ndarray:
    bits = case.values[epoch][i]
    if case.dtypes[i] != "float64":
        return bits  # fp32/fp16/bf16 are stored exactly: export gives the very same bits
    with np.errstate(over="ignore", invalid="ignore"):
        return bits.view(np.float64).astype(np.float32).astype(np.float64).view(np.uint64)


def _write(case: Case, root: Path, fmt: str) -> None:
    for epoch in range(len(case.values)):
        save_checkpoint(root, epoch, _state_dict(case, epoch), fmt)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    case=cases(),
    fmt=st.sampled_from(["safetensors", "pt"]),
    data=st.data(),
)
def test_ingest_reads_back_bit_exact(
    tmp_path_factory: pytest.TempPathFactory, case: Case, fmt: str, data: st.DataObject
) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    _write(case, tmp / "ckpts", fmt)
    chunk_rows = data.draw(st.integers(1, max(1, case.n_rows) + 2), label="chunk_rows")
    time_chunk = data.draw(st.integers(1, 3), label="time_chunk")
    codec = data.draw(st.sampled_from(["none", "lz4"]), label="codec")
    store = tmp / "s.zarr"
    if case.n_rows == 0:  # only empty tensors: nothing to store
        with pytest.raises(pipeline.InputError, match="no floating-point tensor"):
            pipeline.ingest([tmp / "ckpts"], store, chunk_rows=chunk_rows, runtime=SYNC)
        return

    for shape in case.shapes:
        event("0-d tensor" if shape == () else "empty tensor" if 0 in shape else "tensor")
    for dtype in set(case.dtypes):
        event(dtype)
    result = pipeline.ingest(
        [tmp / "ckpts"],
        store,
        chunk_rows=chunk_rows,
        time_chunk=time_chunk,
        codec=codec,
        runtime=SYNC,
    )

    n_epochs = len(case.values)
    want = np.stack([_reference_column(case, e) for e in range(n_epochs)], axis=1)
    # (safetensors files list tensors by alignment then name; here "layer0.w" < "layer1.w"
    # and every dtype of the case may differ, so reorder the reference to the file's order)
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    stored = [t for t in meta.tensors if t.stored]
    starts = np.cumsum([0] + [int(np.prod(s)) for s in case.shapes])
    pos = {name: i for i, name in enumerate(case.names)}
    want = np.concatenate(
        [want[starts[pos[t.name]] : starts[pos[t.name] + 1]] for t in stored]
    ).reshape(case.n_rows, n_epochs)
    got = read_trajectory(store)
    assert_same_bits(got, want)

    # the index: every tensor, shape and dtype; offsets follow the rows
    by_name = {t.name: t for t in meta.tensors}
    for name, shape, dtype in zip(case.names, case.shapes, case.dtypes, strict=True):
        t = by_name[name]
        assert (t.shape, t.dtype, t.kind) == (shape, dtype, "parameter")
    offset = 0
    for t in stored:
        assert t.offset == offset
        offset += t.size
    if case.steps is not None:
        assert not by_name["steps"].stored and by_name["steps"].kind == "buffer"

    # non-finite counts: per epoch in the result, per epoch and tensor in the metadata
    bad = ~np.isfinite(want)
    event("has NaN/Inf" if bad.any() else "all finite")
    per_epoch = {e: int(bad[:, e].sum()) for e in range(n_epochs) if bad[:, e].any()}
    assert result.nonfinite == per_epoch
    assert [e.nonfinite for e in meta.epochs] == [int(bad[:, e].sum()) for e in range(n_epochs)]
    for e, entry in enumerate(meta.epochs):
        by_tensor = {t.name: int(bad[t.offset : t.offset + t.size, e].sum()) for t in stored}
        assert dict(entry.nonfinite_by_tensor) == {k: v for k, v in by_tensor.items() if v}
    assert pipeline.info(store)["nonfinite"] == int(bad.sum())

    # export of one epoch gives back every tensor's bits (float64: rounded through float32)
    epoch = data.draw(st.integers(0, n_epochs - 1), label="export epoch")
    suffix = data.draw(st.sampled_from([".safetensors", ".pt"]), label="suffix")
    out = load_export(pipeline.export(store, epoch, tmp / f"e{suffix}"))
    for i, name in enumerate(case.names):
        t = out[name]
        assert t.dtype == TORCH[case.dtypes[i]] and tuple(t.shape) == case.shapes[i]
        got_bits = t.contiguous().view(_VIEW[case.dtypes[i]]).numpy().view(_UINT[case.dtypes[i]])
        assert np.array_equal(got_bits, _expected_export_bits(case, epoch, i)), name
    if case.steps is not None:
        assert torch.equal(out["steps"], torch.from_numpy(np.asarray(case.steps + epoch)))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases(), chunk_rows=st.integers(1, 6))
def test_nonfinite_error_policy(
    tmp_path_factory: pytest.TempPathFactory, case: Case, chunk_rows: int
) -> None:
    """With nonfinite="error" a checkpoint holding NaN/Inf is refused, naming the file, the
    epoch and a tensor that holds one; the new store is left without a trajectory."""
    if case.n_rows == 0:
        return
    tmp = tmp_path_factory.mktemp("nonfinite")
    _write(case, tmp / "ckpts", "safetensors")
    store = tmp / "s.zarr"
    columns = [_reference_column(case, e) for e in range(len(case.values))]
    if all(np.isfinite(c).all() for c in columns):
        result = pipeline.ingest(
            [tmp / "ckpts"], store, nonfinite="error", chunk_rows=chunk_rows, runtime=SYNC
        )
        assert result.nonfinite == {} and result.n_epochs == len(columns)
        return
    with pytest.raises(
        pipeline.InputError, match=r"NaN/Inf value\(s\) \(policy nonfinite=error\)"
    ) as err:
        pipeline.ingest(
            [tmp / "ckpts"], store, nonfinite="error", chunk_rows=chunk_rows, runtime=SYNC
        )
    e, key = err.value.epoch, err.value.key
    assert e is not None and key is not None
    assert err.value.path == str(tmp / "ckpts" / f"epoch_{e}.safetensors")
    i = case.names.index(key)
    assert not np.isfinite(_reference_column_of(case, e, i)).all()
    assert not (store / "trajectory").exists()
    with pytest.raises(pipeline.StoreError):
        pipeline.open_store(str(store))


def _reference_column_of(case: Case, epoch: int, i: int) -> np.ndarray:
    one = Case(
        case.names[i : i + 1],
        case.shapes[i : i + 1],
        case.dtypes[i : i + 1],
        (case.values[epoch][i : i + 1],),
        None,
    )
    return _reference_column(one, 0)


@given(
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=6),
    chunk=st.integers(1, 9),
)
def test_row_layout_segments_tile_the_rows(sizes: list[int], chunk: int) -> None:
    """The pieces of every row block cover each tensor exactly once, in order."""
    offsets = list(np.cumsum([0, *sizes[:-1]]))
    layout = RowLayout.from_entries(
        [(f"t{i}", int(o), s) for i, (o, s) in enumerate(zip(offsets, sizes, strict=True))]
    )
    n = sum(sizes)
    assert layout.n_rows == n
    seen: dict[str, list[tuple[int, int]]] = {}
    rows = []
    for r0, r1 in blocks(n, chunk):
        pos = 0
        for seg in layout.segments(r0, r1):
            assert seg.out == pos and seg.stop > seg.start
            pos += seg.stop - seg.start
            seen.setdefault(seg.name, []).append((seg.start, seg.stop))
            rows.extend((seg.name, k) for k in range(seg.start, seg.stop))
        assert pos == r1 - r0
    want = [(f"t{i}", k) for i, s in enumerate(sizes) for k in range(s)]
    assert rows == want
    for name, pieces in seen.items():
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces)), name
    for r in range(n):
        assert layout.tensor_of_row(r) == want[r][0]

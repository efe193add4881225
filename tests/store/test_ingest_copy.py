"""Chunks copied from the checkpoint files by the kernel: the same store, bit for bit, as
chunks read and written, and the same checks (NaN/Inf, digests, changed inputs)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import NET_ROWS, SYNC, net_state_dicts, read_trajectory, snapshot, write_run

import pipeline
import pipeline.graph.ingest as gingest
from pipeline.errors import InputError
from pipeline.store import keys
from pipeline.store.trajectory import ChunkGrid


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many chunks each ingest copied from the files."""
    seen: list[int] = []
    real = gingest._copy_column

    def spy(*args: Any) -> Any:
        seen.append(1)
        return real(*args)

    monkeypatch.setattr(gingest, "_copy_column", spy)
    return seen


def _without_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ChunkGrid, "can_copy", lambda self: False)


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [("safetensors", "float32"), ("pt", "float32"), ("sharded", "float32"),
     ("safetensors", "bfloat16"), ("pt", "float16")],
)  # fmt: skip
def test_copied_store_is_the_written_store_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copies: list[int], fmt: str, dtype: str
) -> None:
    """16-bit runs make 16-bit stores (the bytes copied as they are; checked and digested as
    their float32 values, as the read path does)."""
    sds = net_state_dicts(3, dtype=dtype)
    sds[1]["fc.weight"][0, 0] = float("nan")  # counted alike
    paths = write_run(tmp_path / "run", sds, fmt)
    copied, written = tmp_path / "copied.zarr", tmp_path / "written.zarr"
    # chunk_rows 7: pieces start and end inside tensors, tensors span chunks, an edge chunk
    pipeline.ingest(paths, copied, runtime=SYNC, chunk_rows=7)
    n_chunks = -(-NET_ROWS // 7) * 3
    assert len(copies) == n_chunks
    with monkeypatch.context() as m:
        _without_copy(m)
        pipeline.ingest(paths, written, runtime=SYNC, chunk_rows=7)
    assert len(copies) == n_chunks  # the second ingest copied nothing
    a, b = snapshot(copied), snapshot(written)
    chunks = {k for k in a if k.startswith("trajectory/c/")}
    assert len(chunks) == n_chunks and {k: a[k] for k in chunks} == {k: b[k] for k in chunks}
    meta_a = pipeline.open_store(str(copied)).meta
    meta_b = pipeline.open_store(str(written)).meta
    assert meta_a.store_dtype == meta_b.store_dtype == dtype
    assert meta_a.epochs == meta_b.epochs  # files' digests, piece digests, NaN counts
    assert meta_a.epochs[1].nonfinite == 1
    traj = read_trajectory(copied)
    assert np.isnan(traj).sum() == 1


def test_nonfinite_error_policy_on_copied_chunks(tmp_path: Path, copies: list[int]) -> None:
    sds = net_state_dicts(2)
    sds[1]["conv.weight"].view(-1)[3] = float("inf")
    paths = write_run(tmp_path / "run", sds, "safetensors")
    store = tmp_path / "s.zarr"
    with pytest.raises(InputError, match=r"1 NaN/Inf value\(s\)") as e:
        pipeline.ingest(paths, store, runtime=SYNC, nonfinite="error")
    assert e.value.epoch == 1 and e.value.key == "conv.weight" and copies


def test_input_changed_during_the_copy_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_run(tmp_path / "run", net_state_dicts(2), "safetensors")
    real = ChunkGrid.copy_chunk

    def touch_then_copy(self: ChunkGrid, r0: int, col0: int, pieces: Any) -> None:
        real(self, r0, col0, pieces)
        p = pieces[0][0]
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten meanwhile

    monkeypatch.setattr(ChunkGrid, "copy_chunk", touch_then_copy)
    with pytest.raises(InputError, match="changed while it was ingested"):
        pipeline.ingest(paths, tmp_path / "s.zarr", runtime=SYNC)


def test_other_stores_and_dtypes_are_read_and_written(tmp_path: Path, copies: list[int]) -> None:
    paths = write_run(tmp_path / "run", net_state_dicts(2, dtype="bfloat16"), "safetensors")
    # bf16 tensors into a float32 store: converted, so read and written
    pipeline.ingest(paths, tmp_path / "f32.zarr", runtime=SYNC, store_dtype="float32")
    pipeline.ingest(paths, tmp_path / "tc2.zarr", runtime=SYNC, time_chunk=2)
    paths32 = write_run(tmp_path / "run32", net_state_dicts(2), "safetensors")
    pipeline.ingest(paths32, tmp_path / "lz4.zarr", runtime=SYNC, codec="lz4")
    assert copies == []


def test_copy_without_the_kernel_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4)

    def no_kernel_copy(*args: Any) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
    out = tmp_path / "d" / "0"
    keys.copy_file(out, [(str(src), 10, 20), (str(src), 1000, 1024)], b"tail")
    data = src.read_bytes()
    assert out.read_bytes() == data[10:20] + data[1000:1024] + b"tail"
    with pytest.raises(OSError, match="ended at byte 1024"):
        keys.copy_file(tmp_path / "d" / "1", [(str(src), 1000, 1030)])
    assert sorted(p.name for p in out.parent.iterdir()) == ["0"]  # no partial file left


def test_truncated_input_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the file shrinks after its header was parsed: refused, by name, nothing committed
    paths = write_run(tmp_path / "run", net_state_dicts(2), "safetensors")
    real = gingest._copyable

    def shrink(*args: Any) -> Any:
        got = real(*args)
        if got:
            with open(got[0][0], "r+b") as f:
                f.truncate(got[-1][2] - 4)
        return got

    monkeypatch.setattr(gingest, "_copyable", shrink)
    with pytest.raises(InputError, match="truncated"):
        pipeline.ingest(paths, tmp_path / "s.zarr", runtime=SYNC)

"""The direct chunk writer must produce exactly the bytes zarr itself writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.store.trajectory import ChunkGrid, open_array


@pytest.mark.parametrize(
    ("shape", "chunks"), [((10, 5), (4, 2)), ((7, 3), (7, 1)), ((1, 1), (1, 1)), ((9, 4), (2, 4))]
)
def test_raw_chunk_write_matches_zarr_bytes(
    tmp_path: Path, shape: tuple[int, int], chunks: tuple[int, int]
) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    x[0, 0] = np.nan
    stores = [tmp_path / "zarr.zarr", tmp_path / "raw.zarr"]
    for p in stores:
        g = zarr.open_group(p, mode="a", use_consolidated=False)
        g.create_array(
            "trajectory",
            shape=shape,
            chunks=chunks,
            dtype="float32",
            fill_value=np.float32("nan"),
            config={"write_empty_chunks": True},
            compressors=None,
        )
    via_zarr = open_array(str(stores[0]), writable=True)
    grid = ChunkGrid(str(stores[1]), shape[0], chunks[0], chunks[1], "none")
    for r0 in range(0, shape[0], chunks[0]):
        for c0 in range(0, shape[1], chunks[1]):
            blk = np.ascontiguousarray(x[r0 : r0 + chunks[0], c0 : c0 + chunks[1]])
            via_zarr[r0 : r0 + blk.shape[0], c0 : c0 + blk.shape[1]] = blk
            grid.write(r0, c0, blk)
    files = [sorted(q.relative_to(p) for q in p.rglob("*") if q.is_file()) for p in stores]
    assert files[0] == files[1]
    for rel in files[0]:
        assert (stores[0] / rel).read_bytes() == (stores[1] / rel).read_bytes(), rel
    back = zarr.open_array(stores[1], path="trajectory")[:]
    assert np.array_equal(back.view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("codec", ["none", "lz4"])
def test_all_nan_chunk_is_written(tmp_path: Path, codec: str) -> None:
    """A chunk's existence marks it finished, so even an all-fill (NaN) chunk must be written."""
    from pipeline.store.schema import IngestSettings
    from pipeline.store.trajectory import TrajectoryStore

    st = TrajectoryStore.open_or_create(tmp_path / "s.zarr")
    st.create_trajectory(6, 2, IngestSettings(chunk_rows=3, codec=codec))
    grid = ChunkGrid(st.url, 6, 3, 1, codec)
    grid.write(0, 1, np.full((3, 1), np.nan, dtype=np.float32))
    assert st.existing_chunks() == {(0, 1)}


def test_scattered_read_uses_many_threads_when_the_first_column_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the first column's values took disk time, every other value's page is asked for at
    once (posix_fadvise WILLNEED, where there is one) and the other columns are read by a pool
    of threads, each value once; a fast first column asks for nothing and reads everything on
    the calling thread. The values are the same either way."""
    import os
    import threading

    from pipeline.store import trajectory

    shape, chunks = (50, 4), (20, 1)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    url = tmp_path / "s.zarr"
    g = zarr.open_group(url, mode="a", use_consolidated=False)
    g.create_array("trajectory", shape=shape, chunks=chunks, dtype="float32",
                   fill_value=np.float32("nan"), compressors=None)  # fmt: skip
    grid = ChunkGrid(str(url), shape[0], chunks[0], chunks[1], "none")
    for r0 in range(0, shape[0], chunks[0]):
        for c0 in range(shape[1]):
            grid.write(r0, c0, np.ascontiguousarray(x[r0 : r0 + chunks[0], c0 : c0 + 1]))
    rows, cols = np.array([41, 3, 22, 7, 19]), np.array([3, 0, 1])
    reads: list[tuple[str, int, bool]] = []  # (file, offset, on the calling thread)
    real = os.pread
    me = threading.get_ident()

    def spy(fd: int, n: int, offset: int) -> bytes:
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd)
        reads.append((path, offset, threading.get_ident() == me))
        return real(fd, n, offset)

    def values(col: int) -> list[tuple[str, int]]:
        root = tmp_path / "s.zarr" / "trajectory" / "c"
        return sorted((str(root / str(r // 20) / str(col)), (r % 20) * 4) for r in rows)

    asked: list[tuple[int, int]] = []
    if hasattr(os, "posix_fadvise"):
        real_advise = os.posix_fadvise

        def advise(fd: int, offset: int, n: int, advice: int) -> None:
            asked.append((offset, n))
            real_advise(fd, offset, n, advice)

        monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(os, "pread", spy)
    monkeypatch.setattr(trajectory, "_DISK_READ_S", 1e9)  # no first column counts as slow
    fast, _ = grid.read_scattered(rows, cols)
    assert len(reads) == rows.size * cols.size and all(mine for _p, _o, mine in reads)
    assert asked == []
    reads.clear()
    monkeypatch.setattr(trajectory, "_DISK_READ_S", -1.0)  # every first column counts as slow
    slow, nbytes = grid.read_scattered(rows, cols)
    first = [(p, o) for p, o, mine in reads if mine]
    others = [(p, o) for p, o, mine in reads if not mine]
    assert sorted(first) == values(3)  # the first column, on the calling thread
    if os.path.exists("/proc/self/fd"):  # every other value once, on the pool's threads
        assert sorted(others) == sorted(values(0) + values(1))
    assert len(others) == rows.size * (cols.size - 1)
    if hasattr(os, "posix_fadvise"):
        assert sorted(asked) == sorted(((r % 20) * 4, 4) for r in rows for _c in cols[1:])
    assert fast.tobytes() == slow.tobytes() == x[np.ix_(rows, cols)].tobytes()
    assert nbytes == rows.size * cols.size * 4

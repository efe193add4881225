"""Blocks of rows mapped from the chunk files (no copy) hold exactly the bytes a read gives,
and a fit over mapped blocks writes the same study, bit for bit, as one over read blocks."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import StoreError
from pipeline.store import mapped
from pipeline.store.dtypes import numpy_dtype
from pipeline.store.trajectory import ChunkGrid

pytestmark = pytest.mark.skipif(not mapped.available(), reason="mapping needs Linux")

PAGE = mapped.PAGE


def _grid(tmp_path: Path, n: int, t: int, rows: int, dtype: str = "float32", tc: int = 1):
    """A raw trajectory array (n, t), chunks (rows, tc), random values with a NaN, and its
    values as float32."""
    url = tmp_path / f"{dtype}-{tc}.zarr"
    g = zarr.open_group(url, mode="a", use_consolidated=False, zarr_format=3)
    g.create_array(
        "trajectory", shape=(n, t), chunks=(rows, tc), dtype=numpy_dtype(dtype),
        fill_value=np.nan, config={"write_empty_chunks": True}, compressors=None,
    )  # fmt: skip
    grid = ChunkGrid(str(url), n, rows, tc, "none", dtype)
    x = np.random.default_rng(3).standard_normal((n, t)).astype(numpy_dtype(dtype))
    x[5, 1] = np.nan
    for r0 in range(0, n, rows):
        for c0 in range(0, t, tc):
            grid.write(r0, c0, np.ascontiguousarray(x[r0 : r0 + rows, c0 : c0 + tc]))
    return grid, x


def _maps(path: str) -> int:
    return Path("/proc/self/maps").read_text().count(path)


def test_map_ranges_pieces_end_to_end(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    data = np.arange(4 * PAGE // 4, dtype=np.float32)
    data.tofile(f)
    per = PAGE // 4  # float32 values per page
    a = mapped.map_ranges(
        [[(str(f), 2 * PAGE, PAGE), (str(f), 0, PAGE)], [(str(f), PAGE, 2 * PAGE)]], 2 * per, np.float32
    )
    assert a.shape == (2, 2 * per) and a.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(a[0], np.concatenate([data[2 * per : 3 * per], data[:per]]))
    np.testing.assert_array_equal(a[1], data[per : 3 * per])
    a[1, 0] = -1.0  # private: the file keeps its bytes
    np.testing.assert_array_equal(np.fromfile(f, dtype=np.float32), data)
    view = a[0, 3:7]
    del a
    gc.collect()
    assert _maps(str(f)) > 0  # a view keeps the mapping alive ...
    np.testing.assert_array_equal(view, np.concatenate([data[2 * per : 3 * per]])[3:7])
    del view
    gc.collect()
    assert _maps(str(f)) == 0  # ... and the last one gone unmaps it


@pytest.mark.skipif(not mapped._ADVISE, reason="no posix_fadvise")
def test_map_ranges_asks_for_the_pages_of_ranges_not_in_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range whose first page is not in the page cache has all its pages asked for when it
    is mapped (posix_fadvise WILLNEED over the range); one in the cache is not. Every 8th
    range is probed until one is found out of the cache, then every range; the values are the
    file's either way."""
    import os

    f = tmp_path / "f.bin"
    data = np.arange(20 * PAGE // 4, dtype=np.float32)
    data.tofile(f)
    per = PAGE // 4
    m = mapped.map_ranges([[(str(f), 0, PAGE)]], per, np.float32)
    assert mapped._resident(mapped._lib(), m.ctypes.data)  # a page just written is in the cache
    del m
    cold = {2 * PAGE, 16 * PAGE, 18 * PAGE}  # first pages that count as not in the cache
    first: dict[int, int] = {}  # mapped address -> the file offset mapped there
    real = mapped._lib()

    class Lib:  # libc, recording where each range is mapped
        def __getattr__(self, name: str):
            return getattr(real, name)

        def mmap(self, addr, size, prot, flags, fd, offset):  # type: ignore[no-untyped-def]
            got = real.mmap(addr, size, prot, flags, fd, offset)
            first[got] = offset
            return got

    asked: list[tuple[int, int]] = []
    real_advise = os.posix_fadvise

    def advise(fd: int, offset: int, n: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        asked.append((offset, n))
        real_advise(fd, offset, n, advice)

    monkeypatch.setattr(mapped, "_lib", lambda: Lib())
    monkeypatch.setattr(mapped, "_resident", lambda lib, addr: first[addr] not in cold)
    monkeypatch.setattr(os, "posix_fadvise", advise)
    a = mapped.map_ranges([[(str(f), 2 * k * PAGE, 2 * PAGE)] for k in range(10)], 2 * per, np.float32)
    # ranges 0 and 8 probed (range 1 is not: a missed cold range is only slower); 8 is out
    # of the cache, so 9 is probed as well
    assert asked == [(16 * PAGE, 2 * PAGE), (18 * PAGE, 2 * PAGE)]
    np.testing.assert_array_equal(a.ravel(), data)
    monkeypatch.setattr(mapped, "_ADVISE", False)  # turned off: nothing asked for
    asked.clear()
    b = mapped.map_ranges([[(str(f), 2 * PAGE, 2 * PAGE)]], 2 * per, np.float32)
    assert asked == [] and np.array_equal(b[0], data[2 * per : 4 * per])


def test_map_ranges_refuses_short_missing_and_unaligned(tmp_path: Path) -> None:
    f = tmp_path / "short.bin"
    f.write_bytes(b"\0" * (PAGE + 8))
    with pytest.raises(StoreError, match="truncated"):
        mapped.map_ranges([[(str(f), 0, 2 * PAGE)]], 2 * PAGE // 4, np.float32)
    with pytest.raises(StoreError, match="missing"):
        mapped.map_ranges([[(str(tmp_path / "nope"), 0, PAGE)]], PAGE // 4, np.float32)
    with pytest.raises(ValueError, match="page-aligned"):
        mapped.map_ranges([[(str(f), 8, PAGE)]], PAGE // 4, np.float32)
    with pytest.raises(ValueError, match="multiple"):
        mapped.map_ranges([[(str(f), 0, 8)]], 2, np.float32)
    gc.collect()
    assert _maps(str(f)) == 0  # nothing left mapped by the failures


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_map_rows_equals_read_rows(tmp_path: Path, dtype: str) -> None:
    per = PAGE // numpy_dtype(dtype).itemsize
    n, rows = 3 * 4 * per + 100, 4 * per  # three full chunks and an edge chunk
    grid, x = _grid(tmp_path, n, 6, rows, dtype)
    cols = np.array([4, 0, 2, 2])
    for r0, r1 in [(0, rows), (rows, rows + per), (2 * rows + 2 * per, 3 * rows)]:
        got = grid.map_rows(r0, r1, cols)
        assert got is not None and got.dtype == grid.np_dtype
        want = np.empty((len(cols), r1 - r0), dtype=grid.np_dtype)
        read = grid.read_rows(r0, r1, cols, want)
        assert got.tobytes() == want.tobytes() == np.ascontiguousarray(x[r0:r1, cols].T).tobytes()
        blk, nbytes = grid.rows_block(r0, r1, cols, "test")
        # each column's bytes counted once (column 2 is asked for twice)
        assert blk.tobytes() == want.tobytes() and nbytes == read == 3 * want.nbytes // 4
    # not mappable: across chunks, off page boundaries, the edge chunk's short block
    for r0, r1 in [(rows - per, rows + per), (1, per + 1), (3 * rows, n), (0, 0)]:
        assert grid.map_rows(r0, r1, cols) is None
    # rows_block reads those, and reads (converting) when another dtype is asked for
    r0, r1 = 3 * rows, n
    blk, nbytes = grid.rows_block(r0, r1, cols, "test")
    assert blk.tobytes() == np.ascontiguousarray(x[r0:r1, cols].T).tobytes()
    assert nbytes == 3 * blk.nbytes // 4
    f32, _ = grid.rows_block(0, rows, cols, "test32", np.float32)
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(f32, x[:rows, cols].T.astype(np.float32))


def test_map_rows_declines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    per = PAGE // 4
    grid2, _ = _grid(tmp_path, 2 * per, 4, per, tc=2)  # two epochs per chunk
    assert grid2.map_rows(0, per, np.arange(4)) is None
    grid, x = _grid(tmp_path, 2 * per, 4, per)
    lz4 = ChunkGrid(grid.url, grid.n_rows, grid.chunk_rows, 1, "lz4")
    assert lz4.map_rows(0, per, np.arange(4)) is None
    monkeypatch.setenv("CMD_PIPELINE_NO_MMAP", "0")  # "0" leaves mapping on
    assert grid.map_rows(0, per, np.arange(4)) is not None
    monkeypatch.setenv("CMD_PIPELINE_NO_MMAP", "1")
    assert grid.map_rows(0, per, np.arange(4)) is None
    blk, _ = grid.rows_block(0, per, np.arange(4), "test")
    assert blk.tobytes() == np.ascontiguousarray(x[:per].T).tobytes()


def test_map_rows_missing_chunk_is_a_store_error(tmp_path: Path) -> None:
    per = PAGE // 4
    grid, _ = _grid(tmp_path, 2 * per, 3, per)
    Path(grid.local_root, "1", "2").unlink()
    with pytest.raises(StoreError, match="missing"):
        grid.map_rows(per, 2 * per, np.arange(3))


def test_fit_over_mapped_blocks_writes_the_same_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three aligned chunks and an edge chunk: blocks of 1024 rows are mapped, the edge
    chunk's short block is read; the study's files equal those of a fit that reads all."""
    import pipeline
    from pipeline.bench import common
    from pipeline.runtime import RuntimeOptions
    from pipeline.store import trajectory

    monkeypatch.setattr(common, "default_chunk_rows", lambda n, tc, itemsize=4: 4096)
    url = tmp_path / "s.zarr"
    common.synthetic_store(str(url), 3 * 4096 + 700, 8, 3)
    grid = trajectory.TrajectoryStore.open(url).chunk_grid()
    calls: list[bool] = []
    real = trajectory.ChunkGrid.map_rows

    def spy(self: ChunkGrid, r0: int, r1: int, cols: np.ndarray) -> np.ndarray | None:
        got = real(self, r0, r1, cols)
        calls.append(got is not None)
        return got

    monkeypatch.setattr(trajectory.ChunkGrid, "map_rows", spy)
    rt = RuntimeOptions(mode="threads", workers=2, progress=False)
    files = {}
    for name, env in (("mapped", None), ("read", "1")):
        if env:
            monkeypatch.setenv("CMD_PIPELINE_NO_MMAP", env)
        calls.clear()
        pipeline.fit(str(url), name, modes=3, samples=300, block_rows=1024, runtime=rt, seed=1)
        if env is None:
            assert grid.chunk_rows == 4096 and calls.count(True) >= 12 and not all(calls)
        else:
            assert not any(calls)
        root = url / "analyses" / name
        files[name] = {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "zarr.json"
        }
    assert files["mapped"] and files["mapped"] == files["read"]

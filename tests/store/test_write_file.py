"""Whole values written to local stores in pieces: the same bytes, atomically, nothing left
behind on failure."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline import buffers
from pipeline.store import keys


def test_value_written_in_pieces_is_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(buffers, "WRITE_PIECE", 1000)  # 3 full pieces and a short one
    sizes: list[int] = []
    real_write = os.write

    def spy(fd: int, data: memoryview) -> int:
        sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)  # 4000 bytes
    path = tmp_path / "a" / "b" / "0"
    keys.write_file(path, x.reshape(100, 10))  # a 2-D array: its C-order bytes
    assert path.read_bytes() == x.tobytes()
    assert sizes == [1000] * 4
    assert [p.name for p in path.parent.iterdir()] == ["0"]  # the partial file was renamed


def test_short_writes_are_continued(tmp_path: Path) -> None:
    import io

    class Trickle(io.RawIOBase):
        def __init__(self) -> None:
            self.got = b""

        def writable(self) -> bool:
            return True

        def write(self, b: memoryview) -> int:  # type: ignore[override]
            self.got += bytes(b[:7])
            return min(7, len(b))

    t = Trickle()
    data = bytes(range(256)) * 3
    assert buffers.write_all(t.write, data) == len(data) and t.got == data


def test_failed_write_leaves_no_partial_and_keeps_the_old_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c" / "0"
    keys.write_file(path, b"old value")
    calls = 0
    real_write = os.write

    def failing(fd: int, data: memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(buffers, "WRITE_PIECE", 4)
    monkeypatch.setattr(os, "write", failing)
    with pytest.raises(OSError, match="No space left"):
        keys.write_file(path, b"a new, longer value")
    assert path.read_bytes() == b"old value"
    assert sorted(p.name for p in path.parent.iterdir()) == ["0"]


def _local_store(root: Path) -> object:
    from zarr.storage import LocalStore

    return LocalStore(str(root))


def test_copied_values_are_links_that_later_writes_do_not_share(tmp_path: Path) -> None:
    store = _local_store(tmp_path)
    keys.write_file(tmp_path / "a" / "c" / "0", b"zero")
    keys.write_file(tmp_path / "a" / "c" / "3", b"old three")
    keys.copy_values(store, [("a/c/0", "a/c/1"), ("a/c/0", "a/c/3"), ("a/c/0", "a/d/9")])
    src = tmp_path / "a" / "c" / "0"
    for dst in ("a/c/1", "a/c/3", "a/d/9"):  # a new folder too; an existing value replaced
        path = tmp_path.joinpath(*dst.split("/"))
        assert path.read_bytes() == b"zero" and path.stat().st_ino == src.stat().st_ino
    keys.write_file(src, b"new zero")  # a write replaces its own name only
    assert (tmp_path / "a" / "c" / "1").read_bytes() == b"zero"
    assert not list(tmp_path.rglob("*.partial"))


def test_copied_values_without_hard_links_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    keys.write_file(tmp_path / "c" / "0", b"zero")
    keys.copy_values(_local_store(tmp_path), [("c/0", "c/1")])
    one = tmp_path / "c" / "1"
    assert one.read_bytes() == b"zero" and one.stat().st_ino != (tmp_path / "c" / "0").stat().st_ino
    with pytest.raises(FileNotFoundError):
        keys.copy_values(_local_store(tmp_path), [("c/7", "c/8")])
    assert not (tmp_path / "c" / "8").exists() and not list(tmp_path.rglob("*.partial"))


def test_copied_values_on_a_remote_store() -> None:
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store = zarr.storage.FsspecStore.from_url("memory://copy-values-test")
    proto = default_buffer_prototype()
    sync(store.set("x/0", proto.buffer.from_bytes(b"zero")))
    keys.copy_values(store, [("x/0", "x/1"), ("x/0", "y/2")])
    for k in ("x/1", "y/2"):
        assert keys.get(store, k).to_bytes() == b"zero"
    with pytest.raises(FileNotFoundError):
        keys.copy_values(store, [("x/5", "x/6")])

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

"""Ingest reads each input byte once: the copy tasks digest what they read (and check zip
CRCs), the bytes they do not copy are read apart, and the file digests put together equal a
sequential pass; resume, refusal of changed inputs and rollback on bad input still hold."""

from __future__ import annotations

import hashlib
import os
import random
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import SYNC, THREADS, snapshot
from safetensors.torch import save_file

import pipeline
import pipeline.graph.ingest as gingest
from pipeline.checkpoints import files as cfiles
from pipeline.checkpoints.readers import digest_file
from pipeline.cli import main
from pipeline.kernels.crc import crc32_combine, crc32_concat
from pipeline.kernels.digests import BLOCK_BYTES, CONTENT_PREFIX
from pipeline.store.schema import SourceFile
from pipeline.store.trajectory import TrajectoryStore

ROWS = 131_072  # 512 KiB pieces of float32


def _sd(e: int, dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(e)
    sd = {}
    if "float32" in dtypes:
        sd["w"] = torch.randn(512, 1024, generator=g)  # 2 MiB
    if "bfloat16" in dtypes:
        h = torch.randn(400, 1000, generator=g).bfloat16()
        # NaN payloads, signalling ones too, must come back bit for bit from the store
        h.view(torch.int16).view(-1)[:4] = torch.tensor([0x7FC1, -127, 0x7F81, 0x7F80], dtype=torch.int16)
        sd["h"] = h
    if "float16" in dtypes:
        b = torch.randn(3000, generator=g).half()
        b.view(torch.int16)[:3] = torch.tensor([0x7C01, 0x7E05, -1023], dtype=torch.int16)
        sd["b"] = b
    sd["steps"] = torch.arange(10) + e  # an integer buffer: kept inline, digested apart
    return sd


def _write(root: Path, n: int, fmt: str = "safetensors", **kw: tuple[str, ...]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for e in range(n):
        p = root / f"epoch_{e}.{'pt' if fmt == 'pt' else 'safetensors'}"
        if fmt == "pt":
            torch.save(_sd(e, **kw), p)
        else:
            save_file(_sd(e, **kw), str(p))
        out.append(p)
    return out


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Bytes read from each local file by the readers (the in-process runtimes run the tasks
    here), and those of the chunks copied from the files; a sequential digest pass counts
    too."""
    seen: Counter[str] = Counter()
    real_into, real_read = cfiles.LocalSource.readinto, cfiles.LocalSource.read

    def readinto(self: cfiles.LocalSource, view: memoryview, offset: int) -> None:
        seen[Path(self.path).name] += len(view)
        real_into(self, view, offset)

    def read(self: cfiles.LocalSource, offset: int, n: int) -> bytes:
        got = real_read(self, offset, n)
        seen[Path(self.path).name] += len(got)
        return got

    monkeypatch.setattr(cfiles.LocalSource, "readinto", readinto)
    monkeypatch.setattr(cfiles.LocalSource, "read", read)
    real_digest = gingest.digest_file

    def digest(path: str, *args: object) -> tuple[int, str]:
        seen[Path(path).name] += os.path.getsize(path)
        return real_digest(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(gingest, "digest_file", digest)
    real_copy = gingest._copy_column

    def copy_column(*args: Any) -> Any:
        # chunks copied from the files: their bytes are read (checked, digested) in place
        for path, a, b in args[4]:
            seen[Path(path).name] += b - a
        return real_copy(*args)

    monkeypatch.setattr(gingest, "_copy_column", copy_column)
    return seen


def _digests(store: Path) -> list[list[str]]:
    return [[f.sha256 for f in e.files] for e in TrajectoryStore.open(store).require_meta().epochs]


def test_each_input_byte_is_read_once(tmp_path: Path, reads: Counter[str]) -> None:
    paths = _write(tmp_path / "run", 3)
    size = sum(p.stat().st_size for p in paths)
    store = tmp_path / "s.zarr"
    pipeline.ingest([tmp_path / "run"], store, runtime=SYNC, chunk_rows=ROWS)
    # every byte once, but for the 64 KiB blocks at the edges of the tasks' ranges (read
    # again apart: 8 chunks per epoch) and the header (parsed, then digested)
    edges = len(paths) * (8 + 2) * BLOCK_BYTES
    assert size <= sum(reads.values()) <= size + edges, (sum(reads.values()), size)
    for p in paths:
        assert reads[p.name] <= p.stat().st_size + 10 * BLOCK_BYTES
    # the digests put together are a sequential pass's
    got = _digests(store)
    assert got == [[digest_file(str(p))[1]] for p in paths]
    assert all(d.startswith(CONTENT_PREFIX) for (d,) in got)
    # a re-run reads nothing but headers
    reads.clear()
    again = pipeline.ingest([tmp_path / "run"], store, runtime=SYNC)
    assert again.added == [] and sum(reads.values()) < size / 100


def _calls_per_epoch(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> Counter[int | None]:
    """Calls of ``owner.name(spec)``, counted by the spec's epoch (the call still runs)."""
    calls: Counter[int | None] = Counter()
    real = getattr(owner, name)

    def counting(spec: Any) -> Any:
        calls[spec.epoch] += 1
        return real(spec)

    monkeypatch.setattr(owner, name, counting)
    return calls


@pytest.mark.parametrize("runtime", [SYNC, THREADS], ids=["sync", "threads"])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_each_checkpoint_is_opened_once_not_once_per_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: pipeline.RuntimeOptions, fmt: str
) -> None:
    # more epochs than a process's reader cache holds, 8 row blocks per epoch: the chunk
    # tasks of an epoch must run one after another, each checkpoint's header parsed once by
    # its inspect task and at most twice more by its chunk tasks (two threads may both miss
    # the cache at an epoch's first chunks); in row-block order it was parsed 8 + 1 times
    from pipeline.checkpoints import readers

    n = (readers._cached_reader.cache_info().maxsize or 0) + 4
    paths = _write(tmp_path / "run", n, fmt)
    opened = _calls_per_epoch(monkeypatch, readers, "open_checkpoint")
    readers._cached_reader.cache_clear()
    store = tmp_path / "s.zarr"
    try:
        # one chunk per task: the order of the chunk tasks is what is checked
        pipeline.ingest(paths, store, runtime=runtime, chunk_rows=ROWS, chunks_per_task=1)
    finally:
        readers._cached_reader.cache_clear()  # no reader opened through the patch outlives it
    assert -(-TrajectoryStore.open(store).require_meta().n_rows // ROWS) == 8
    assert set(opened) == set(range(n))
    assert max(opened.values()) <= 3, opened


@pytest.mark.parametrize("runtime", [SYNC, THREADS], ids=["sync", "threads"])
def test_tasks_of_several_chunks_write_the_same_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: pipeline.RuntimeOptions
) -> None:
    # 8 row blocks per epoch (the last one short), 3 epochs: tasks of 1, 3 (3 + 3 + 2) and
    # all 8 chunks of an epoch write the same bytes; an append resumes into the same store
    paths = _write(tmp_path / "run", 3, "safetensors")
    sizes: list[int] = []
    real = gingest.run_chunks

    def recording(calls: Any) -> Any:
        sizes.append(len(calls.args))
        return real(calls)

    monkeypatch.setattr(gingest, "run_chunks", recording)
    stores = {}
    for per in (1, 3, 8):
        sizes.clear()
        store = tmp_path / f"s{per}.zarr"
        pipeline.ingest(paths[:2], store, runtime=runtime, chunk_rows=ROWS, chunks_per_task=per)
        first = sorted(sizes)
        sizes.clear()
        res = pipeline.ingest(paths, store, runtime=runtime, chunk_rows=ROWS, chunks_per_task=per)
        assert res.added == [2] and res.chunks_written == 8
        want = {1: [1] * 8, 3: [2, 3, 3], 8: [8]}[per]
        assert first == sorted(want * 2) and sorted(sizes) == want
        stores[per] = snapshot(store)
    assert -(-TrajectoryStore.open(tmp_path / "s1.zarr").require_meta().n_rows // ROWS) == 8
    assert stores[1] == stores[3] == stores[8]
    with pytest.raises(pipeline.InputError, match="chunks_per_task must be at least 1"):
        pipeline.ingest(paths, tmp_path / "s0.zarr", runtime=runtime, chunks_per_task=0)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_copied_chunk_opens_no_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    # the chunk tasks take the pieces' byte ranges from the inspection: only the inspection
    # opens each checkpoint (a torch.load of a large model costs tens of milliseconds)
    paths = _write(tmp_path / "run", 3, fmt, dtypes=("float32",))
    asked = _calls_per_epoch(monkeypatch, gingest, "cached_reader")
    store = tmp_path / "s.zarr"
    copied = []
    real_copy = gingest._copy_column

    def copy_column(*args: Any) -> Any:
        copied.append(1)
        return real_copy(*args)

    monkeypatch.setattr(gingest, "_copy_column", copy_column)
    pipeline.ingest(paths, store, runtime=SYNC, chunk_rows=ROWS)
    assert len(copied) == 3 * 4  # every chunk copied (4 row blocks of "w")
    assert asked == {0: 1, 1: 1, 2: 1}
    # and the same store as a run that reads and writes every chunk
    again = tmp_path / "t.zarr"
    monkeypatch.setattr(gingest, "_copy_column", real_copy)
    monkeypatch.setattr(gingest, "_copyable", lambda *a: None)
    pipeline.ingest(paths, again, runtime=SYNC, chunk_rows=ROWS)
    a, b = snapshot(store), snapshot(again)
    assert {k: v for k, v in a.items() if "/c/" in k} == {k: v for k, v in b.items() if "/c/" in k}
    assert _digests(store) == _digests(again)
    meta_a, meta_b = (TrajectoryStore.open(p).require_meta() for p in (store, again))
    assert meta_a.epochs == meta_b.epochs


def test_the_digest_does_not_depend_on_chunks_runtime_or_format_reader(tmp_path: Path) -> None:
    for fmt in ("safetensors", "pt"):
        paths = _write(tmp_path / fmt, 4, fmt)
        a, b = tmp_path / f"{fmt}-a.zarr", tmp_path / f"{fmt}-b.zarr"
        pipeline.ingest(paths, a, runtime=SYNC, chunk_rows=ROWS)
        pipeline.ingest(paths, b, runtime=THREADS, chunk_rows=100_003, time_chunk=2)
        want = [[digest_file(str(p))[1]] for p in paths]
        assert _digests(a) == _digests(b) == want, fmt


def _flip_in_a_copied_block(p: Path) -> int:
    """Flip a bit in the middle of the big tensor's storage of a .pt file, at the start of a
    64 KiB block inside one task's piece; returns the offset."""
    import zipfile

    with zipfile.ZipFile(p) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    raw = bytearray(p.read_bytes())
    nlen = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    xlen = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    begin = info.header_offset + 30 + nlen + xlen
    at = -(-(begin + ROWS * 4 + ROWS * 2) // BLOCK_BYTES) * BLOCK_BYTES  # inside piece 2 of 4
    assert at + BLOCK_BYTES < begin + 2 * ROWS * 4
    raw[at + 3] ^= 0x10
    p.write_bytes(bytes(raw))
    return at


def test_a_flipped_bit_in_a_copied_block_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write(tmp_path / "run", 4, "pt", dtypes=("float32",))
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths[:3], store, runtime=SYNC, chunk_rows=ROWS)
    before = snapshot(store)
    at = _flip_in_a_copied_block(paths[3])
    rest: list[tuple[int, int]] = []
    real = gingest.digest_blocks

    def spy(layout: object, ranges: tuple[tuple[int, int], ...], epoch: int | None = None) -> object:
        rest.extend(ranges)
        return real(layout, ranges, epoch)  # type: ignore[arg-type]

    monkeypatch.setattr(gingest, "digest_blocks", spy)
    with pytest.raises(pipeline.InputError, match="fails its CRC check") as err:
        pipeline.ingest([tmp_path / "run"], store, runtime=SYNC)
    assert err.value.path == str(paths[3]) and err.value.epoch == 3
    assert str(paths[3]) in str(err.value) and "\n" not in str(err.value)
    k = at // BLOCK_BYTES
    assert not any(a <= k < b for a, b in rest)  # found by the copy task, not the other pass
    assert snapshot(store) == before
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "run"), "--store", str(store), "--sync", "--no-progress"])
    assert r.exit_code == 2 and str(paths[3]) in r.stderr.strip().splitlines()[0]
    assert snapshot(store) == before
    # a new store gets no trajectory at all
    fresh = tmp_path / "fresh.zarr"
    with pytest.raises(pipeline.InputError, match="fails its CRC check"):
        pipeline.ingest(paths, fresh, runtime=THREADS, chunk_rows=ROWS)
    with pytest.raises(pipeline.StoreError, match="not a cmd-pipeline store"):
        pipeline.open_store(str(fresh))


@pytest.mark.parametrize("dtypes", [("float32", "bfloat16", "float16"), ("bfloat16",)], ids=["mixed", "bf16"])
def test_a_resume_digests_finished_chunks_from_the_store(
    tmp_path: Path, reads: Counter[str], monkeypatch: pytest.MonkeyPatch, dtypes: tuple[str, ...]
) -> None:
    paths = _write(tmp_path / "run", 3, dtypes=dtypes)
    clean = tmp_path / "clean.zarr"
    reads.clear()
    pipeline.ingest(paths, clean, runtime=SYNC, chunk_rows=ROWS)
    full = sum(reads.values())
    # interrupted once epoch 0 was written (and nothing else): pending, resumable
    store = tmp_path / "s.zarr"

    def crash(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(TrajectoryStore, "commit", crash)
        with pytest.raises(KeyboardInterrupt):
            pipeline.ingest(paths, store, runtime=SYNC, chunk_rows=ROWS)
    st = TrajectoryStore.open(store)
    for i, j in st.existing_chunks():
        if j > 0:
            (store / "trajectory" / "c" / str(i) / str(j)).unlink()
    meta = st.meta
    assert meta is not None and meta.pending is not None
    n_kept = len(st.existing_chunks())
    reads.clear()
    res = pipeline.ingest(paths, store, runtime=SYNC)
    assert res.resumed and res.chunks_kept == n_kept > 0
    # epoch 0's bytes are not read again (the store gives them back), but for its header and
    # the blocks at the edges of the tasks' ranges, read apart in any case
    first = paths[0].stat().st_size
    assert sum(reads.values()) <= full - first + (n_kept + 2) * BLOCK_BYTES
    assert snapshot(store) == snapshot(clean)


def test_a_resume_refuses_a_changed_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pending epoch's files are known by path, size and mtime until the commit: one
    rewritten since the interruption is refused (force discards the interrupted ingest)."""
    paths = _write(tmp_path / "run", 3, dtypes=("float32",))
    store = tmp_path / "s.zarr"

    def crash(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(TrajectoryStore, "commit", crash)
        with pytest.raises(KeyboardInterrupt):
            pipeline.ingest(paths, store, runtime=SYNC, chunk_rows=ROWS)
    pending = TrajectoryStore.open(store).require_meta().pending
    assert pending is not None and all(f.sha256 == "" for e in pending for f in e.files)
    save_file(_sd(7, ("float32",)), str(paths[1]))  # same size, other values
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    before = snapshot(store)
    with pytest.raises(pipeline.ConfigMismatchError, match="interrupted ingest of epochs"):
        pipeline.ingest(paths, store, runtime=SYNC)
    assert snapshot(store) == before
    res = pipeline.ingest(paths, store, runtime=SYNC, force=True)
    assert res.added == [0, 1, 2] and not res.resumed
    assert _digests(store) == [[digest_file(str(p))[1]] for p in paths]


@pytest.mark.parametrize("how", ["rewritten", "truncated"])
def test_a_file_changed_during_the_ingest_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    paths = _write(tmp_path / "run", 3, dtypes=("float32",))
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths[:2], store, runtime=SYNC, chunk_rows=ROWS)
    before = snapshot(store)
    real = gingest.write_chunk
    victim = paths[2]
    size = victim.stat().st_size

    def write_chunk(*args: object, **kwargs: object) -> object:
        data = victim.read_bytes()
        if how == "truncated" and len(data) == size:
            victim.write_bytes(data[: size // 2])
        elif how == "rewritten" and data[-4:] != bytes(4):  # in place: same size, other bytes
            victim.write_bytes(data[:-4] + bytes(4))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gingest, "write_chunk", write_chunk)
    want = "changed while it was ingested" if how == "rewritten" else "truncated|changed while"
    with pytest.raises(pipeline.InputError, match=want) as err:
        pipeline.ingest(paths, store, runtime=SYNC)
    assert err.value.path == str(victim) and err.value.epoch == 2 and str(victim) in str(err.value)
    assert "\n" not in str(err.value)
    assert snapshot(store) == before
    assert pipeline.info(store)["epochs"] == [0, 1]


def _legacy(store: Path) -> None:
    """Record every file as a store written before content digests did: a sha256."""
    st = TrajectoryStore.open(store, writable=True)
    meta = st.require_meta()
    old = tuple(
        e.__class__(
            e.epoch,
            tuple(
                SourceFile(f.path, f.size, hashlib.sha256(Path(f.path).read_bytes()).hexdigest(), f.mtime_ns)
                for f in e.files
            ),
            e.nonfinite,
            e.nonfinite_by_tensor,
            e.inline,
            e.digests,
        )
        for e in meta.epochs
    )
    st.write_meta(meta.with_(epochs=old))


def test_stores_recording_sha256_still_compare_and_append(tmp_path: Path, reads: Counter[str]) -> None:
    paths = _write(tmp_path / "run", 4, dtypes=("float32",))
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths[:3], store, runtime=SYNC, chunk_rows=ROWS)
    _legacy(store)
    # known by path, size and mtime: not read
    reads.clear()
    assert pipeline.ingest(paths[:3], store, runtime=SYNC).already_present == [0, 1, 2]
    assert sum(reads.values()) < 4 * BLOCK_BYTES
    # touched: hashed again with sha256, the older store's scheme, and recognised
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    res = pipeline.ingest(paths, store, runtime=SYNC)  # and epoch 3 is appended
    assert res.already_present == [0, 1, 2] and res.added == [3]
    got = _digests(store)
    assert got[0][0] == hashlib.sha256(paths[0].read_bytes()).hexdigest()  # kept as it was
    assert got[3][0] == digest_file(str(paths[3]))[1]  # the new one: a content digest
    # other bytes for a stored epoch: refused, whatever the scheme
    data = bytearray(paths[1].read_bytes())
    data[-8:] = bytes(8)
    paths[1].write_bytes(bytes(data))
    with pytest.raises(pipeline.ConfigMismatchError, match="epoch 1 is already stored from other files"):
        pipeline.ingest(paths, store, runtime=SYNC)
    with pytest.raises(pipeline.ConfigMismatchError, match="epoch 3 is already stored from other files"):
        os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
        data = bytearray(paths[3].read_bytes())
        data[-8:] = bytes(8)
        paths[3].write_bytes(bytes(data))
        pipeline.ingest(paths[2:], store, runtime=SYNC)


def test_source_file_comparisons() -> None:
    a = SourceFile("/r/e1.pt", 10, CONTENT_PREFIX + "ab" * 16, 5)
    assert a.scheme == "content" and SourceFile("/r/e1.pt", 10, "cd" * 32).scheme == "sha256"
    assert a.same_file(SourceFile("/elsewhere/e1.pt", 10, a.sha256, 7))  # same bytes
    assert not a.same_file(SourceFile("/r/e1.pt", 10, "ab" * 32, 5))  # schemes never match
    pending = SourceFile("/r/e1.pt", 10, "", 5)  # not digested yet: path, size and mtime
    assert pending.scheme == "" and pending.same_file(a) and a.same_file(pending)
    assert not pending.same_file(SourceFile("/r/e1.pt", 10, "", 6))
    assert not SourceFile("/r/e1.pt", 10, "", -1).same_file(SourceFile("/r/e1.pt", 10, "", -1))
    assert SourceFile.from_dict(pending.to_dict()) == pending


def _parts(data: bytes) -> Iterator[bytes]:
    rng = random.Random(len(data))
    i = 0
    while i < len(data):
        n = rng.choice([0, 1, 7, BLOCK_BYTES, rng.randrange(1, 3 * BLOCK_BYTES)])
        yield data[i : i + n]
        i += n


def test_crc32_of_parts_combines_as_zlib_would() -> None:
    data = np.random.default_rng(0).bytes(5 * BLOCK_BYTES + 123)
    parts = list(_parts(data))
    assert crc32_concat([(zlib.crc32(p), len(p)) for p in parts], common=BLOCK_BYTES) == zlib.crc32(data)
    crc = 0
    for p in parts:
        crc = crc32_combine(crc, zlib.crc32(p), len(p))
    assert crc == zlib.crc32(data)


def test_chunk_task_labels_name_their_chunks_rows_and_epochs() -> None:
    from types import SimpleNamespace

    from pipeline.ops.ingest import _chunks_label
    from pipeline.store.trajectory import ChunkGrid

    grid = ChunkGrid("unused", 100, 30, 1, "none")
    one = [SimpleNamespace(epoch=7)]
    assert _chunks_label([(1, 4, True)], grid, one) == "trajectory chunk (1, 4): rows 30-60, epoch 7"
    several = [(1, 4, True), (2, 4, False), (3, 4, True)]  # the last chunk is short
    two = [SimpleNamespace(epoch=8), SimpleNamespace(epoch=9)]
    assert _chunks_label(several, grid, two) == "trajectory chunks (1..3, 4): rows 30-100, epochs 8-9"

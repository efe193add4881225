"""Files the store already records are identified by path, size and modification time: a
re-run over the whole run folder reads only the new checkpoints, and those only once (their
digest is put together from the copy tasks' reads, no pre-pass hashes them); a stored epoch's
file with another modification time is still hashed, and refused when its content differs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import SYNC, net_state_dicts, save_checkpoint

import pipeline
from pipeline.errors import ConfigMismatchError
from pipeline.graph import ingest as graph_ingest
from pipeline.store.trajectory import TrajectoryStore


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files ingest reads to hash them (the in-process runtime runs the tasks here)."""
    seen: list[str] = []
    real = graph_ingest.digest_file

    def counting(path: str, epoch: int | None = None, *args: str) -> tuple[int, str]:
        seen.append(Path(path).name)
        return real(path, epoch, *args)

    monkeypatch.setattr(graph_ingest, "digest_file", counting)
    return seen


def _run(root: Path, n: int) -> list[Path]:
    return [save_checkpoint(root, e, sd, "pt") for e, sd in enumerate(net_state_dicts(n))]


def test_a_rerun_over_the_folder_reads_only_the_new_checkpoints(tmp_path: Path, hashed: list[str]) -> None:
    paths = _run(tmp_path / "run", 5)
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths[:4], store, runtime=SYNC)
    assert hashed == []  # new files: digested while they are copied
    res = pipeline.ingest([tmp_path / "run"], store, runtime=SYNC)
    assert res.added == [4] and res.already_present == [0, 1, 2, 3]
    assert hashed == []  # the four stored ones are identified without a read
    files = TrajectoryStore.open(store).require_meta().epochs[4].files
    assert files[0].mtime_ns == os.stat(paths[4]).st_mtime_ns
    # the digest put together from the tasks is the one a sequential pass gives
    assert files[0].sha256 == graph_ingest.digest_file(str(paths[4]))[1]
    assert files[0].sha256.startswith("xxh3-128-b64k:")


def test_a_touched_file_is_hashed_again_and_still_recognised(tmp_path: Path, hashed: list[str]) -> None:
    paths = _run(tmp_path / "run", 4)
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths, store, runtime=SYNC)
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # copied, touched: same bytes
    hashed.clear()
    res = pipeline.ingest(paths, store, runtime=SYNC)
    assert hashed == ["epoch_1.pt"] and res.added == [] and res.already_present == [0, 1, 2, 3]


def test_a_changed_file_is_refused(tmp_path: Path, hashed: list[str]) -> None:
    paths = _run(tmp_path / "run", 4)
    store = tmp_path / "s.zarr"
    pipeline.ingest(paths, store, runtime=SYNC)
    sd = net_state_dicts(4, seed=9)[2]
    torch.save(sd, paths[2])
    st = os.stat(paths[2])
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime, whatever the clock
    with pytest.raises(ConfigMismatchError, match="epoch 2 is already stored from other files"):
        pipeline.ingest(paths, store, runtime=SYNC)
    assert "epoch_2.pt" in hashed


def test_a_resumed_ingest_does_not_hash_its_files_again(
    tmp_path: Path, hashed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _run(tmp_path / "run", 4)
    store = tmp_path / "s.zarr"

    def crash(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(TrajectoryStore, "commit", crash)
        with pytest.raises(KeyboardInterrupt):
            pipeline.ingest(paths, store, runtime=SYNC)
    hashed.clear()
    res = pipeline.ingest(paths, store, runtime=SYNC)
    assert res.resumed and res.added == [0, 1, 2, 3] and hashed == []

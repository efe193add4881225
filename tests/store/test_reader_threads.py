"""The threads of a process share its cached checkpoint readers (an epoch's chunk tasks run
one after another, so two threads often read the same checkpoint at once): what a reader
builds lazily must never be seen half-built."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.checkpoints import torchzip
from pipeline.checkpoints.readers import CheckpointSpec, open_checkpoint


def test_a_torch_readers_spans_are_never_seen_half_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "e.pt"
    torch.save({"a": torch.randn(100), "b": torch.randn(7, 9), "c": torch.randn(3)}, path)
    spec = CheckpointSpec("torch", (str(path),), 0)
    want = {k: open_checkpoint(spec).spans(k) for k in ("a", "b", "c")}  # type: ignore[attr-defined]
    assert all(v is not None for v in want.values())

    # the first thread to build the table is held inside the build until the second has
    # its answer (the second must not see the first one's half-built table)
    entered, release = threading.Event(), threading.Event()
    first: list[threading.Thread] = []
    real = torchzip.TorchZipReader.tensor_info

    def held(self: Any, name: str) -> Any:
        if threading.current_thread() is first[0] and not release.is_set():
            entered.set()
            assert release.wait(30)
        return real(self, name)

    monkeypatch.setattr(torchzip.TorchZipReader, "tensor_info", held)
    reader = open_checkpoint(spec)
    got: dict[str, Any] = {}
    t = threading.Thread(target=lambda: got.__setitem__("a", reader.spans("a")))  # type: ignore[attr-defined]
    first.append(t)
    t.start()
    try:
        assert entered.wait(30)
        got["c"] = reader.spans("c")  # type: ignore[attr-defined]
    finally:
        release.set()
        t.join(30)
    assert got == {"a": want["a"], "c": want["c"]}
    assert reader.spans("b") == want["b"]  # type: ignore[attr-defined]

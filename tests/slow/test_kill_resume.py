"""A real ingest process is killed mid-way; the re-run finishes and equals a clean run byte for byte."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

CLI = [sys.executable, "-m", "pipeline.cli"]
N_A, N_B, T, CHUNK_ROWS = 150_000, 50_001, 12, 2000


def _write_run(root: Path) -> Path:
    rng = np.random.default_rng(0)
    d = root / "ckpts"
    d.mkdir()
    a = rng.standard_normal(N_A).astype(np.float32)
    b = rng.standard_normal(N_B).astype(np.float16)
    for e in range(T):
        a += 0.01 * rng.standard_normal(N_A).astype(np.float32)
        b += (0.01 * rng.standard_normal(N_B)).astype(np.float16)
        save_file({"layer.weight": a.reshape(300, 500), "layer.bias": b}, str(d / f"epoch_{e:03d}.safetensors"))
    return d


def _snapshot(store: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


def _ingest_cmd(ckpts: Path, store: Path) -> list[str]:
    return [*CLI, "ingest", str(ckpts), "--store", str(store), "--sync", "--no-progress",
            "--chunk-rows", str(CHUNK_ROWS)]


def _n_chunks(store: Path) -> int:
    c = store / "trajectory" / "c"
    return sum(1 for p in c.rglob("*") if p.is_file() and not p.name.endswith(".partial")) if c.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_ingest_resumes_to_identical_store(tmp_path: Path, sig: signal.Signals) -> None:
    ckpts = _write_run(tmp_path)
    clean = tmp_path / "clean.zarr"
    subprocess.run(_ingest_cmd(ckpts, clean), check=True, capture_output=True)
    total = _n_chunks(clean)
    assert total == -(-(N_A + N_B) // CHUNK_ROWS) * T

    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_ingest_cmd(ckpts, store), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _n_chunks(store) < total // 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "ingest finished before it could be interrupted: make the run larger"
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err.decode()
        assert b"re-run the same command to resume" in err
    done_before = _n_chunks(store)
    assert 0 < done_before < total

    info = subprocess.run([*CLI, "info", "--store", str(store)], capture_output=True, text=True, check=True)
    assert "PENDING" in info.stdout

    chunk_dir = store / "trajectory" / "c"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in chunk_dir.rglob("*") if p.is_file() and not p.name.endswith(".partial")}
    time.sleep(0.05)
    rerun = subprocess.run(_ingest_cmd(ckpts, store), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "(resumed)" in rerun.stdout
    assert f"{total - len(before)} chunk(s) written, {len(before)} kept" in rerun.stdout
    for p, (mtime, data) in before.items():  # finished chunks are not rewritten
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    assert not list(store.rglob("*.partial"))
    assert _snapshot(store) == _snapshot(clean)


def test_rerun_of_finished_ingest_changes_nothing(tmp_path: Path) -> None:
    ckpts = _write_run(tmp_path)
    store = tmp_path / "s.zarr"
    subprocess.run(_ingest_cmd(ckpts, store), check=True, capture_output=True)
    snap = _snapshot(store)
    mtimes = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    r = subprocess.run(_ingest_cmd(ckpts, store), capture_output=True, text=True, check=True)
    assert "added 0 epoch(s)" in r.stdout and f"{T} epoch(s) already stored" in r.stdout
    assert _snapshot(store) == snap
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == mtimes
    assert os.path.exists(store / "zarr.json")

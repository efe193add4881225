"""A real ``cmd-pipeline fit`` process is interrupted mid-pass; the re-run resumes (finished
blocks untouched) and the store ends byte for byte equal to one fitted without interruption."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    PER_ROW_ARRAYS,
    SYNC,
    add_study,
    modal_state_dicts,
    mode_profiles,
    planted_rows,
    read_analysis,
    snapshot,
    snapshot_mtimes,
    write_safetensors_run,
)
from safetensors.numpy import save_file

import pipeline
from pipeline.store.analysis import AnalysisGroup

CLI = [sys.executable, "-m", "pipeline.cli"]
N_A, N_B, T, CHUNK_ROWS, BLOCK_ROWS = 150_000, 50_000, 8, 10_000, 500
N_BLOCKS = (N_A + N_B) // BLOCK_ROWS


def _write_run(root: Path) -> Path:
    rng = np.random.default_rng(0)
    p = mode_profiles(T)
    a = planted_rows(N_A, p, rng, noise=0.05).noisy.astype(np.float32)
    b = planted_rows(N_B, p, rng, noise=0.05).noisy.astype(np.float16)
    d = root / "ckpts"
    d.mkdir()
    for e in range(T):
        tensors = {"layer.weight": a[:, e].reshape(300, 500).copy(), "layer.bias": b[:, e].copy()}
        save_file(tensors, str(d / f"epoch_{e:03d}.safetensors"))
    return d


def _fit_cmd(store: Path) -> list[str]:
    return [
        *CLI, "fit", "--store", str(store), "--name", "r", "--modes", "4", "--sync",
        "--no-progress", "--block-rows", str(BLOCK_ROWS),
    ]  # fmt: skip


def _finished(store: Path) -> set[int]:
    c = store / "analyses" / "r" / "block_stats" / "c"
    if not c.exists():
        return set()
    return {int(p.parent.name) for p in c.glob("*/0")}


def _block_files(store: Path, blocks: set[int]) -> dict[str, tuple[bytes, int]]:
    out = {}
    for name in PER_ROW_ARRAYS:
        for i in blocks:
            p = store / "analyses" / "r" / name / "c" / str(i)
            out[str(p.relative_to(store))] = (p.read_bytes(), p.stat().st_mtime_ns)
    for i in blocks:
        p = store / "analyses" / "r" / "block_stats" / "c" / str(i) / "0"
        out[str(p.relative_to(store))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_fit_resumes_to_identical_results(tmp_path: Path, sig: signal.Signals) -> None:
    ckpts = _write_run(tmp_path)
    clean = tmp_path / "clean.zarr"
    pipeline.ingest([str(ckpts)], str(clean), chunk_rows=CHUNK_ROWS, runtime=SYNC)
    store = tmp_path / "killed.zarr"
    shutil.copytree(clean, store)
    res = pipeline.fit(str(clean), "r", modes=4, block_rows=BLOCK_ROWS, runtime=SYNC)
    assert res.status == "fitted" and res.blocks_run == N_BLOCKS

    proc = subprocess.Popen(_fit_cmd(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_finished(store)) < 20 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    assert proc.poll() is None, "the fit finished before it could be interrupted: make it larger"
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err.decode()
        assert b"re-run the same command to resume" in err
    done = _finished(store)
    assert 20 <= len(done) < N_BLOCKS
    kept = _block_files(store, done)
    # a write cut off by the kill leaves zarr's temporary file behind: make sure there is one
    stray = store / "analyses" / "r" / "a" / "c" / f"{max(done) + 1}.0123456789abcdef.partial"
    stray.write_bytes(b"\0" * 100)
    assert pipeline.info(str(store))["analyses"] == ["r"]

    out = subprocess.run(_fit_cmd(store), capture_output=True, text=True, check=True)
    assert "analysis 'r' (resumed): 4 mode(s)" in out.stdout
    assert f"{N_BLOCKS - len(done)} block(s) run, {len(done)} kept" in out.stdout
    # the finished blocks were neither rewritten nor touched
    assert _block_files(store, done) == kept
    assert not stray.exists()
    # the whole store, analysis included, is byte for byte the uninterrupted one
    got, want = snapshot(store), snapshot(clean)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    again = pipeline.fit(str(store), "r", modes=4, block_rows=BLOCK_ROWS, runtime=SYNC)
    assert again.status == "unchanged" and again.summary == res.summary


def _small_store(tmp_path: Path) -> Path:
    ck = write_safetensors_run(tmp_path / "ck", modal_state_dicts(10, seed=3))[0].parent
    store = tmp_path / "s.zarr"
    pipeline.ingest([str(ck)], str(store), runtime=SYNC, chunk_rows=400)
    return store


def _tree(store: Path, name: str) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(store).items() if k.startswith(f"analyses/{name}/")}


def test_fit_interrupted_while_creating_its_group_starts_over(tmp_path: Path) -> None:
    """A fit killed after creating analyses/NAME but before recording its configuration left
    a group marked "creating": the next fit replaces it (nothing had been computed)."""
    store = _small_store(tmp_path)
    clean = tmp_path / "clean.zarr"
    shutil.copytree(store, clean)
    pipeline.fit(str(clean), "r", modes=4, samples=120, runtime=SYNC)
    n = pipeline.info(str(store))["n_rows"]
    # what the killed fit left: the group and some arrays, no configuration
    AnalysisGroup(str(store), "r").create(
        n_rows=n, n_modes=7, block_rows=100, n_blocks=-(-n // 100), stats_width=3,
        small={"refs": np.zeros((7, 10))},
    )  # fmt: skip
    assert read_analysis(store, "r")["attrs"]["status"] == "creating"
    res = pipeline.fit(str(store), "r", modes=4, samples=120, runtime=SYNC)
    assert res.status == "fitted" and res.n_modes == 4
    assert read_analysis(store, "r")["attrs"]["status"] == "complete"
    assert _tree(store, "r") == _tree(clean, "r")


def test_fit_never_replaces_a_foreign_group_without_force(tmp_path: Path) -> None:
    store = _small_store(tmp_path)
    add_study(store, "study1")  # written by someone else, with zarr directly
    state = snapshot_mtimes(store)
    with pytest.raises(pipeline.StoreError, match="not a cmd-pipeline analysis; pass force=True"):
        pipeline.fit(str(store), "study1", modes=3, samples=100, runtime=SYNC)
    assert snapshot_mtimes(store) == state
    res = pipeline.fit(str(store), "study1", modes=3, samples=100, force=True, runtime=SYNC)
    assert res.status == "fitted"
    got = read_analysis(store, "study1")
    assert "modes" not in got and got["refs"].shape == (3, 10)

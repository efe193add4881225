"""`cmd-pipeline bench --scale N` at a tiny N: every step runs, the planted modes come back,
and each step's figures are recorded (the 1e9 run is a benchmark, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from pipeline.bench.scale import MODES, lm_shape, planted, write_lm_run
from pipeline.cli import main


def test_lm_shape_and_planted_values_are_deterministic() -> None:
    s = lm_shape(1e6)
    names = [n for n, _ in s.tensors()]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert "model.layers.0.self_attn.q_proj.weight" in names and len(set(names)) == len(names)
    rows = np.array([0, 1, 12345, 10**9 + 7])
    m1, a1, b1 = planted(rows)
    m2, a2, b2 = planted(rows)
    assert np.array_equal(m1, m2) and np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert ((m1 >= 0) & (m1 < MODES)).all() and (np.abs(a1) >= 0.02).all()


def test_sharded_bf16_run_has_an_index(tmp_path: Path) -> None:
    s = lm_shape(2e5)
    nbytes = write_lm_run(tmp_path, s, 2)
    idx = json.loads((tmp_path / "checkpoint-1" / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == {n for n, _ in s.tensors()}
    assert idx["metadata"]["total_size"] == 2 * s.n_params
    assert nbytes > 2 * 2 * s.n_params  # two epochs of bf16 plus headers


def test_bench_scale_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main, ["bench", "--out", str(out), "--scale", "3e5", "--sync", "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "scale.json").read_text())
    assert res["store_dtype"] == "bfloat16" and res["n_modes"] == MODES
    assert res["mode_purity"] > 0.99 and res["dynamics_error"] < 0.05
    steps = [s["step"] for s in res["steps"]]
    assert steps[:3] == ["write checkpoints", "ingest", "fit (M=10, K=1000)"]
    assert "report" in steps and all(s["peak_rss_process_gb"] > 0 for s in res["steps"])
    assert "| ingest |" in (out / "scale.md").read_text()
    assert not (out / "work" / "lm.zarr").exists()  # removed without --keep

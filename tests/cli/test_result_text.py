"""Every result type of the API prints itself the same way: ``text()``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from helpers import SYNC, mode_profiles, planted_rows, rows_to_state_dicts, write_safetensors_run

import pipeline
from pipeline.ops.compare import CompareResult
from pipeline.ops.stability import StabilityResult, StabilityStudy


def test_every_result_type_has_text() -> None:
    for cls in (
        pipeline.IngestResult,
        pipeline.FitResult,
        pipeline.ReconstructResult,
        pipeline.EvaluationResult,
        pipeline.ReportResult,
        CompareResult,
        StabilityResult,
        StabilityStudy,
    ):
        assert callable(getattr(cls, "text", None)), cls


def test_text_is_the_result_in_words(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = planted_rows(100, mode_profiles(6, ("exp", "sin")), rng).noisy
    ck = tmp_path / "ck"
    write_safetensors_run(ck, rows_to_state_dicts({"w": ((100,), torch.float32, rows)}))
    store = str(tmp_path / "s.zarr")
    ing = pipeline.ingest([str(ck)], store, runtime=SYNC)
    assert ing.text() == ing.summary() and "N=100 parameters" in ing.text()
    fit = pipeline.fit(store, "s", modes=2, samples=30, runtime=SYNC)
    assert fit.text() == fit.summary_text() and "error relative to the dynamics" in fit.text()
    rec = pipeline.reconstruct(store, "s", runtime=SYNC)
    assert rec.text() == rec.summary()

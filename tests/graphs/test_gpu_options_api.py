"""``gpu=True`` through the Python API, on operations that compute on the CPU only: refused
before anything starts (as the CLI refuses ``--gpu`` there), instead of starting a GPU cluster
that runs CPU work on fewer workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SYNC, mode_profiles, planted_rows, rows_to_state_dicts, write_safetensors_run

import pipeline
from pipeline.errors import PipelineError

GPU = pipeline.RuntimeOptions(gpu=True, progress=False)


def test_cpu_only_operations_refuse_gpu(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = planted_rows(100, mode_profiles(6, ("exp", "sin")), rng).noisy
    ck = tmp_path / "ck"
    write_safetensors_run(ck, rows_to_state_dicts({"w": ((100,), torch.float32, rows)}))
    store = str(tmp_path / "s.zarr")
    with pytest.raises(PipelineError, match="ingest computes on the CPU only"):
        pipeline.ingest([str(ck)], store, runtime=GPU)
    assert not Path(store).exists()
    pipeline.ingest([str(ck)], store, runtime=SYNC)
    pipeline.fit(store, "s", modes=2, samples=30, runtime=SYNC)
    with pytest.raises(PipelineError, match="reconstruct computes on the CPU only"):
        pipeline.reconstruct(store, "s", runtime=GPU)
    from pipeline.ops.compare import compare

    with pytest.raises(PipelineError, match="compare computes on the CPU only"):
        compare([(store, "s"), (store, "s")], runtime=GPU)

"""Plans are values: made from a store's metadata and the inspected inputs without touching a
chunk, checked before anything is written, and round-tripping through JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import SYNC, Run

import pipeline
from pipeline.checkpoints.discover import discover
from pipeline.graph.ingest import inspect_epoch
from pipeline.plan import FitPlan, IngestPlan, RowLayout, plan_fit, plan_ingest


def _requested(**kw: object) -> dict[str, object]:
    keys = ("include", "exclude", "buffer_patterns", "float_buffers", "nonfinite")
    return {**dict.fromkeys(keys), "chunk_rows": None, "time_chunk": None, "codec": None, **kw}


def test_ingest_plan_new_append_and_refusal(run5: Run, tmp_path: Path) -> None:
    inspections = [inspect_epoch(s) for s in discover([run5.root])]
    plan = plan_ingest(None, inspections, _requested(time_chunk=1), force=False)
    assert [e.epoch for e in plan.new] == [0, 1, 2, 3, 4] and plan.committed == ()
    assert not (plan.rebuild or plan.resume or plan.discard_pending)
    assert plan.n_rows == sum(t.size for t in plan.index if t.stored)
    assert IngestPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan

    store = tmp_path / "s.zarr"
    pipeline.ingest(run5.paths[:3], store, runtime=SYNC)
    meta = pipeline.open_store(str(store)).meta
    again = plan_ingest(meta, inspections, _requested(), force=False)
    assert [e.epoch for e in again.new] == [3, 4] and again.already == (0, 1, 2)
    assert [e.epoch for e in again.committed] == [0, 1, 2]
    assert again.time_blocks() == [(0, 1), (1, 2)]
    assert IngestPlan.from_dict(json.loads(json.dumps(again.to_dict()))) == again
    with pytest.raises(pipeline.ConfigMismatchError, match="codec: stored 'none', requested 'lz4'"):
        plan_ingest(meta, inspections, _requested(codec="lz4"), force=False)
    rebuilt = plan_ingest(meta, inspections, _requested(codec="lz4"), force=True)
    assert rebuilt.rebuild and rebuilt.committed == () and len(rebuilt.new) == 5


def test_fit_plan_from_a_store(run5: Run, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    pipeline.ingest([run5.root], store, runtime=SYNC)
    meta = pipeline.open_store(str(store)).meta
    assert meta is not None
    kw = dict(chunk_rows=64, raw=True, modes=2, threshold=None, samples=50, seed=0)
    plan = plan_fit(meta, "s", window="1:5", **kw)  # type: ignore[arg-type]
    assert plan.cols == (1, 2, 3, 4) and plan.epochs == (1, 2, 3, 4)
    assert plan.config()["window"] == "1:5" and plan.block_rows == 64
    assert FitPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    # the fingerprint follows the window's source files, not the others'
    assert plan_fit(meta, "s", window="1:5", **kw).fingerprint == plan.fingerprint  # type: ignore[arg-type]
    assert plan_fit(meta, "s", window="0:4", **kw).fingerprint != plan.fingerprint  # type: ignore[arg-type]
    with pytest.raises(pipeline.PipelineError, match="holds 2 stored epoch"):
        plan_fit(meta, "s", window="3:5", **kw)  # type: ignore[arg-type]
    with pytest.raises(pipeline.PipelineError, match="must divide the chunk rows"):
        plan_fit(meta, "s", window=None, block_rows=48, **kw)  # type: ignore[arg-type]
    layout = RowLayout.from_entries([(t.name, t.offset, t.size) for t in meta.stored_tensors()])
    blocks = plan.block_plans(layout, np.array([3]), np.array([3, 70]))
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert blocks[0].ref_pos == (3,) and blocks[0].sample_pos == (3,)
    assert blocks[1].sample_pos == (70 - 64,)

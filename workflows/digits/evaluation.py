"""Scoring digits classifiers: test loss and accuracy.

Owns :func:`evaluate` (the whole set of 8x8 images in one batch, in eval mode) and
:func:`evaluator`, for ``cmd-pipeline evaluate``: made by
:func:`workflows.recording.recorded_evaluator`, it rebuilds a recorded run's model and its
test split (``load_digits_split(config.seed)``) to score any ``state_dict``.
"""

from __future__ import annotations

from torch import Tensor, nn

from workflows.digits.config import TrainConfig
from workflows.digits.data import load_digits_split
from workflows.digits.model import build_model
from workflows.recording import TensorSplit, evaluate_classifier, recorded_evaluator

__all__ = ["evaluate", "evaluator"]


def evaluate(model: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on inputs ``X`` ``(n, 1, 8, 8)`` and labels
    ``y`` (:func:`workflows.recording.evaluate_classifier`)."""
    return evaluate_classifier(model, X, y)


evaluator = recorded_evaluator(
    TrainConfig,
    build_model,
    lambda config: TensorSplit.pair(*load_digits_split(config.seed))[1],
    lambda model, test: evaluate(model, test.X, test.y),
    module=__name__,
)

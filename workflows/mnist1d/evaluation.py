"""Scoring MNIST-1D classifiers: test loss and accuracy.

:func:`evaluate` scores the whole set of sequences in one batch, in eval mode;
:func:`evaluator` (for ``cmd-pipeline evaluate``, made by
:func:`workflows.recording.recorded_evaluator`) regenerates a recorded run's test set from
its ``n_train``, ``n_test`` and ``data_seed`` and builds its model, to score any
``state_dict``.
"""

from __future__ import annotations

from torch import Tensor, nn

from workflows.mnist1d.config import TrainConfig
from workflows.mnist1d.data import load_mnist1d_split
from workflows.mnist1d.model import build_model
from workflows.recording import TensorSplit, evaluate_classifier, recorded_evaluator

__all__ = ["evaluate", "evaluator"]


def evaluate(model: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on inputs ``X`` ``(n, 1, 40)`` and labels
    ``y`` (:func:`workflows.recording.evaluate_classifier`)."""
    return evaluate_classifier(model, X, y)


evaluator = recorded_evaluator(
    TrainConfig,
    build_model,
    lambda config: TensorSplit.pair(
        *load_mnist1d_split(config.n_train, config.n_test, config.data_seed)
    )[1],
    lambda model, test: evaluate(model, test.X, test.y),
    module=__name__,
)

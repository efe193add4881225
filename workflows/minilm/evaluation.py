"""Scoring MiniLM classifiers: test loss and accuracy.

Owns :func:`evaluate` (fixed batching, so that scores are reproducible) and
:func:`evaluator`, which rebuilds a recorded run's test set to score any ``state_dict`` (made
by :func:`workflows.recording.recorded_evaluator`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workflows.minilm.config import TrainConfig
from workflows.minilm.data import EncodedSplit, prepare_data
from workflows.minilm.model import build_model
from workflows.recording import deterministic_torch, eval_mode, recorded_evaluator

__all__ = ["EVAL_BATCH_SIZE", "evaluate", "evaluator"]

#: Mini-batch size used by :func:`evaluate` (does not depend on the run configuration,
#: so that :func:`evaluator` reproduces the recorded metrics bit for bit).
EVAL_BATCH_SIZE = 64


@torch.no_grad()
def evaluate(model: nn.Module, data: EncodedSplit) -> tuple[float, float]:
    """Return the mean cross-entropy loss and the accuracy of ``model`` on ``data``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier ``model(input_ids, attention_mask) -> logits``. It is evaluated in
        eval mode, in mini-batches of :data:`EVAL_BATCH_SIZE` texts of similar
        lengths (stable sort by token count); its previous train/eval mode is restored
        afterwards.
    data : EncodedSplit
        Tokenised texts and labels.

    Returns
    -------
    loss : float
        Mean cross-entropy.
    accuracy : float
        Fraction of correct argmax predictions, in ``[0, 1]``.
    """
    n = len(data)
    # Batches of similar lengths waste less compute on padding; the order is a fixed
    # function of the data, so the result is reproducible.
    order = torch.argsort(data.attention_mask.sum(dim=1), stable=True)
    loss_sum = 0.0
    correct = 0
    with eval_mode(model):
        for start in range(0, n, EVAL_BATCH_SIZE):
            ids, mask, y = data.batch(order[start : start + EVAL_BATCH_SIZE])
            logits = model(ids, mask)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum())
    return float(loss_sum / max(n, 1)), float(correct / max(n, 1))


def _fresh_model(config: TrainConfig) -> nn.Module:
    """The classifier of ``config`` in eval mode, without pretrained weights (every scored
    ``state_dict`` replaces them all); its head is drawn from ``config.seed`` in a forked
    RNG, so the caller's global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config, pretrained=False)
    return model.eval()


def _evaluate_deterministic(model: nn.Module, data: EncodedSplit) -> tuple[float, float]:
    """:func:`evaluate` with deterministic algorithms on, as in training."""
    with deterministic_torch():
        return evaluate(model, data)


evaluator = recorded_evaluator(
    TrainConfig,
    _fresh_model,
    lambda config: prepare_data(config)[1],
    _evaluate_deterministic,
    module=__name__,
)

"""Scoring MiniLM classifiers: test loss and accuracy.

Owns :func:`evaluate` (fixed batching, so that scores are reproducible) and
:func:`evaluator`, which rebuilds a recorded run's test set to score any ``state_dict``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflows.minilm.config import TrainConfig
from workflows.minilm.data import EncodedSplit, prepare_data
from workflows.minilm.model import build_model
from workflows.recording import deterministic_torch, eval_mode

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


def evaluator(run_dir: str | Path) -> Callable[[dict[str, Tensor]], tuple[float, float]]:
    """Return a function scoring full ``state_dict`` s on the test set of a recorded run.

    Parameters
    ----------
    run_dir : str or Path
        Directory holding the ``run.json`` written by :func:`train_and_record`.

    Returns
    -------
    callable
        ``score(state_dict) -> (test_loss, test_accuracy)``: loads ``state_dict`` with
        ``strict=True`` into a model built from the recorded configuration and
        evaluates it with :func:`evaluate` on the test set rebuilt exactly as in
        training (same split, tokenisation and batching, deterministic algorithms on).
        For a recorded checkpoint this reproduces the recorded metrics exactly on the
        same machine and thread count.
    """
    info = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    config = TrainConfig(**info["config"])
    _, test = prepare_data(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config, pretrained=False)
    model.eval()

    def score(state_dict: dict[str, Tensor]) -> tuple[float, float]:
        model.load_state_dict(state_dict, strict=True)
        with deterministic_torch():
            return evaluate(model, test)

    return score

"""The recorded digits training: one checkpoint per epoch and a ``run.json``.

Owns what is particular to the digits run (data, model, SGD with momentum, the optional
random-shift augmentation); :func:`workflows.recording.recorded_training` makes
:func:`train_and_record` of them around the seeded, deterministic checkpoint-per-epoch loop,
:func:`workflows.recording.record_run`.
"""

from __future__ import annotations

import torch
from torch import nn

from workflows.digits.config import AUGMENT_SEED_OFFSET, TrainConfig
from workflows.digits.data import load_digits_split, random_shift
from workflows.digits.evaluation import evaluate
from workflows.digits.model import build_model
from workflows.recording import BatchLoss, TensorSplit, classifier_batch_loss, recorded_training

__all__ = ["train_and_record"]


def _setup(
    config: TrainConfig, train: TensorSplit
) -> tuple[nn.Module, torch.optim.Optimizer, BatchLoss]:
    """The model, SGD with momentum, and the loss of (optionally shifted) mini-batches."""
    model = build_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    shift = random_shift if config.augment else None
    batch_loss = classifier_batch_loss(model, train, shift, config.seed + AUGMENT_SEED_OFFSET)
    return model, optimizer, batch_loss


train_and_record = recorded_training(
    "digits",
    lambda config: TensorSplit.pair(*load_digits_split(config.seed)),
    _setup,
    lambda model, split: evaluate(model, split.X, split.y),
    module=__name__,
    summary="Train a model on the digits data and save a checkpoint after every epoch.",
    notes="The augmentation (``config.augment``) draws from a private generator seeded with "
    "``config.seed + AUGMENT_SEED_OFFSET``, so switching it on or off does not change the "
    "shuffling.",
)

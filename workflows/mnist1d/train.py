"""The recorded MNIST-1D training: one checkpoint per epoch and a ``run.json``.

Owns what is particular to the MNIST-1D run (the generated data, the model, Adam or SGD,
the optional on-the-fly augmentation); :func:`workflows.recording.recorded_training` makes
:func:`train_and_record` of them around the seeded, deterministic checkpoint-per-epoch loop,
:func:`workflows.recording.record_run`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from workflows.mnist1d.config import AUGMENT_SEED_OFFSET, TrainConfig
from workflows.mnist1d.data import augment, load_mnist1d_split
from workflows.mnist1d.evaluation import evaluate
from workflows.mnist1d.model import build_model
from workflows.recording import BatchLoss, TensorSplit, classifier_batch_loss, recorded_training

__all__ = ["build_optimizer", "train_and_record"]

#: optimizer name -> the optimiser of these parameters under ``config``
_OPTIMIZERS: dict[str, Callable[[Iterator[nn.Parameter], TrainConfig], torch.optim.Optimizer]] = {
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda params, c: torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
    ),
}


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of ``config`` (``optimizer``, ``lr``, ``momentum``, ``weight_decay``)."""
    return _OPTIMIZERS[config.optimizer](model.parameters(), config)


def _setup(
    config: TrainConfig, train: TensorSplit
) -> tuple[nn.Module, torch.optim.Optimizer, BatchLoss]:
    """The model, its optimiser, and the loss of (optionally augmented) mini-batches."""
    model = build_model(config)
    optimizer = build_optimizer(model, config)
    transform = (
        partial(
            augment,
            max_shift=config.max_shift,
            offset_std=config.offset_std,
            slope_std=config.slope_std,
            noise_std=config.noise_std,
        )
        if config.augment
        else None
    )
    batch_loss = classifier_batch_loss(model, train, transform, config.seed + AUGMENT_SEED_OFFSET)
    return model, optimizer, batch_loss


train_and_record = recorded_training(
    "mnist1d",
    lambda config: TensorSplit.pair(
        *load_mnist1d_split(config.n_train, config.n_test, config.data_seed)
    ),
    _setup,
    lambda model, split: evaluate(model, split.X, split.y),
    module=__name__,
    summary="Train a model on MNIST-1D and save a checkpoint after every epoch.",
    notes="The augmentation (``config.augment``) draws from a private generator seeded with "
    "``config.seed + AUGMENT_SEED_OFFSET``, so switching it on or off does not change the "
    "shuffling, and touches the training mini-batches only. The data set depends on "
    "``(n_train + n_test, data_seed)`` only, never on ``seed`` or ``augment``.",
)

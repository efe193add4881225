"""The recorded MNIST-1D training: one checkpoint per epoch and a ``run.json``.

Owns what is particular to the MNIST-1D run (the generated data, the model, Adam or SGD,
the optional on-the-fly augmentation); the seeded, deterministic checkpoint-per-epoch loop
itself is :func:`workflows.recording.record_run`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflows.mnist1d.config import AUGMENT_SEED_OFFSET, TrainConfig
from workflows.mnist1d.data import augment, load_mnist1d_split
from workflows.mnist1d.evaluation import evaluate
from workflows.mnist1d.model import build_model
from workflows.recording import BatchLoss, prepare_out_dir, record_run

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


def train_and_record(
    out_dir: str | Path,
    config: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a model on MNIST-1D and save a checkpoint after every epoch.

    Parameters
    ----------
    out_dir : str or Path
        Output directory (created if needed). Receives ``epoch_{e:04d}.pt`` or
        ``epoch_{e:04d}.safetensors`` per recorded epoch and ``run.json``.
    config : TrainConfig
        Run configuration.
    on_epoch : callable, optional
        Called with each epoch's record (see Returns) right after it is written.
    overwrite : bool, default False
        Delete checkpoint files left in ``out_dir`` by an earlier run. Without it,
        such files raise :class:`FileExistsError` (a shorter run would otherwise
        leave a mixed trajectory behind).

    Returns
    -------
    dict
        The content of ``run.json``: ``workflow`` (``"mnist1d"``), ``evaluator``,
        ``config`` (the :class:`TrainConfig` as a dict), ``model_class``, ``n_params``,
        ``n_train``, ``n_test``, ``torch_version``, ``num_threads``, ``checkpoints``
        (file names in epoch order) and ``epochs``, a list of records ``{"epoch",
        "checkpoint", "train_loss", "test_loss", "test_accuracy"}``. ``train_loss`` is
        the sample-weighted mean mini-batch loss seen during that epoch (train mode,
        augmented if enabled); for epoch 0 it is the loss of the initial weights on the
        whole un-augmented training set.

    Notes
    -----
    Determinism: the weights are initialised under ``torch.manual_seed(config.seed)``
    inside :func:`torch.random.fork_rng` (the caller's global RNG state is left
    untouched), shuffling and augmentation use private :class:`torch.Generator`
    objects, and training runs with ``torch.use_deterministic_algorithms(True)``
    (the previous setting is restored on exit). The data set depends on
    ``(n_train + n_test, data_seed)`` only, never on ``seed`` or ``augment``; the
    augmentation touches the training mini-batches only. The number of intra-op
    threads is not changed; byte-identity is guaranteed for the same torch build and
    thread count.
    """
    out = prepare_out_dir(out_dir, overwrite)

    X_train, y_train, X_test, y_test = load_mnist1d_split(
        config.n_train, config.n_test, config.data_seed
    )

    def setup() -> tuple[nn.Module, torch.optim.Optimizer, BatchLoss]:
        model = build_model(config)
        optimizer = build_optimizer(model, config)
        augment_gen = torch.Generator().manual_seed(config.seed + AUGMENT_SEED_OFFSET)

        def batch_loss(idx: Tensor) -> Tensor:
            xb, yb = X_train[idx], y_train[idx]
            if config.augment:
                xb = augment(
                    xb,
                    augment_gen,
                    max_shift=config.max_shift,
                    offset_std=config.offset_std,
                    slope_std=config.slope_std,
                    noise_std=config.noise_std,
                )
            return F.cross_entropy(model(xb), yb)

        return model, optimizer, batch_loss

    return record_run(
        out,
        "mnist1d",
        config,
        setup,
        n_train=int(X_train.shape[0]),
        n_test=int(X_test.shape[0]),
        initial_train_loss=lambda model: evaluate(model, X_train, y_train)[0],
        test_metrics=lambda model: evaluate(model, X_test, y_test),
        on_epoch=on_epoch,
    )

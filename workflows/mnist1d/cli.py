"""Command line of the mnist1d workflow: ``python -m workflows.mnist1d --out DIR [options]``.

Every field of :class:`~workflows.mnist1d.config.TrainConfig` is an option, and
:data:`CLI_OPTIONS` says what the architecture, optimiser, data and augmentation ones do;
:func:`main`, made by :func:`workflows.cli_args.recording_main`, times every epoch.
"""

from __future__ import annotations

from workflows.cli_args import Option, recording_main
from workflows.mnist1d.config import TrainConfig
from workflows.mnist1d.train import train_and_record

__all__ = ["CLI_OPTIONS", "main"]

#: Command-line help and special forms of the :class:`TrainConfig` fields.
CLI_OPTIONS: dict[str, Option] = {
    "model": Option(help="architecture: the paper's CNN, a 1D ResNet or an MLP"),
    "optimizer": Option(help="Adam, or SGD with --momentum"),
    "momentum": Option(help="SGD momentum (unused by Adam)"),
    "data_seed": Option(help="seed of the generated data set (42: the standard MNIST-1D)"),
    "n_train": Option(help="training sequences (n_train + n_test: a multiple of 10)"),
    "n_test": Option(help="test sequences"),
    "augment": Option(help="re-drawn offset and trend, circular shifts and noise"),
    "max_shift": Option(help="augmentation: shifts by 0..max_shift-1 positions"),
    "offset_std": Option(help="augmentation: spread of the new offsets"),
    "slope_std": Option(help="augmentation: spread of the new trends"),
    "noise_std": Option(help="augmentation: spread of the added i.i.d. noise"),
    "channels": Option(help="channels of every convolution (cnn, resnet)"),
    "hidden": Option(help="width of both hidden layers (mlp)"),
    "record_initial": Option(
        flag="--no-initial", help="do not save the untrained weights as epoch 0"
    ),
}


main = recording_main(
    prog="python -m workflows.mnist1d",
    description="Train a small model on MNIST-1D (generated offline) and save one "
    "checkpoint per epoch.",
    config_cls=TrainConfig,
    train_and_record=train_and_record,
    module=__name__,
    options=CLI_OPTIONS,
    epoch_seconds=True,
)

"""Command line of the mnist1d workflow: ``python -m workflows.mnist1d --out DIR [options]``.

Owns the options (one per :class:`~workflows.mnist1d.config.TrainConfig` field, built by
:mod:`workflows.cli_args`), the program's name and description, and which extras its
progress lines show; parsing, training and printing are
:func:`workflows.cli_args.run_recording_cli`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from workflows.cli_args import Option, run_recording_cli
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m workflows.mnist1d --out DIR [options]``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status, 0 on success.
    """
    parser = argparse.ArgumentParser(
        prog="python -m workflows.mnist1d",
        description="Train a small model on MNIST-1D (generated offline) and save one "
        "checkpoint per epoch.",
    )
    return run_recording_cli(
        parser, TrainConfig, train_and_record, argv, options=CLI_OPTIONS, epoch_seconds=True
    )

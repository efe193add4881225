"""Command line of the digits workflow: ``python -m workflows.digits --out DIR [options]``.

Owns the options (one per :class:`~workflows.digits.config.TrainConfig` field, built by
:mod:`workflows.cli_args`), the program's name and description, and which extras its
progress lines show; parsing, training and printing are
:func:`workflows.cli_args.run_recording_cli`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from workflows.cli_args import Option, run_recording_cli
from workflows.digits.config import TrainConfig
from workflows.digits.train import train_and_record

__all__ = ["CLI_OPTIONS", "main"]

#: Command-line help and special forms of the :class:`TrainConfig` fields.
CLI_OPTIONS: dict[str, Option] = {
    "augment": Option(help="random 1-pixel shifts"),
    "batchnorm": Option(help="BatchNorm2d (CNN only)"),
    "record_initial": Option(
        flag="--no-initial", help="do not save the untrained weights as epoch 0"
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m workflows.digits --out DIR [options]``.

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
        prog="python -m workflows.digits",
        description="Train a small model on the scikit-learn digits and save one "
        "checkpoint per epoch.",
    )
    return run_recording_cli(parser, TrainConfig, train_and_record, argv, options=CLI_OPTIONS)

"""Command line of the digits workflow: ``python -m workflows.digits --out DIR [options]``.

One option per :class:`~workflows.digits.config.TrainConfig` field; :data:`CLI_OPTIONS`
gives the augmentation, BatchNorm and ``--no-initial`` their help, and
:func:`workflows.cli_args.recording_main` makes :func:`main` (plain progress lines).
"""

from __future__ import annotations

from workflows.cli_args import Option, recording_main
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


main = recording_main(
    prog="python -m workflows.digits",
    description="Train a small model on the scikit-learn digits and save one checkpoint per epoch.",
    config_cls=TrainConfig,
    train_and_record=train_and_record,
    module=__name__,
    options=CLI_OPTIONS,
)

"""Command line of the MiniLM workflow: ``python -m workflows.minilm --out DIR [options]``.

Owns the options (one per :class:`~workflows.minilm.config.TrainConfig` field, built by
:mod:`workflows.cli_args`), the program's name and description, and which extras its
progress lines show; parsing, training and printing are
:func:`workflows.cli_args.run_recording_cli`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from workflows.cli_args import Option, run_recording_cli
from workflows.minilm.config import TrainConfig
from workflows.minilm.train import train_and_record

__all__ = ["CLI_OPTIONS", "main"]

#: Command-line help and special forms of the :class:`TrainConfig` fields.
CLI_OPTIONS: dict[str, Option] = {
    "lr": Option(help="encoder learning rate"),
    "head_lr": Option(help="head learning rate"),
    "max_per_class": Option(help="cap on texts per class (0: no cap)", zero_is_none=True),
    "limit": Option(help="cap on the total number of texts (tests)"),
    "freeze_embeddings": Option(help="do not train the embedding layer"),
    "record_initial": Option(
        flag="--no-initial", help="do not save the initial weights as epoch 0"
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m workflows.minilm --out DIR [options]``.

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
        prog="python -m workflows.minilm",
        description="Fine-tune the pretrained MiniLM-L6 on standard-library docstring "
        "topics and save one checkpoint per epoch.",
    )
    return run_recording_cli(
        parser,
        TrainConfig,
        train_and_record,
        argv,
        options=CLI_OPTIONS,
        epoch_seconds=True,
        sizes_unit="texts",
    )

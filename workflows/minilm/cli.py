"""Command line of the MiniLM workflow: ``python -m workflows.minilm --out DIR [options]``.

Owns the options (one per :class:`~workflows.minilm.config.TrainConfig` field, built by
:mod:`workflows.cli_args`) and the progress log of a recorded run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from workflows.cli_args import (
    Option,
    add_recording_arguments,
    config_from_args,
)
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
    add_recording_arguments(parser, TrainConfig, options=CLI_OPTIONS)
    args = parser.parse_args(argv)
    config = config_from_args(parser, TrainConfig, args)

    last = [time.perf_counter()]

    def log(rec: dict[str, Any]) -> None:
        now = time.perf_counter()
        print(
            f"epoch {rec['epoch']:4d}  train_loss {rec['train_loss']:.4f}  "
            f"test_loss {rec['test_loss']:.4f}  test_acc {rec['test_accuracy']:.4f}  "
            f"({now - last[0]:.1f} s) -> {rec['checkpoint']}",
            flush=True,
        )
        last[0] = now

    t0 = time.perf_counter()
    try:
        result = train_and_record(args.out, config, on_epoch=log, overwrite=args.overwrite)
    except FileExistsError as exc:
        parser.error(str(exc))
    elapsed = time.perf_counter() - t0
    final = result["epochs"][-1] if result["epochs"] else None
    summary = (
        f"done: {result['model_class']} ({result['n_params']} params, "
        f"{result['n_train']} train / {result['n_test']} test texts), "
        f"{len(result['checkpoints'])} checkpoints in {args.out}, {elapsed:.2f} s"
    )
    if final is not None:
        summary += (
            f", final test_acc {final['test_accuracy']:.4f} test_loss {final['test_loss']:.4f}"
        )
    print(summary, flush=True)
    return 0

"""Command line of the MiniLM workflow: ``python -m workflows.minilm --out DIR [options]``.

The options are the :class:`~workflows.minilm.config.TrainConfig` fields (the two learning
rates, the data caps, ``--max-per-class 0`` for no cap, ...), helped by :data:`CLI_OPTIONS`;
:func:`main` (:func:`workflows.cli_args.recording_main`) times each epoch and reports the
sizes of the splits in texts.
"""

from __future__ import annotations

from workflows.cli_args import Option, recording_main
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


main = recording_main(
    prog="python -m workflows.minilm",
    description="Fine-tune the pretrained MiniLM-L6 on standard-library docstring "
    "topics and save one checkpoint per epoch.",
    config_cls=TrainConfig,
    train_and_record=train_and_record,
    module=__name__,
    options=CLI_OPTIONS,
    epoch_seconds=True,
    sizes_unit="texts",
)

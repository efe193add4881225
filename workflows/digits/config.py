"""The configuration of one recorded digits training run (:class:`TrainConfig`).

Owns every setting of a run, its defaults and its validation (the command line,
:mod:`workflows.digits.cli`, is built from these fields), and the workflow's constants:
the number of classes and the seed offset of the augmentation generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from workflows.recording import check_fields

__all__ = ["AUGMENT_SEED_OFFSET", "N_CLASSES", "TrainConfig"]

#: Number of classes in the digits data set.
N_CLASSES = 10
#: Offset added to ``config.seed`` for the augmentation generator, so that switching
#: augmentation on or off does not change the shuffling order.
AUGMENT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of one recorded training run.

    Parameters
    ----------
    model : {"cnn", "mlp"}, default "cnn"
        Architecture, see :class:`~workflows.digits.model.SimpleCNN` and
        :class:`~workflows.digits.model.MLP`.
    epochs : int, default 20
        Number of passes over the training set.
    lr : float, default 0.05
        SGD learning rate.
    momentum : float, default 0.9
        SGD momentum.
    batch_size : int, default 64
        Mini-batch size (the last batch of an epoch may be smaller).
    seed : int, default 0
        Seeds the data split, the weight initialisation, the shuffling and the
        augmentation.
    augment : bool, default False
        Randomly shift training images by up to one pixel (zero padding, no wrap).
    batchnorm : bool, default False
        Add a ``BatchNorm2d`` after the first convolution (CNN only).
    hidden : int, default 64
        Width of the hidden fully connected layer(s).
    fmt : {"pt", "safetensors"}, default "pt"
        Checkpoint file format.
    record_initial : bool, default True
        Also save the weights before training as epoch 0.
    """

    model: Literal["cnn", "mlp"] = "cnn"
    epochs: int = 20
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64
    seed: int = 0
    augment: bool = False
    batchnorm: bool = False
    hidden: int = 64
    fmt: Literal["pt", "safetensors"] = "pt"
    record_initial: bool = True

    def __post_init__(self) -> None:
        """Validate the field values."""
        if self.model not in ("cnn", "mlp"):
            raise ValueError(f"model must be 'cnn' or 'mlp', got {self.model!r}")
        check_fields(self, fmt="'pt' or 'safetensors'", epochs=">= 0", lr="> 0")
        check_fields(self, momentum="in [0, 1)", batch_size=">= 1", hidden=">= 1", seed=">= 0")
        if self.batchnorm and self.model != "cnn":
            raise ValueError("batchnorm=True is only supported for model='cnn'")

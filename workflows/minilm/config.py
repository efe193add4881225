"""The configuration of one recorded MiniLM fine-tuning run (:class:`TrainConfig`).

Owns every setting of a run, its defaults and its validation; the command line
(:mod:`workflows.minilm.cli`) is built from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from workflows.minilm.data import N_CLASSES
from workflows.recording import check_fields

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of one recorded fine-tuning run.

    Parameters
    ----------
    epochs : int, default 4
        Number of passes over the training set.
    lr : float, default 5e-5
        AdamW learning rate of the encoder.
    head_lr : float, default 1e-3
        AdamW learning rate of the linear head.
    weight_decay : float, default 0.01
        AdamW (decoupled) weight decay of all weight matrices and embeddings; biases
        and LayerNorm parameters are not decayed.
    batch_size : int, default 32
        Mini-batch size (the last batch of an epoch may be smaller).
    seed : int, default 0
        Seeds the data split, the head initialisation, the shuffling and dropout.
    max_length : int, default 64
        Token budget per docstring (longer ones are truncated).
    max_per_class : int or None, default 300
        Cap on the number of texts per class, see :func:`load_docstring_split`.
    limit : int or None, default None
        Cap on the total number of texts (train + test), for quick tests.
    dropout : float, default 0.1
        Dropout before the head (the encoder keeps its own 0.1 dropouts).
    freeze_embeddings : bool, default False
        Do not train the token, position and type embeddings nor their LayerNorm
        (they still appear, unchanged, in every checkpoint).
    fmt : {"pt", "safetensors"}, default "safetensors"
        Checkpoint file format.
    record_initial : bool, default True
        Also save the weights before training (pretrained encoder, fresh head) as
        epoch 0.
    """

    epochs: int = 4
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    seed: int = 0
    max_length: int = 64
    max_per_class: int | None = 300
    limit: int | None = None
    dropout: float = 0.1
    freeze_embeddings: bool = False
    fmt: Literal["pt", "safetensors"] = "safetensors"
    record_initial: bool = True

    def __post_init__(self) -> None:
        """Validate the field values."""
        check_fields(self, fmt="'pt' or 'safetensors'", epochs=">= 0", lr="> 0", head_lr="> 0")
        check_fields(self, weight_decay=">= 0", batch_size=">= 1", seed=">= 0")
        if not 3 <= self.max_length <= 512:
            raise ValueError(f"max_length must be in [3, 512], got {self.max_length}")
        if self.max_per_class is not None and self.max_per_class < 2:
            raise ValueError(f"max_per_class must be >= 2 or None, got {self.max_per_class}")
        if self.limit is not None and self.limit < 2 * N_CLASSES:
            raise ValueError(f"limit must be >= {2 * N_CLASSES} or None, got {self.limit}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

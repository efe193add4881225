"""The configuration of one recorded MNIST-1D training run (:class:`TrainConfig`).

Owns every setting of a run, its defaults and its validation (the command line,
:mod:`workflows.mnist1d.cli`, is built from these fields), and the workflow's constants:
the number of classes, the sequence length and the seed offset of the augmentation
generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from workflows.recording import check_fields

__all__ = ["AUGMENT_SEED_OFFSET", "MODELS", "N_CLASSES", "OPTIMIZERS", "SEQ_LEN", "TrainConfig"]

#: Number of classes (the ten digit templates of MNIST-1D).
N_CLASSES = 10
#: Length of every MNIST-1D sequence (``final_seq_length`` of ``mnist1d``'s default arguments).
SEQ_LEN = 40
#: Offset added to ``config.seed`` for the augmentation generator, so that switching
#: augmentation on or off does not change the shuffling order.
AUGMENT_SEED_OFFSET = 1_000_003
#: The architectures :func:`~workflows.mnist1d.model.build_model` knows.
MODELS = ("cnn", "resnet", "mlp")
#: The optimisers of :func:`~workflows.mnist1d.train.train_and_record`.
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of one recorded MNIST-1D training run.

    The defaults are those of the MNIST-1D paper's benchmarks (Greydanus and Kobak,
    2024): the standard data set (4000 training and 1000 test sequences of length 40,
    generated with seed 42), Adam with learning rate 0.01 and mini-batches of 100.

    Parameters
    ----------
    model : {"cnn", "resnet", "mlp"}, default "cnn"
        Architecture, see :class:`~workflows.mnist1d.model.ConvNet1D`,
        :class:`~workflows.mnist1d.model.ResNet1D` and :class:`~workflows.mnist1d.model.MLP`.
    epochs : int, default 100
        Number of passes over the training set.
    optimizer : {"adam", "sgd"}, default "adam"
        Adam, or SGD with ``momentum``.
    lr : float, default 0.01
        Learning rate.
    momentum : float, default 0.9
        SGD momentum (unused by Adam).
    weight_decay : float, default 0.0
        L2 penalty of the optimiser (coupled, as in ``torch.optim.Adam`` and ``SGD``).
    batch_size : int, default 100
        Mini-batch size (the last batch of an epoch may be smaller).
    seed : int, default 0
        Seeds the weight initialisation, the shuffling and the augmentation.
    data_seed : int, default 42
        Seed of the generated data set (``mnist1d``'s default 42 gives the standard
        MNIST-1D); kept apart from ``seed`` so that runs over seeds share their data.
    n_train : int, default 4000
        Number of training sequences.
    n_test : int, default 1000
        Number of test sequences; ``n_train + n_test`` must be a multiple of 10 (one
        tenth per class, see :func:`~workflows.mnist1d.data.load_mnist1d_split`).
    augment : bool, default False
        Transform every training sequence afresh each time it is drawn, see
        :func:`~workflows.mnist1d.data.augment`.
    max_shift : int, default 10
        Augmentation: circular shifts by ``0..max_shift - 1`` positions.
    offset_std : float, default 0.3
        Augmentation: standard deviation of the random offset that replaces the
        sequence's own mean (0.3 is the spread of the data set's own offsets).
    slope_std : float, default 0.04
        Augmentation: standard deviation of the random linear trend (per position)
        that replaces the sequence's own trend (0.04 is the spread of the data set's).
    noise_std : float, default 0.1
        Augmentation: standard deviation of added i.i.d. Gaussian noise (about the data
        set's own i.i.d. noise, 0.02 before its standardisation).
    channels : int, default 25
        Channels of every convolution of the CNN and the ResNet.
    hidden : int, default 100
        Width of both hidden layers of the MLP.
    fmt : {"pt", "safetensors"}, default "pt"
        Checkpoint file format.
    record_initial : bool, default True
        Also save the weights before training as epoch 0.
    """

    model: Literal["cnn", "resnet", "mlp"] = "cnn"
    epochs: int = 100
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 100
    seed: int = 0
    data_seed: int = 42
    n_train: int = 4000
    n_test: int = 1000
    augment: bool = False
    max_shift: int = 10
    offset_std: float = 0.3
    slope_std: float = 0.04
    noise_std: float = 0.1
    channels: int = 25
    hidden: int = 100
    fmt: Literal["pt", "safetensors"] = "pt"
    record_initial: bool = True

    def __post_init__(self) -> None:
        """Validate the field values."""
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check_fields(self, fmt="'pt' or 'safetensors'", epochs=">= 0", lr="> 0")
        check_fields(self, momentum="in [0, 1)", weight_decay=">= 0", batch_size=">= 1")
        check_fields(self, seed=">= 0", data_seed=">= 0")
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")
        if (self.n_train + self.n_test) % N_CLASSES:
            raise ValueError(
                f"n_train + n_test must be a multiple of {N_CLASSES}, got "
                f"{self.n_train} + {self.n_test}"
            )
        if not 1 <= self.max_shift <= SEQ_LEN:
            raise ValueError(f"max_shift must be in 1..{SEQ_LEN}, got {self.max_shift}")
        check_fields(self, offset_std=">= 0", slope_std=">= 0", noise_std=">= 0")
        check_fields(self, channels=">= 1", hidden=">= 1")

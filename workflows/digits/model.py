"""The digits classifiers: a small CNN and an MLP, both for 1x8x8 images.

Owns the networks (:class:`SimpleCNN`, :class:`MLP`) and how a run's configuration
selects and builds one (:func:`build_model`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflows.digits.config import N_CLASSES, TrainConfig

__all__ = ["MLP", "SimpleCNN", "build_model"]


class SimpleCNN(nn.Module):
    """Small SimpleNet-like CNN for 1x8x8 inputs (about 14k parameters).

    ``conv3x3(1->16) [-> BatchNorm2d] -> ReLU -> maxpool2 -> conv3x3(16->32) -> ReLU
    -> maxpool2 -> flatten(128) -> fc(64) -> ReLU -> fc(10)``.

    Parameters
    ----------
    batchnorm : bool, default False
        Insert a ``BatchNorm2d`` after the first convolution.
    channels : tuple of int, default (16, 32)
        Output channels of the two convolutions.
    hidden : int, default 64
        Width of the hidden fully connected layer.
    """

    def __init__(
        self, batchnorm: bool = False, channels: tuple[int, int] = (16, 32), hidden: int = 64
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.bn1: nn.Module = nn.BatchNorm2d(c1) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Return the ``(batch, 10)`` logits for ``(batch, 1, 8, 8)`` images."""
        x = self.pool(F.relu(self.bn1(self.conv1(x))))  # (b, c1, 4, 4)
        x = self.pool(F.relu(self.conv2(x)))  # (b, c2, 2, 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class MLP(nn.Module):
    """Two-hidden-layer perceptron on the flattened 64 pixels (about 9k parameters).

    ``flatten(64) -> fc(hidden) -> ReLU -> fc(hidden) -> ReLU -> fc(10)``.

    Parameters
    ----------
    hidden : int, default 64
        Width of both hidden layers.
    """

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Return the ``(batch, 10)`` logits for ``(batch, 1, 8, 8)`` or ``(batch, 64)``."""
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build_model(config: TrainConfig) -> nn.Module:
    """Build the (untrained) model described by ``config``.

    Parameters
    ----------
    config : TrainConfig
        Run configuration; ``model``, ``batchnorm`` and ``hidden`` are used.

    Returns
    -------
    torch.nn.Module
        A freshly initialised model drawing from torch's global RNG; seed it (or use
        :func:`train_and_record`, which does) for reproducible weights.
    """
    if config.model == "cnn":
        return SimpleCNN(batchnorm=config.batchnorm, hidden=config.hidden)
    if config.model == "mlp":
        return MLP(hidden=config.hidden)
    raise ValueError(f"unknown model {config.model!r}")

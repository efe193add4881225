"""The MNIST-1D classifiers: a small 1D CNN, a 1D ResNet and an MLP, for ``(1, 40)`` inputs.

Owns the networks (:class:`ConvNet1D`, :class:`ResNet1D`, :class:`MLP`) and how a run's
configuration selects and builds one (:func:`build_model`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflows.mnist1d.config import N_CLASSES, SEQ_LEN, TrainConfig

__all__ = ["MLP", "ConvNet1D", "ResNet1D", "build_model"]


def _strided_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class ConvNet1D(nn.Module):
    """The MNIST-1D paper's CNN: three strided convolutions and a linear classifier.

    ``conv(1->c, k5, s2) -> ReLU -> conv(c->c, k3, s2) -> ReLU -> conv(c->c, k3, s2)
    -> ReLU -> flatten(5c) -> fc(10)`` (lengths 40 -> 19 -> 10 -> 5); 5,210 parameters
    with the default 25 channels.

    Parameters
    ----------
    channels : int, default 25
        Output channels of every convolution.
    length : int, default 40
        Input length.
    """

    def __init__(self, channels: int = 25, length: int = SEQ_LEN) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out = _strided_length(length, 5, 2, 1)
        for _ in range(2):
            out = _strided_length(out, 3, 2, 1)
        self.fc = nn.Linear(channels * out, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Return the ``(batch, 10)`` logits for ``(batch, 1, length)`` sequences."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


class _ResidualBlock(nn.Module):
    """``relu(skip(x) + conv(relu(conv(x))))``; the first convolution and the skip stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.skip = nn.Conv1d(channels, channels, 1, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.skip(x) + self.conv2(F.relu(self.conv1(x))))


class ResNet1D(nn.Module):
    """A small 1D ResNet: a stem convolution, three residual blocks, a linear classifier.

    ``conv(1->c, k5) -> ReLU -> 3 x block -> flatten(5c) -> fc(10)``; each block halves
    the length (40 -> 20 -> 10 -> 5) with a strided 3-convolution followed by a
    3-convolution, and adds a strided 1-convolution of its input (the skip connection)
    before the ReLU. No normalisation layers, so every weight is a parameter; 14,760
    parameters with the default 25 channels.

    Parameters
    ----------
    channels : int, default 25
        Channels of every convolution.
    length : int, default 40
        Input length.
    blocks : int, default 3
        Number of residual blocks.
    """

    def __init__(self, channels: int = 25, length: int = SEQ_LEN, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, channels, 5, padding=2)
        self.blocks = nn.Sequential(*(_ResidualBlock(channels) for _ in range(blocks)))
        out = length
        for _ in range(blocks):
            out = _strided_length(out, 3, 2, 1)
        self.fc = nn.Linear(channels * out, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Return the ``(batch, 10)`` logits for ``(batch, 1, length)`` sequences."""
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class MLP(nn.Module):
    """Multi-layer perceptron ``length -> hidden -> hidden -> 10`` with ReLU.

    15,210 parameters with the default 100 hidden units.

    Parameters
    ----------
    hidden : int, default 100
        Width of both hidden layers.
    length : int, default 40
        Input length.
    """

    def __init__(self, hidden: int = 100, length: int = SEQ_LEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(length, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Return the ``(batch, 10)`` logits for ``(batch, 1, length)`` or ``(batch, length)``."""
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


#: model name -> builder from the run's configuration
_BUILDERS: dict[str, Callable[[TrainConfig], nn.Module]] = {
    "cnn": lambda config: ConvNet1D(channels=config.channels),
    "resnet": lambda config: ResNet1D(channels=config.channels),
    "mlp": lambda config: MLP(hidden=config.hidden),
}


def build_model(config: TrainConfig) -> nn.Module:
    """Build the (untrained) model described by ``config``.

    Parameters
    ----------
    config : TrainConfig
        Run configuration; ``model``, ``channels`` (CNN, ResNet) and ``hidden`` (MLP) are
        used.

    Returns
    -------
    torch.nn.Module
        A freshly initialised model drawing from torch's global RNG; seed it (or use
        :func:`~workflows.mnist1d.train.train_and_record`, which does) for reproducible
        weights.
    """
    return _BUILDERS[config.model](config)

"""The configuration of a federated experiment and the two methods it compares.

Owns :class:`FedConfig` (every setting, its default and its validation; the command line
is built from its fields), the method names and the model a configuration describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from workflows.digits import MLP, SimpleCNN

__all__ = ["FLOAT_BYTES", "METHODS", "FedConfig", "Method"]


Method = Literal["fedavg", "cmd"]
METHODS: tuple[Method, ...] = ("fedavg", "cmd")
FLOAT_BYTES = 4  # the parameters travel as float32


@dataclass(frozen=True)
class FedConfig:
    """Configuration of one federated experiment (both methods, one seed at a time).

    Parameters
    ----------
    clients : int
        K, the number of clients (all take part in every round).
    rounds : int
        Communication rounds.
    local_epochs : int
        Passes of each client over its own data per round.
    model : {"mlp", "cnn"}
        :class:`workflows.digits.MLP` or :class:`workflows.digits.SimpleCNN`.
    hidden : int
        Hidden width of the model.
    alpha : float or None
        None: IID split; else the Dirichlet concentration of the non-IID label split.
    lr, momentum, batch_size
        Client SGD.
    warmup, embed_every, embed_fraction, modes, samples
        Server-side :class:`pipeline.online.EmbeddedCMD` (rounds are its epochs).
    ab_dtype : {"float32", "float64"}
        Wire type of the frozen ``a, b``.
    min_client_size : int
        The non-IID split is redrawn (seeded) until every client holds this many samples.
    """

    clients: int = 5
    rounds: int = 40
    local_epochs: int = 1
    model: Literal["mlp", "cnn"] = "mlp"
    hidden: int = 64
    alpha: float | None = None
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    warmup: int = 8
    embed_every: int = 4
    embed_fraction: float = 0.1
    modes: int = 10
    samples: int = 1000
    ab_dtype: Literal["float32", "float64"] = "float32"
    min_client_size: int = 10

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError("clients must be >= 1")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError("rounds and local_epochs must be >= 1")
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"model must be 'mlp' or 'cnn', got {self.model!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError("alpha must be > 0")
        if self.warmup < 3 or self.embed_every < 1 or not 0 < self.embed_fraction <= 1:
            raise ValueError("need warmup >= 3, embed_every >= 1, 0 < embed_fraction <= 1")
        if self.ab_dtype not in ("float32", "float64"):
            raise ValueError("ab_dtype must be 'float32' or 'float64'")


def _build_model(config: FedConfig) -> nn.Module:
    return MLP(hidden=config.hidden) if config.model == "mlp" else SimpleCNN(hidden=config.hidden)

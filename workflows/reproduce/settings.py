"""The settings of a reproduction run: the full run and the ``--quick`` one.

Owns :class:`Settings` (every size of the run in one frozen value, with its validation) and
the two presets :data:`FULL` and :data:`QUICK`. Every claim uses the same training
configuration (MNIST-1D's own benchmark setting: Adam, learning rate 0.01, mini-batches of
100, the standard 4000/1000 split); only the architecture and the augmentation change, where
a claim is about them (claim 5). Nothing is set per claim to make it pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from workflows.mnist1d import TrainConfig

__all__ = ["FULL", "QUICK", "SETTINGS", "Settings"]

#: The training runs a reproduction records, by name: (model, augment).
SETTINGS: dict[str, tuple[str, bool]] = {
    "cnn": ("cnn", False),
    "cnn_augment": ("cnn", True),
    "resnet": ("resnet", False),
}


@dataclass(frozen=True)
class Settings:
    """Every size of a reproduction run.

    Parameters
    ----------
    seeds
        Training seeds (each gives one paired value per test).
    sampling_seeds
        Seeds of CMD's sampling of K parameters (claims 1-5 average over them).
    epochs
        Epochs of every recorded run (epoch 0, the initial weights, is recorded too).
    n_train, n_test
        MNIST-1D split sizes (their sum a multiple of 10).
    modes, samples
        M and K of the post-hoc CMD fits (the paper's M = 10, K = 1000).
    sweep_modes
        The numbers of modes of claim 2 (002 fig 6a).
    sweep_samples
        The sample counts K of claim 3 (002 fig 11: 50 ... 2000).
    history
        Claim 4's fractions of the epochs kept, from the end (002 fig 13: 100% ... 50%).
    dmd_ranks
        Claim 5's DMD ranks r (002 figs 5b, 22), capped at T - 1 and the data's rank.
    stability_from
        Claim 1's stability is measured over the epochs after this fraction of training.
    optimizer, lr
        The optimiser of every run (MNIST-1D's benchmark: Adam, 0.01).
    warmup, embed_every, embed_fraction, ema_decay, swa_start
        Online and Embedded CMD (001's F = 20, L = 10, P = 10%), EMA decay per step, and
        SWA's first epoch as a fraction of the epochs (claims 7 and 8).
    fed
        Federated settings (claim 9): fields of :class:`workflows.federated.FedConfig`
        other than the model, which is the CNN of the other claims.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sampling_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 100
    n_train: int = 4000
    n_test: int = 1000
    modes: int = 10
    samples: int = 1000
    sweep_modes: tuple[int, ...] = (1, 2, 5, 10, 20)
    sweep_samples: tuple[int, ...] = (50, 125, 250, 500, 1000, 2000)
    history: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    dmd_ranks: tuple[int, ...] = (10, 50, 90)
    stability_from: float = 0.5
    optimizer: str = "adam"
    lr: float = 0.01
    warmup: int = 20
    embed_every: int = 10
    embed_fraction: float = 0.1
    ema_decay: float = 0.99
    swa_start: float = 0.75
    fed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"need at least two distinct training seeds, got {self.seeds}")
        if not self.sampling_seeds:
            raise ValueError("need at least one sampling seed")
        if self.modes not in self.sweep_modes:
            raise ValueError(f"modes={self.modes} must be one of sweep_modes {self.sweep_modes}")
        if self.samples not in self.sweep_samples:
            raise ValueError(
                f"samples={self.samples} must be one of sweep_samples {self.sweep_samples}"
            )
        if self.history[0] != 1.0 or any(not 0 < f <= 1 for f in self.history):
            raise ValueError(f"history must start with 1.0 and lie in (0, 1], got {self.history}")
        if self.epochs < 3 or self.warmup >= self.epochs:
            raise ValueError("need epochs >= 3 and warmup < epochs")
        if not 0 <= self.stability_from < 1:
            raise ValueError("stability_from must be in [0, 1)")

    def train_config(self, setting: str, seed: int) -> TrainConfig:
        """The :class:`~workflows.mnist1d.TrainConfig` of one recorded run."""
        model, augment = SETTINGS[setting]
        return TrainConfig(
            model=model,  # type: ignore[arg-type]
            epochs=self.epochs,
            optimizer=self.optimizer,  # type: ignore[arg-type]
            lr=self.lr,
            n_train=self.n_train,
            n_test=self.n_test,
            augment=augment,
            seed=seed,
        )

    def history_start(self, fraction: float) -> int:
        """The first epoch of the window that keeps ``fraction`` of the epochs (from the end)."""
        return self.epochs - round(fraction * self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


#: The full run (about an hour on two cores; see the package docstring).
FULL = Settings(
    fed={"clients": 5, "rounds": 40, "warmup": 8, "embed_every": 4, "embed_fraction": 0.1},
)

#: Tiny settings for the tests: every claim runs, the numbers mean nothing.
QUICK = Settings(
    seeds=(0, 1),
    sampling_seeds=(0,),
    epochs=6,
    n_train=300,
    n_test=200,
    modes=3,
    samples=60,
    sweep_modes=(1, 3),
    sweep_samples=(30, 60),
    history=(1.0, 0.5),
    dmd_ranks=(2, 4),
    warmup=3,
    embed_every=1,
    embed_fraction=0.2,
    swa_start=0.5,
    fed={
        "clients": 3,
        "rounds": 5,
        "warmup": 3,
        "embed_every": 1,
        "embed_fraction": 0.2,
        "samples": 60,
        "modes": 3,
    },
)

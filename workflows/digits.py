"""Deterministic training-run recorder on the scikit-learn 8x8 digits data set.

Trains a small CNN or MLP with SGD on :func:`sklearn.datasets.load_digits` (1797 real
8x8 handwritten digit images, bundled with scikit-learn, so no network access is needed)
and saves the model's ``state_dict`` after every epoch. The resulting trajectory of
checkpoints is the input of the correlation-mode decomposition tools in :mod:`pipeline`.

Everything is seeded: two runs with the same :class:`TrainConfig` on the same machine
(same torch build, same number of intra-op threads) write byte-identical checkpoint files.

Examples
--------
Record a 20-epoch CNN run, one ``.pt`` file per epoch plus ``run.json``::

    python -m workflows.digits --out runs/cnn0 --model cnn --epochs 20 --seed 0 --fmt pt
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflows.cli_args import (
    Option,
    add_recording_arguments,
    config_from_args,
)
from workflows.recording import (
    CHECKPOINT_SUFFIX,
    checkpoint_path,
    deterministic_torch,
    prepare_out_dir,
    save_checkpoint,
    write_run_json,
)

__all__ = [
    "MLP",
    "SimpleCNN",
    "TrainConfig",
    "build_model",
    "evaluate",
    "evaluator",
    "load_digits_split",
    "main",
    "random_shift",
    "train_and_record",
]

#: Number of classes in the digits data set.
N_CLASSES = 10
#: Offset added to ``config.seed`` for the augmentation generator, so that switching
#: augmentation on or off does not change the shuffling order.
_AUGMENT_SEED_OFFSET = 1_000_003


# --------------------------------------------------------------------------- data


def load_digits_split(
    seed: int, test_fraction: float = 0.25
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load the scikit-learn digits data and split it into train and test sets.

    Parameters
    ----------
    seed : int
        Random state of the stratified split.
    test_fraction : float, default 0.25
        Fraction of the 1797 samples that goes to the test set, in ``(0, 1)``.

    Returns
    -------
    X_train : Tensor
        ``(n_train, 1, 8, 8)`` float32 images with pixel values in ``[0, 1]``.
    y_train : Tensor
        ``(n_train,)`` int64 labels in ``0..9``.
    X_test : Tensor
        ``(n_test, 1, 8, 8)`` float32 images with pixel values in ``[0, 1]``.
    y_test : Tensor
        ``(n_test,)`` int64 labels in ``0..9``.

    Notes
    -----
    The split is stratified by label and depends only on ``seed`` and
    ``test_fraction``. Note the return order: (X, y) of the train set, then of the
    test set (not scikit-learn's ``X_train, X_test, y_train, y_test``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    digits = load_digits()
    # Raw pixel intensities are integers in 0..16.
    images = (np.asarray(digits.data, dtype=np.float64) / 16.0).astype(np.float32)
    images = images.reshape(-1, 1, 8, 8)
    labels = np.asarray(digits.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return (
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(np.ascontiguousarray(y_tr)),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(np.ascontiguousarray(y_te)),
    )


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift each image by a random integer offset, filling with zeros (no wrap-around).

    Parameters
    ----------
    x : Tensor
        ``(batch, channels, height, width)`` images.
    generator : torch.Generator
        Source of the offsets; the result is a deterministic function of its state.
    max_shift : int, default 1
        Offsets are drawn uniformly from ``-max_shift..max_shift`` independently for
        rows and columns of every image.

    Returns
    -------
    Tensor
        Shifted images, same shape and dtype as ``x``.
    """
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    rows = offsets[:, 0:1] + torch.arange(h)  # (b, h)
    cols = offsets[:, 1:2] + torch.arange(w)  # (b, w)
    batch_idx = torch.arange(b)[:, None, None]
    # Advanced indices separated by a slice: the result is laid out (b, h, w, c).
    out = padded[batch_idx, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


# -------------------------------------------------------------------------- models


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


# -------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of one recorded training run.

    Parameters
    ----------
    model : {"cnn", "mlp"}, default "cnn"
        Architecture, see :class:`SimpleCNN` and :class:`MLP`.
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
        if self.fmt not in CHECKPOINT_SUFFIX:
            raise ValueError(f"fmt must be 'pt' or 'safetensors', got {self.fmt!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.batchnorm and self.model != "cnn":
            raise ValueError("batchnorm=True is only supported for model='cnn'")


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


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float]:
    """Return the mean cross-entropy loss and the accuracy of ``model`` on ``(X, y)``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits. It is evaluated in eval mode; its previous
        train/eval mode is restored afterwards.
    X : Tensor
        Inputs, ``(n, 1, 8, 8)``.
    y : Tensor
        Integer labels, ``(n,)``.

    Returns
    -------
    loss : float
        Mean cross-entropy.
    accuracy : float
        Fraction of correct argmax predictions, in ``[0, 1]``.
    """
    was_training = model.training
    model.eval()
    try:
        logits = model(X)
        loss = F.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    finally:
        model.train(was_training)
    return float(loss), float(accuracy)


def evaluator(run_dir: str | Path) -> Callable[[dict[str, Tensor]], tuple[float, float]]:
    """The test-set evaluation of a recorded run, for ``cmd-pipeline evaluate``.

    Parameters
    ----------
    run_dir : str or Path
        A folder written by :func:`train_and_record` (its ``run.json`` gives the config).

    Returns
    -------
    callable
        Maps a full state_dict (loaded with ``strict=True``) to ``(test loss, test
        accuracy)``, exactly as recorded in ``run.json`` for the run's own checkpoints.
    """
    run = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    config = TrainConfig(**run["config"])
    model = build_model(config)
    _, _, x_test, y_test = load_digits_split(config.seed)

    def score(state: dict[str, Tensor]) -> tuple[float, float]:
        model.load_state_dict(state, strict=True)
        return evaluate(model, x_test, y_test)

    return score


# ------------------------------------------------------------------------ training


def train_and_record(
    out_dir: str | Path,
    config: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a model on the digits data and save a checkpoint after every epoch.

    Parameters
    ----------
    out_dir : str or Path
        Output directory (created if needed). Receives ``epoch_{e:04d}.pt`` or
        ``epoch_{e:04d}.safetensors`` per recorded epoch and ``run.json``.
    config : TrainConfig
        Run configuration.
    on_epoch : callable, optional
        Called with each epoch's record (see Returns) right after it is written.
    overwrite : bool, default False
        Delete checkpoint files left in ``out_dir`` by an earlier run. Without it,
        such files raise :class:`FileExistsError` (a shorter run would otherwise
        leave a mixed trajectory behind).

    Returns
    -------
    dict
        The content of ``run.json``: ``config`` (the :class:`TrainConfig` as a dict),
        ``model_class``, ``n_params``, ``n_train``, ``n_test``, ``torch_version``,
        ``num_threads``, ``checkpoints`` (file names in epoch order) and ``epochs``, a
        list of records ``{"epoch", "checkpoint", "train_loss", "test_loss",
        "test_accuracy"}``. ``train_loss`` is the sample-weighted mean mini-batch loss
        seen during that epoch (train mode, augmented if enabled); for epoch 0 it is
        the loss of the initial weights on the whole un-augmented training set.

    Notes
    -----
    Determinism: the weights are initialised under ``torch.manual_seed(config.seed)``
    inside :func:`torch.random.fork_rng` (the caller's global RNG state is left
    untouched), shuffling and augmentation use private :class:`torch.Generator`
    objects, and training runs with ``torch.use_deterministic_algorithms(True)``
    (the previous setting is restored on exit). The number of intra-op threads is not
    changed; byte-identity is guaranteed for the same torch build and thread count.
    """
    out = prepare_out_dir(out_dir, overwrite)

    X_train, y_train, X_test, y_test = load_digits_split(config.seed)
    n_train = int(X_train.shape[0])

    records: list[dict[str, Any]] = []
    checkpoints: list[str] = []

    def record(epoch: int, model: nn.Module, train_loss: float) -> None:
        path = checkpoint_path(out, epoch, config.fmt)
        save_checkpoint(model, path, config.fmt)
        test_loss, test_acc = evaluate(model, X_test, y_test)
        rec: dict[str, Any] = {
            "epoch": epoch,
            "checkpoint": path.name,
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
        }
        records.append(rec)
        checkpoints.append(path.name)
        if on_epoch is not None:
            on_epoch(rec)

    with torch.random.fork_rng(devices=[]), deterministic_torch():
        torch.manual_seed(config.seed)
        model = build_model(config)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        shuffle_gen = torch.Generator().manual_seed(config.seed)
        augment_gen = torch.Generator().manual_seed(config.seed + _AUGMENT_SEED_OFFSET)

        if config.record_initial:
            record(0, model, evaluate(model, X_train, y_train)[0])

        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(n_train, generator=shuffle_gen)
            loss_sum = 0.0
            for start in range(0, n_train, config.batch_size):
                idx = order[start : start + config.batch_size]
                xb, yb = X_train[idx], y_train[idx]
                if config.augment:
                    xb = random_shift(xb, augment_gen)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * int(idx.numel())
            record(epoch, model, loss_sum / n_train)

    return write_run_json(out, "digits", config, model, n_train, int(X_test.shape[0]), checkpoints, records)


# ----------------------------------------------------------------------------- CLI


#: Command-line help and special forms of the :class:`TrainConfig` fields.
CLI_OPTIONS: dict[str, Option] = {
    "augment": Option(help="random 1-pixel shifts"),
    "batchnorm": Option(help="BatchNorm2d (CNN only)"),
    "record_initial": Option(flag="--no-initial", help="do not save the untrained weights as epoch 0"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m workflows.digits --out DIR [options]``.

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
        prog="python -m workflows.digits",
        description="Train a small model on the scikit-learn digits and save one "
        "checkpoint per epoch.",
    )
    add_recording_arguments(parser, TrainConfig, options=CLI_OPTIONS)
    args = parser.parse_args(argv)
    config = config_from_args(parser, TrainConfig, args)

    def log(rec: dict[str, Any]) -> None:
        print(
            f"epoch {rec['epoch']:4d}  train_loss {rec['train_loss']:.4f}  "
            f"test_loss {rec['test_loss']:.4f}  test_acc {rec['test_accuracy']:.4f}  "
            f"-> {rec['checkpoint']}",
            flush=True,
        )

    t0 = time.perf_counter()
    try:
        result = train_and_record(args.out, config, on_epoch=log, overwrite=args.overwrite)
    except FileExistsError as exc:
        parser.error(str(exc))
    elapsed = time.perf_counter() - t0
    final = result["epochs"][-1] if result["epochs"] else None
    summary = (
        f"done: {result['model_class']} ({result['n_params']} params), "
        f"{len(result['checkpoints'])} checkpoints in {args.out}, {elapsed:.2f} s"
    )
    if final is not None:
        summary += (
            f", final test_acc {final['test_accuracy']:.4f} test_loss {final['test_loss']:.4f}"
        )
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

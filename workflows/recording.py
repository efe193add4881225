"""What every recorded training workflow shares: deterministic torch, checkpoint files,
preparing an output folder without mixing two runs, the seeded checkpoint-per-epoch training
loop (:func:`record_run`) that writes ``run.json``, and evaluating in eval mode
(:func:`eval_mode`, :func:`evaluate_classifier`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_SUFFIX",
    "BatchLoss",
    "RecordedConfig",
    "checkpoint_path",
    "deterministic_torch",
    "eval_mode",
    "evaluate_classifier",
    "prepare_out_dir",
    "record_run",
    "save_checkpoint",
    "write_run_json",
]

#: checkpoint format -> file suffix
CHECKPOINT_SUFFIX = {"pt": ".pt", "safetensors": ".safetensors"}


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """Enable ``torch.use_deterministic_algorithms`` and restore the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def checkpoint_path(out_dir: Path, epoch: int, fmt: str) -> Path:
    return out_dir / f"epoch_{epoch:04d}{CHECKPOINT_SUFFIX[fmt]}"


def save_checkpoint(model: nn.Module, path: Path, fmt: str) -> None:
    """The model's full ``state_dict`` as ``.pt`` or ``.safetensors``."""
    state = model.state_dict()
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))


def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create ``out_dir``; refuse (or, with ``overwrite``, delete) checkpoints already there,
    since a shorter run would otherwise leave a mixed trajectory behind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p for suffix in CHECKPOINT_SUFFIX.values() for p in out.glob(f"epoch_*{suffix}"))
    if stale:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds {len(stale)} checkpoint file(s) such as "
                f"{stale[0].name}; pass overwrite=True to replace them"
            )
        for path in stale:
            path.unlink()
    return out


def write_run_json(
    out: Path,
    workflow: str,
    config: Any,
    model: nn.Module,
    n_train: int,
    n_test: int,
    checkpoints: list[str],
    records: list[dict[str, Any]],
    *,
    evaluator: str | None = None,
) -> dict[str, Any]:
    """Write and return ``run.json``: what ``cmd-pipeline evaluate`` and the studies read.

    ``evaluator`` is the ``module:function`` that ``cmd-pipeline evaluate`` calls with the run
    folder to score state_dicts; default: ``workflows.<workflow>:evaluator``.
    """
    result: dict[str, Any] = {
        "workflow": workflow,
        "evaluator": evaluator or f"{__package__}.{workflow}:evaluator",
        "config": asdict(config),
        "model_class": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train": n_train,
        "n_test": n_test,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "checkpoints": checkpoints,
        "epochs": records,
    }
    (out / "run.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore its previous train/eval mode on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class RecordedConfig(Protocol):
    """The fields of a workflow's ``TrainConfig`` that :func:`record_run` reads."""

    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def fmt(self) -> str: ...
    @property
    def record_initial(self) -> bool: ...


#: The mean loss of the training samples at the given indices, with autograd: what one
#: optimiser step minimises.
BatchLoss = Callable[[Tensor], Tensor]


def record_run(
    out: Path,
    workflow: str,
    config: RecordedConfig,
    setup: Callable[[], tuple[nn.Module, torch.optim.Optimizer, BatchLoss]],
    *,
    n_train: int,
    n_test: int,
    initial_train_loss: Callable[[nn.Module], float],
    test_metrics: Callable[[nn.Module], tuple[float, float]],
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train with one checkpoint per epoch, seeded and deterministic; write ``run.json``.

    Parameters
    ----------
    out : Path
        The folder from :func:`prepare_out_dir`.
    workflow : str
        The workflow's name, see :func:`write_run_json`.
    config : RecordedConfig
        The run's ``TrainConfig`` (a dataclass): ``seed``, ``fmt``, ``epochs``,
        ``batch_size`` and ``record_initial`` are used here.
    setup : callable
        Returns ``(model, optimizer, batch_loss)``; called once, right after
        ``torch.manual_seed(config.seed)``, so the model is initialised from that seed.
    n_train, n_test : int
        Sizes of the training and test sets (``batch_loss`` takes indices into
        ``range(n_train)``).
    initial_train_loss : callable
        The training loss recorded for epoch 0 (called only with ``record_initial``).
    test_metrics : callable
        ``(test loss, test accuracy)`` of the model, recorded after every epoch.
    on_epoch : callable, optional
        Called with each epoch's record right after it is written.

    Returns
    -------
    dict
        The content of ``run.json`` (see :func:`write_run_json`); every record of
        ``epochs`` is ``{"epoch", "checkpoint", "train_loss", "test_loss",
        "test_accuracy"}``, ``train_loss`` being the sample-weighted mean mini-batch
        loss of that epoch (train mode).

    Notes
    -----
    Everything runs inside :func:`torch.random.fork_rng` (the caller's global RNG state
    is left untouched) and :func:`deterministic_torch`. Each epoch visits the training
    samples in the order ``torch.randperm(n_train)`` drawn from a private generator
    seeded with ``config.seed``, in mini-batches of ``config.batch_size`` (the last may
    be smaller).
    """
    records: list[dict[str, Any]] = []
    checkpoints: list[str] = []

    def record(epoch: int, model: nn.Module, train_loss: float) -> None:
        path = checkpoint_path(out, epoch, config.fmt)
        save_checkpoint(model, path, config.fmt)
        test_loss, test_acc = test_metrics(model)
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
        model, optimizer, batch_loss = setup()
        shuffle_gen = torch.Generator().manual_seed(config.seed)

        if config.record_initial:
            record(0, model, initial_train_loss(model))

        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(n_train, generator=shuffle_gen)
            loss_sum = 0.0
            for start in range(0, n_train, config.batch_size):
                idx = order[start : start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = batch_loss(idx)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * int(idx.numel())
            record(epoch, model, loss_sum / n_train)

    return write_run_json(out, workflow, config, model, n_train, n_test, checkpoints, records)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float]:
    """Return the mean cross-entropy loss and the accuracy of ``model`` on ``(X, y)``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits. It is evaluated in eval mode; its previous
        train/eval mode is restored afterwards.
    X : Tensor
        Inputs, the whole set in one batch.
    y : Tensor
        Integer labels, ``(n,)``.

    Returns
    -------
    loss : float
        Mean cross-entropy.
    accuracy : float
        Fraction of correct argmax predictions, in ``[0, 1]``.
    """
    import torch.nn.functional as F

    with eval_mode(model):
        logits = model(X)
        loss = F.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    return float(loss), float(accuracy)

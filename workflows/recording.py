"""What every recorded training workflow shares: deterministic torch, checkpoint files,
preparing an output folder without mixing two runs, the seeded checkpoint-per-epoch training
loop (:func:`record_run`) that writes ``run.json``, evaluating in eval mode (:func:`eval_mode`,
:func:`evaluate_classifier`), and the pieces a workflow is made of: checking a configuration's
fields (:func:`check_fields`), a classifier's mini-batch loss (:func:`classifier_batch_loss`
on a :class:`TensorSplit`), and its public ``train_and_record`` and ``evaluator`` functions,
made from what is particular to the workflow (:func:`recorded_training`,
:func:`recorded_evaluator`)."""

from __future__ import annotations

import contextlib
import json
import textwrap
from collections.abc import Callable, Iterator, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_SUFFIX",
    "BatchLoss",
    "RecordedConfig",
    "TensorSplit",
    "TrainAndRecord",
    "check_fields",
    "checkpoint_path",
    "classifier_batch_loss",
    "deterministic_torch",
    "eval_mode",
    "evaluate_classifier",
    "prepare_out_dir",
    "record_run",
    "recorded_evaluator",
    "recorded_training",
    "save_checkpoint",
    "write_run_json",
]

#: checkpoint format -> file suffix
CHECKPOINT_SUFFIX = {"pt": ".pt", "safetensors": ".safetensors"}

#: range -> whether a value lies in it: the ranges :func:`check_fields` knows
_RANGES: dict[str, Callable[[Any], bool]] = {
    "'pt' or 'safetensors'": lambda v: v in CHECKPOINT_SUFFIX,
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
}


def check_fields(config: object, **ranges: str) -> None:
    """Check fields of a configuration against their ranges, in the order given.

    Parameters
    ----------
    config : object
        The configuration (a workflow's ``TrainConfig`` in its ``__post_init__``).
    **ranges : str
        Field name -> its range: ``"'pt' or 'safetensors'"`` (a checkpoint format, a key of
        :data:`CHECKPOINT_SUFFIX`), ``"> 0"``, ``">= 0"``, ``">= 1"`` or ``"in [0, 1)"``.

    Raises
    ------
    ValueError
        For the first field out of its range: ``"{name} must be {range}, got {value}"``
        (a string value shown with its quotes). NaN lies in no range.
    KeyError
        A range that is none of those above.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> check_fields(SimpleNamespace(fmt="pt", lr=0.1), fmt="'pt' or 'safetensors'", lr="> 0")
    >>> check_fields(SimpleNamespace(fmt="npz"), fmt="'pt' or 'safetensors'")
    Traceback (most recent call last):
    ...
    ValueError: fmt must be 'pt' or 'safetensors', got 'npz'
    """
    for name, allowed in ranges.items():
        value = getattr(config, name)
        if not _RANGES[allowed](value):
            shown = repr(value) if isinstance(value, str) else value
            raise ValueError(f"{name} must be {allowed}, got {shown}")


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
    with eval_mode(model):
        logits = model(X)
        loss = F.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    return float(loss), float(accuracy)


@dataclass(frozen=True)
class TensorSplit:
    """One split (training or test) of a classification data set, held whole in memory.

    Parameters
    ----------
    X : Tensor
        Inputs, one sample per row of the first axis.
    y : Tensor
        Integer labels, ``(n,)``.
    """

    X: Tensor
    y: Tensor

    def __len__(self) -> int:
        """The number of samples."""
        return int(self.X.shape[0])

    @classmethod
    def pair(
        cls, X_train: Tensor, y_train: Tensor, X_test: Tensor, y_test: Tensor
    ) -> tuple[TensorSplit, TensorSplit]:
        """The training and the test split of a loader's ``(X_train, y_train, X_test,
        y_test)``."""
        return cls(X_train, y_train), cls(X_test, y_test)


def classifier_batch_loss(
    model: nn.Module,
    train: TensorSplit,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    augment_seed: int = 0,
) -> BatchLoss:
    """The mean cross-entropy of ``model`` on training mini-batches, optionally augmented.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits.
    train : TensorSplit
        The training set; the loss takes indices into it.
    augment : callable, optional
        ``augment(inputs, generator)``: the transformed inputs of each mini-batch. Its
        generator is private, made here and seeded with ``augment_seed``, so that switching
        the augmentation on or off does not change the other random draws.
    augment_seed : int, default 0
        Seed of the augmentation's generator.

    Returns
    -------
    BatchLoss
        ``indices -> loss``, with autograd.
    """
    generator = torch.Generator().manual_seed(augment_seed)

    def batch_loss(idx: Tensor) -> Tensor:
        xb, yb = train.X[idx], train.y[idx]
        if augment is not None:
            xb = augment(xb, generator)
        return F.cross_entropy(model(xb), yb)

    return batch_loss


C = TypeVar("C", bound=RecordedConfig)
C_contra = TypeVar("C_contra", contravariant=True)
#: one split of a workflow's data set (its training or its test set)
S = TypeVar("S", bound=Sized)


class TrainAndRecord(Protocol[C_contra]):
    """A workflow's ``train_and_record(out_dir, config, *, on_epoch=None, overwrite=False)``,
    made by :func:`recorded_training`."""

    def __call__(
        self,
        out_dir: str | Path,
        config: C_contra,
        *,
        on_epoch: Callable[[dict[str, Any]], None] | None = ...,
        overwrite: bool = ...,
    ) -> dict[str, Any]: ...


_TRAIN_AND_RECORD_DOC = """{summary}

Parameters
----------
out_dir : str or Path
    Output directory (created if needed). Receives ``epoch_{{e:04d}}.pt`` or
    ``epoch_{{e:04d}}.safetensors`` (``config.fmt``) per recorded epoch, each the model's
    full ``state_dict``, and ``run.json``.
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
    The content of ``run.json``: ``workflow`` (``"{workflow}"``), ``evaluator``,
    ``config`` (the :class:`TrainConfig` as a dict), ``model_class``, ``n_params``,
    ``n_train``, ``n_test``, ``torch_version``, ``num_threads``, ``checkpoints``
    (file names in epoch order) and ``epochs``, a list of records ``{{"epoch",
    "checkpoint", "train_loss", "test_loss", "test_accuracy"}}``. ``train_loss`` is
    the sample-weighted mean mini-batch loss seen during that epoch (train mode: with
    dropout and augmentation where the run has them); for epoch 0 it is the loss of the
    initial weights on the whole training set, scored as the test set is (eval mode, no
    augmentation).

Notes
-----
Determinism: the model is built under ``torch.manual_seed(config.seed)`` inside
:func:`torch.random.fork_rng` (the caller's global RNG state is left untouched),
shuffling uses a private :class:`torch.Generator` seeded with ``config.seed``, and
training runs with ``torch.use_deterministic_algorithms(True)`` (the previous setting is
restored on exit). The number of intra-op threads is not changed; byte-identity is
guaranteed for the same torch build and thread count.

{notes}
"""


def recorded_training(
    workflow: str,
    load_data: Callable[[C], tuple[S, S]],
    setup: Callable[[C, S], tuple[nn.Module, torch.optim.Optimizer, BatchLoss]],
    evaluate: Callable[[nn.Module, S], tuple[float, float]],
    *,
    module: str,
    summary: str,
    notes: str,
) -> TrainAndRecord[C]:
    """A workflow's public ``train_and_record``, made from what is particular to it.

    Parameters
    ----------
    workflow : str
        The workflow's name, recorded in ``run.json`` (see :func:`write_run_json`).
    load_data : callable
        ``config -> (train, test)``: the run's training and test sets (anything with a
        ``len``), loaded after the output folder is prepared.
    setup : callable
        ``(config, train) -> (model, optimizer, batch_loss)``, see ``setup`` of
        :func:`record_run`.
    evaluate : callable
        ``(model, split) -> (loss, accuracy)`` in eval mode: the test metrics of every
        epoch, and the training loss of epoch 0.
    module : str
        The ``__name__`` of the module that defines ``train_and_record``.
    summary : str
        The first line of the docstring of ``train_and_record``.
    notes : str
        What the docstring's Notes say of this workflow besides the determinism that
        :func:`record_run` gives every workflow.

    Returns
    -------
    TrainAndRecord
        ``train_and_record(out_dir, config, *, on_epoch=None, overwrite=False)``, which
        prepares ``out_dir`` (:func:`prepare_out_dir`), loads the data and calls
        :func:`record_run`, with a full docstring.
    """

    def train_and_record(
        out_dir: str | Path,
        config: C,
        *,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        out = prepare_out_dir(out_dir, overwrite)
        train, test = load_data(config)
        return record_run(
            out,
            workflow,
            config,
            lambda: setup(config, train),
            n_train=len(train),
            n_test=len(test),
            initial_train_loss=lambda model: evaluate(model, train)[0],
            test_metrics=lambda model: evaluate(model, test),
            on_epoch=on_epoch,
        )

    train_and_record.__module__ = module
    train_and_record.__qualname__ = train_and_record.__name__
    train_and_record.__doc__ = _TRAIN_AND_RECORD_DOC.format(
        summary=summary,
        workflow=workflow,
        notes=textwrap.fill(notes, width=88),
    )
    return train_and_record


_EVALUATOR_DOC = """The test-set evaluation of a recorded run, for ``cmd-pipeline evaluate``.

Parameters
----------
run_dir : str or Path
    A folder written by the workflow's ``train_and_record`` (its ``run.json`` gives the
    config).

Returns
-------
callable
    Maps a full state_dict (loaded with ``strict=True``) to ``(test loss, test
    accuracy)``, exactly as recorded in ``run.json`` for the run's own checkpoints (same
    machine, torch build and thread count): the model is built from the recorded
    configuration and scored on the test set, rebuilt as in training, by
    :func:`~{module}.evaluate`.
"""


def recorded_evaluator(
    config_cls: Callable[..., C],
    build_model: Callable[[C], nn.Module],
    load_test: Callable[[C], S],
    evaluate: Callable[[nn.Module, S], tuple[float, float]],
    *,
    module: str,
) -> Callable[[str | Path], Callable[[dict[str, Tensor]], tuple[float, float]]]:
    """A workflow's public ``evaluator(run_dir)``, made from what is particular to it.

    Parameters
    ----------
    config_cls : callable
        The workflow's ``TrainConfig``, rebuilt from ``run.json``'s ``config``.
    build_model : callable
        ``config -> model``; the model's weights are then replaced by every scored
        ``state_dict``.
    load_test : callable
        ``config -> test``: the run's test set, rebuilt (after the model is built).
    evaluate : callable
        ``(model, test) -> (loss, accuracy)``: what training recorded for each epoch.
    module : str
        The ``__name__`` of the module that defines ``evaluator`` and the workflow's
        ``evaluate``.

    Returns
    -------
    callable
        ``evaluator(run_dir) -> score``, ``score(state_dict) -> (test loss, test
        accuracy)``, with a full docstring.
    """

    def evaluator(run_dir: str | Path) -> Callable[[dict[str, Tensor]], tuple[float, float]]:
        run = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
        config = config_cls(**run["config"])
        model = build_model(config)
        test = load_test(config)

        def score(state: dict[str, Tensor]) -> tuple[float, float]:
            model.load_state_dict(state, strict=True)
            return evaluate(model, test)

        return score

    evaluator.__module__ = module
    evaluator.__qualname__ = evaluator.__name__
    evaluator.__doc__ = _EVALUATOR_DOC.format(module=module)
    return evaluator

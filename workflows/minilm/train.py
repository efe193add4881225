"""The recorded MiniLM fine-tuning: one checkpoint per epoch and a ``run.json``.

Owns the optimiser set-up (:func:`_param_groups`) and the seeded, deterministic training
loop (:func:`train_and_record`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workflows.minilm.config import TrainConfig
from workflows.minilm.data import prepare_data
from workflows.minilm.evaluation import evaluate
from workflows.minilm.model import MiniLMClassifier, build_model
from workflows.recording import (
    checkpoint_path,
    deterministic_torch,
    prepare_out_dir,
    save_checkpoint,
    write_run_json,
)

__all__ = ["train_and_record"]


def _param_groups(model: MiniLMClassifier, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: encoder (decayed / not decayed) and head, trainable tensors only."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "head": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("head."):
            groups["head"].append(param)
        elif name.endswith("bias") or "LayerNorm" in name:
            groups["no_decay"].append(param)
        else:
            groups["decay"].append(param)
    return [
        {"params": groups["decay"], "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": groups["no_decay"], "lr": config.lr, "weight_decay": 0.0},
        {"params": groups["head"], "lr": config.head_lr, "weight_decay": 0.0},
    ]


def train_and_record(
    out_dir: str | Path,
    config: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune MiniLM on the docstring topics and save a checkpoint after every epoch.

    Parameters
    ----------
    out_dir : str or Path
        Output directory (created if needed). Receives ``epoch_{e:04d}.safetensors`` or
        ``epoch_{e:04d}.pt`` per recorded epoch and ``run.json``. Every checkpoint is
        the full ``state_dict`` of the :class:`MiniLMClassifier`.
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
        seen during that epoch (train mode, with dropout); for epoch 0 it is the loss of
        the initial weights on the whole training set in eval mode.

    Notes
    -----
    Determinism: the head is initialised under ``torch.manual_seed(config.seed)``
    inside :func:`torch.random.fork_rng` (the caller's global RNG state is left
    untouched; dropout also draws from that forked, seeded RNG), shuffling uses a
    private :class:`torch.Generator`, and training runs with
    ``torch.use_deterministic_algorithms(True)`` (the previous setting is restored on
    exit). The number of intra-op threads is not changed; byte-identity is guaranteed
    for the same torch build and thread count.
    """
    out = prepare_out_dir(out_dir, overwrite)

    train, test = prepare_data(config)
    n_train = len(train)

    records: list[dict[str, Any]] = []
    checkpoints: list[str] = []

    def record(epoch: int, model: nn.Module, train_loss: float) -> None:
        path = checkpoint_path(out, epoch, config.fmt)
        save_checkpoint(model, path, config.fmt)
        test_loss, test_acc = evaluate(model, test)
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
        model = build_model(config, pretrained=True)
        if config.freeze_embeddings:
            for param in model.encoder.embeddings.parameters():
                param.requires_grad_(False)
        optimizer = torch.optim.AdamW(_param_groups(model, config))
        shuffle_gen = torch.Generator().manual_seed(config.seed)

        if config.record_initial:
            record(0, model, evaluate(model, train)[0])

        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(n_train, generator=shuffle_gen)
            loss_sum = 0.0
            for start in range(0, n_train, config.batch_size):
                idx = order[start : start + config.batch_size]
                ids, mask, yb = train.batch(idx)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(ids, mask), yb)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * int(idx.numel())
            record(epoch, model, loss_sum / n_train)

    return write_run_json(out, "minilm", config, model, n_train, len(test), checkpoints, records)

"""The recorded MiniLM fine-tuning: one checkpoint per epoch and a ``run.json``.

Owns what is particular to the MiniLM run (tokenised data, the pretrained model, optional
frozen embeddings, AdamW with its parameter groups, :func:`_param_groups`); the seeded,
deterministic checkpoint-per-epoch loop itself is :func:`workflows.recording.record_run`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflows.minilm.config import TrainConfig
from workflows.minilm.data import prepare_data
from workflows.minilm.evaluation import evaluate
from workflows.minilm.model import MiniLMClassifier, build_model
from workflows.recording import BatchLoss, prepare_out_dir, record_run

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

    def setup() -> tuple[nn.Module, torch.optim.Optimizer, BatchLoss]:
        model = build_model(config, pretrained=True)
        if config.freeze_embeddings:
            for param in model.encoder.embeddings.parameters():  # type: ignore[union-attr]
                param.requires_grad_(False)
        optimizer = torch.optim.AdamW(_param_groups(model, config))

        def batch_loss(idx: Tensor) -> Tensor:
            ids, mask, yb = train.batch(idx)
            return F.cross_entropy(model(ids, mask), yb)

        return model, optimizer, batch_loss

    return record_run(
        out,
        "minilm",
        config,
        setup,
        n_train=len(train),
        n_test=len(test),
        initial_train_loss=lambda model: evaluate(model, train)[0],
        test_metrics=lambda model: evaluate(model, test),
        on_epoch=on_epoch,
    )

"""The recorded MiniLM fine-tuning: one checkpoint per epoch and a ``run.json``.

Owns what is particular to the MiniLM run (tokenised data, the pretrained model, optional
frozen embeddings, AdamW with its parameter groups, :func:`_param_groups`);
:func:`workflows.recording.recorded_training` makes :func:`train_and_record` of them around
the seeded, deterministic checkpoint-per-epoch loop, :func:`workflows.recording.record_run`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflows.minilm.config import TrainConfig
from workflows.minilm.data import EncodedSplit, prepare_data
from workflows.minilm.evaluation import evaluate
from workflows.minilm.model import MiniLMClassifier, build_model
from workflows.recording import BatchLoss, recorded_training

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


def _setup(
    config: TrainConfig, train: EncodedSplit
) -> tuple[nn.Module, torch.optim.Optimizer, BatchLoss]:
    """The pretrained classifier (embeddings frozen if asked), AdamW, and the batch loss."""
    model = build_model(config, pretrained=True)
    if config.freeze_embeddings:
        for param in model.encoder.embeddings.parameters():  # type: ignore[union-attr]
            param.requires_grad_(False)
    optimizer = torch.optim.AdamW(_param_groups(model, config))

    def batch_loss(idx: Tensor) -> Tensor:
        ids, mask, yb = train.batch(idx)
        return F.cross_entropy(model(ids, mask), yb)

    return model, optimizer, batch_loss


train_and_record = recorded_training(
    "minilm",
    prepare_data,
    _setup,
    evaluate,
    module=__name__,
    summary="Fine-tune MiniLM on the docstring topics and save a checkpoint after every epoch.",
    notes="Every checkpoint is a :class:`MiniLMClassifier`'s. The encoder starts from the "
    "pretrained weights; the head is drawn from ``config.seed``, and dropout draws from the "
    "same forked, seeded RNG.",
)

"""Online CMD, Embedded CMD, EMA and SWA on MNIST-1D (claims 7 and 8; 001's tables).

The protocol of :mod:`workflows.online_compare` (which runs it on the digits), on the MNIST-1D
workflow's data, model and optimiser:

- **run A** trains once; the optimiser's weights, the Online CMD weights
  (:class:`pipeline.online.OnlineCMD`) and an EMA of the weights (updated every step) are
  evaluated after every epoch of that one trajectory;
- **run B** is SWA (``AveragedModel`` + ``SWALR`` at the run's own learning rate), identical
  to run A until its first averaged epoch;
- **run C** is Embedded CMD (:class:`pipeline.online.EmbeddedCMD`): the live model, whose
  embedded parameters follow ``a r(t) + b``, is evaluated.

All three start from the same initialisation and batch order (the training seed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

from pipeline.online import EmbeddedCMD, OnlineCMD
from workflows.mnist1d import TrainConfig, build_model, build_optimizer, evaluate
from workflows.mnist1d.data import load_mnist1d_split

__all__ = ["METHODS", "run_online_seed"]

#: The methods of claims 7 and 8, in the order of the tables.
METHODS = ("baseline", "online_cmd", "ema", "swa", "embedded_cmd")

Data = tuple[Tensor, Tensor, Tensor, Tensor]


def _setup(cfg: TrainConfig) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    return model, build_optimizer(model, cfg), torch.Generator().manual_seed(cfg.seed)


def _epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Data,
    cfg: TrainConfig,
    shuffle: torch.Generator,
    after_step: Callable[[], None] | None = None,
) -> None:
    x, y = data[0], data[1]
    model.train()
    order = torch.randperm(len(x), generator=shuffle)
    for s in range(0, len(x), cfg.batch_size):
        idx = order[s : s + cfg.batch_size]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if after_step is not None:
            after_step()


def _score(model: nn.Module, data: Data) -> float:
    return evaluate(model, data[2], data[3])[1]


def _run_a(
    cfg: TrainConfig, data: Data, cmd_args: dict[str, Any], ema_decay: float
) -> dict[str, Any]:
    model, opt, shuffle = _setup(cfg)
    cmd = OnlineCMD(model, **cmd_args)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    probe = build_model(cfg)
    curves: dict[str, list[float]] = {"baseline": [], "online_cmd": [], "ema": []}
    for _ in range(cfg.epochs):
        _epoch(model, opt, data, cfg, shuffle, lambda: ema.update_parameters(model))
        cmd.update(model)
        curves["baseline"].append(_score(model, data))
        probe.load_state_dict(cmd.current_state_dict(), strict=True)
        curves["online_cmd"].append(_score(probe, data))
        curves["ema"].append(_score(ema.module, data))
    return {"curves": curves, "n_modes": cmd.n_modes}


def _run_swa(cfg: TrainConfig, data: Data, swa_start: int) -> list[float]:
    model, opt, shuffle = _setup(cfg)
    swa = AveragedModel(model)
    sched = SWALR(opt, swa_lr=cfg.lr, anneal_epochs=1)
    curve = []
    for epoch in range(1, cfg.epochs + 1):
        _epoch(model, opt, data, cfg, shuffle)
        if epoch >= swa_start:
            swa.update_parameters(model)
            sched.step()
            curve.append(_score(swa.module, data))
        else:
            curve.append(_score(model, data))
    return curve


def _run_embedded(
    cfg: TrainConfig, data: Data, cmd_args: dict[str, Any], every: int, fraction: float
) -> tuple[list[float], list[float]]:
    model, opt, shuffle = _setup(cfg)
    cmd = EmbeddedCMD(model, opt, embed_every=every, embed_fraction=fraction, **cmd_args)
    curve, embedded = [], []
    for _ in range(cfg.epochs):
        _epoch(model, opt, data, cfg, shuffle)
        cmd.update(model)
        curve.append(_score(model, data))
        embedded.append(cmd.fraction_embedded)
    return curve, embedded


def run_online_seed(
    cfg: TrainConfig,
    *,
    warmup: int,
    modes: int,
    samples: int,
    embed_every: int,
    embed_fraction: float,
    ema_decay: float,
    swa_start: float,
) -> dict[str, Any]:
    """Runs A, B and C on one training seed; per method, the test accuracy after every epoch.

    Returns ``{"curves": {method: [accuracy per epoch 1..E]}, "embedded": [fraction per
    epoch], "n_modes": M found by Online CMD, "swa_start": first averaged epoch}``.
    """
    data = load_mnist1d_split(cfg.n_train, cfg.n_test, cfg.data_seed)
    cmd_args = {"warmup": warmup, "modes": modes, "samples": samples, "seed": 0}
    first_swa = max(1, round(swa_start * cfg.epochs))
    with torch.random.fork_rng(devices=[]):
        a = _run_a(cfg, data, cmd_args, ema_decay)
        a["curves"]["swa"] = _run_swa(cfg, data, first_swa)
        a["curves"]["embedded_cmd"], embedded = _run_embedded(
            cfg, data, cmd_args, embed_every, embed_fraction
        )
    return {
        "curves": a["curves"],
        "embedded": embedded,
        "n_modes": a["n_modes"],
        "swa_start": first_swa,
    }

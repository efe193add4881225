"""Online CMD's warm-up sampling behind a frozen backbone: K varying parameters are sampled
whenever K vary (on main, rejection sampling returned far fewer, silently)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pipeline
from pipeline.kernels.cmd import FLAG_CONSTANT
from pipeline.online import OnlineCMD


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(40, 40) for _ in range(12)], nn.Linear(40, 3))
    for layer in list(model)[:-1]:  # a frozen backbone of 12 x 1,640 parameters
        layer.requires_grad_(False)
    return model


def _train(cmd: OnlineCMD, model: nn.Module, epochs: int) -> None:
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(64, 40, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        cmd.update(model)


def test_warmup_samples_k_varying_parameters_behind_a_frozen_backbone() -> None:
    model = _model()
    cmd = OnlineCMD(model, warmup=5, modes=3, samples=100, seed=0)
    _train(cmd, model, 6)
    assert cmd.sample_index is not None and cmd.flags is not None
    head0 = cmd.offsets[-2]  # the trained head's weight and bias
    assert cmd.sample_index.size == 100 == np.unique(cmd.sample_index).size
    assert np.all(cmd.sample_index >= head0)
    assert not np.any(cmd.flags[cmd.sample_index] & FLAG_CONSTANT)
    assert cmd.n_varying == 123


def test_warmup_says_when_fewer_than_k_vary() -> None:
    model = _model()
    cmd = OnlineCMD(model, warmup=5, modes=3, samples=500, seed=0)
    with pytest.warns(pipeline.PipelineWarning, match="only 123 parameters vary"):
        _train(cmd, model, 5)
    assert cmd.sample_index is not None and cmd.sample_index.size == 123

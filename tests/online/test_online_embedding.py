"""Embedded CMD never embeds a parameter that did not move during the warm-up.

A layer frozen during the warm-up (its fit: FLAG_CONSTANT, a = 0, b = its value) and unfrozen
afterwards would otherwise look like the best candidate (its fit barely changes) and be pinned to
its warm-up value for good.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.kernels.cmd import FLAG_CONSTANT
from pipeline.online import EmbeddedCMD


def _flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def test_a_layer_frozen_during_the_warmup_is_not_embedded_and_keeps_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = torch.randn(96, 3, generator=g)
    frozen = model[2]
    for p in frozen.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    warmup = 3
    cmd = EmbeddedCMD(
        model, opt, warmup=warmup, modes=2, samples=40, embed_every=1, embed_fraction=0.5
    )

    def epoch() -> None:
        for s in range(0, len(x), 16):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[s : s + 16]), y[s : s + 16]).backward()
            opt.step()
        cmd.update(model)

    for _ in range(warmup):
        epoch()
    n0 = model[0].weight.numel() + model[0].bias.numel()
    layer = np.arange(n0, cmd.n_params)  # the frozen layer's rows
    assert cmd.flags is not None and np.all(cmd.flags[layer] & FLAG_CONSTANT)
    for p in frozen.parameters():
        p.requires_grad_(True)
    for _ in range(6):
        before = _flat(model)
        epoch()
    after = _flat(model)
    # the other layer is being embedded (1 - 0.5^6 of its non-reference rows), this one is not
    assert cmd.embedded[:n0].mean() > 0.5
    assert not cmd.embedded[layer].any()
    # and every one of its weights is still trained
    assert np.all(after[layer] != before[layer])

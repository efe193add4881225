"""``OnlineCMD.memory_bytes`` counts everything it holds after the warm-up, exactly.

Per parameter: two float64 running sums (16 B), the mode id (1 B up to 256 modes) and the flags
(1 B): 18 B. During the warm-up: the recorded history, 4 B per parameter and epoch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.online import OnlineCMD


def test_memory_bytes_is_18_bytes_per_parameter_after_the_warmup() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 2))
    n = sum(p.numel() for p in model.parameters())
    cmd = OnlineCMD(model, warmup=3, modes=2, samples=30, seed=0)
    rng = np.random.default_rng(0)
    seen = []
    for epoch in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.from_numpy(rng.normal(size=p.shape).astype(np.float32)))
        cmd.update(model)
        if not cmd.ready:
            assert cmd.memory_bytes() == 4 * n * (epoch + 1)
            continue
        assert cmd.fit is not None and cmd.flags is not None
        held = (
            cmd.fit.mean_w.nbytes + cmd.fit.c_rw.nbytes + cmd.fit.mode.nbytes + cmd.flags.nbytes
        )
        assert cmd.memory_bytes() == held
        seen.append(cmd.memory_bytes())
    assert seen == [18 * n] * 5

"""Online CMD with ``store=`` against the in-memory sums, for odd and even warm-ups.

The store backend double-buffers its running sums by the parity of the epoch count; the
warm-up's sums must land in the slot the readers pick (``warmup % 2``), whatever the parity of
the warm-up. Also: the warm-up minimum (3 epochs, as the post-hoc fit needs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pipeline
from pipeline.online import EmbeddedCMD, OnlineCMD


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _trajectory(n: int, epochs: int, seed: int) -> np.ndarray:
    """(epochs, n) float32: three noisy affine modes of distinct time profiles."""
    rng = np.random.default_rng(seed)
    t = np.arange(epochs, dtype=np.float64)
    prof = np.stack([np.sqrt(t + 1), np.sin(0.7 * t) + 0.1 * t, np.exp(-0.3 * t)])
    mode = rng.integers(0, 3, n)
    a = rng.normal(size=n)
    b = rng.normal(size=n)
    w = a[None, :] * prof[mode].T + b[None, :] + 0.05 * rng.normal(size=(epochs, n))
    return w.astype(np.float32)


def _set(model: nn.Module, w: np.ndarray) -> None:
    with torch.no_grad():
        off = 0
        for p in model.parameters():
            p.copy_(torch.from_numpy(w[off : off + p.numel()]).reshape(p.shape))
            off += p.numel()


@pytest.mark.parametrize("warmup", [3, 4, 5, 6])
def test_store_backed_equals_in_memory_odd_and_even_warmup(tmp_path, warmup: int) -> None:
    model = _model()
    n = sum(p.numel() for p in model.parameters())
    traj = _trajectory(n, warmup + 4, seed=warmup)
    sync = pipeline.RuntimeOptions(mode="sync", progress=False)
    mem = OnlineCMD(model, warmup=warmup, modes=3, samples=40, seed=0)
    url = str(tmp_path / "online.zarr")
    kw = {"warmup": warmup, "modes": 3, "samples": 40, "seed": 0}
    with OnlineCMD(model, store=url, runtime=sync, **kw) as big:
        assert big.store is not None
        big.store.block_rows = 16  # several blocks per update
        checked = 0
        for w in traj:
            _set(model, w)
            mem.update(model)
            big.update(model)
            assert big.ready == mem.ready
            if not mem.ready:
                continue
            assert np.array_equal(big.ref_index, mem.ref_index)
            a1, b1 = mem.coefficients()
            a2, b2 = big.coefficients()
            scale_a = np.abs(a1).max()
            scale_b = np.abs(b1).max()
            assert np.max(np.abs(a2 - a1)) <= 1e-9 * scale_a, (warmup, big.epoch)
            assert np.max(np.abs(b2 - b1)) <= 1e-9 * scale_b, (warmup, big.epoch)
            v1, v2 = mem.cmd_vector(), big.cmd_vector()
            np.testing.assert_allclose(v2, v1, rtol=1e-6, atol=1e-6 * np.abs(v1).max())
            checked += 1
    assert checked == 5  # the epoch that ends the warm-up and 4 after it


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_warmup_minimum_is_three(warmup: int) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="warmup must be at least 3"):
        OnlineCMD(model, warmup=warmup, modes=2)
    with pytest.raises(ValueError, match="warmup must be at least 3"):
        EmbeddedCMD(model, opt, warmup=warmup, modes=2)
    OnlineCMD(model, warmup=3, modes=2)  # the minimum itself is accepted

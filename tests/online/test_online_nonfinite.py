"""Online and Embedded CMD: the NaN/Inf policy.

- a parameter that turns NaN/Inf is flagged (FLAG_NONFINITE), keeps its last finite fit, and
  its running sums never absorb the value: every other parameter's fit is what it would have
  been without the NaN (its mode is not poisoned);
- each such update warns (PipelineWarning, naming the count and the epoch) and counts;
- a parameter with NaN/Inf during the warm-up has no fit: it is held at its last finite value;
- a reference that turns non-finite stops the update with an error naming the tensor, the
  element and the epoch ("training diverged"), and leaves the state as it was;
- the store backend follows the same policy and gives the same numbers;
- Embedded CMD never writes a non-finite value into the model.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import pipeline
from pipeline.errors import PipelineError, PipelineWarning
from pipeline.kernels.cmd import FLAG_NONFINITE
from pipeline.online import EmbeddedCMD, OnlineCMD

WARMUP = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _trajectory(n: int, epochs: int, seed: int = 0) -> np.ndarray:
    """(epochs, n) float64 (float32 values): three noisy affine modes."""
    rng = np.random.default_rng(seed)
    t = np.arange(epochs, dtype=np.float64)
    prof = np.stack([np.sqrt(t + 1), np.sin(0.7 * t) + 0.1 * t, np.exp(-0.3 * t)])
    mode = rng.integers(0, 3, n)
    w = rng.normal(size=n) * prof[mode].T + rng.normal(size=n) + 0.05 * rng.normal(size=(epochs, n))
    return w.astype(np.float32).astype(np.float64)


def _set(model: nn.Module, w: np.ndarray) -> None:
    with torch.no_grad():
        off = 0
        for p in model.parameters():
            p.copy_(torch.from_numpy(w[off : off + p.numel()].astype(np.float32)).reshape(p.shape))
            off += p.numel()


def _lstsq(h: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    """Least squares of one profile ``h`` against ``r`` and a constant (numpy lstsq)."""
    design = np.stack([r, np.ones_like(r)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, h, rcond=None)
    return float(a), float(b)


def _where(model: nn.Module, i: int) -> tuple[str, tuple[int, ...]]:
    off = 0
    for name, p in model.named_parameters():
        if i < off + p.numel():
            return name, tuple(int(j) for j in np.unravel_index(i - off, p.shape))
        off += p.numel()
    raise AssertionError(i)


def _two_non_references(cmd: OnlineCMD) -> tuple[int, int]:
    assert cmd.ref_index is not None and cmd.fit is not None
    mode0 = int(cmd.fit.mode[cmd.ref_index[0]])  # both in the mode of the first reference
    cand = [i for i in np.flatnonzero(cmd.fit.mode == mode0) if i not in set(cmd.ref_index)]
    return int(cand[0]), int(cand[1])


def test_nan_after_the_warmup_is_flagged_held_and_does_not_poison_its_mode() -> None:
    model = _model()
    n = _n(model)
    traj = _trajectory(n, 9)
    clean = OnlineCMD(model, warmup=WARMUP, modes=3, samples=40, seed=0)
    cmd = OnlineCMD(model, warmup=WARMUP, modes=3, samples=40, seed=0)
    bad: tuple[int, int] | None = None
    before: tuple[np.ndarray, np.ndarray] | None = None
    for t, w in enumerate(traj):
        epoch = t + 1
        _set(model, w)
        clean.update(model)
        if epoch < 6:
            cmd.update(model)
            continue
        if bad is None:
            bad = _two_non_references(cmd)
            before = cmd.coefficients()
        poisoned = w.copy()
        poisoned[bad[0]] = np.nan
        poisoned[bad[1]] = np.inf
        _set(model, poisoned)
        with pytest.warns(PipelineWarning, match=rf"epoch {epoch}\b.*\b2 parameter"):
            cmd.update(model)
    assert bad is not None and before is not None and cmd.flags is not None
    i, j = bad
    # flagged, counted per epoch, held at the fit over the finite epochs 1..5
    assert cmd.flags[i] & FLAG_NONFINITE and cmd.flags[j] & FLAG_NONFINITE
    assert int(np.count_nonzero(cmd.flags & FLAG_NONFINITE)) == 2
    assert cmd.nonfinite_counts == {6: 2, 7: 2, 8: 2, 9: 2}
    assert np.array_equal(cmd.nonfinite_index, np.array(sorted(bad)))
    a, b = cmd.coefficients()
    assert a[i] == before[0][i] and b[i] == before[1][i]
    assert a[j] == before[0][j] and b[j] == before[1][j]
    assert cmd.ref_index is not None and cmd.fit is not None
    r = traj[:5, cmd.ref_index[cmd.fit.mode[i]]]
    want_a, want_b = _lstsq(traj[:5, i], r)
    assert a[i] == pytest.approx(want_a, rel=1e-9) and b[i] == pytest.approx(want_b, rel=1e-9)
    # no other parameter noticed: the same sums, bit for bit, as without the NaN
    ca, cb = clean.coefficients()
    others = np.setdiff1d(np.arange(n), [i, j])
    assert np.array_equal(a[others], ca[others]) and np.array_equal(b[others], cb[others])
    assert np.isfinite(cmd.fit.mean_w).all() and np.isfinite(cmd.fit.c_rw).all()
    v = cmd.cmd_vector()
    assert np.isfinite(v).all()
    r_now = traj[-1, cmd.ref_index]
    assert v[i] == np.float32(a[i] * r_now[cmd.fit.mode[i]] + b[i])
    sd = cmd.current_state_dict()
    assert all(torch.isfinite(t).all() for t in sd.values())


def test_a_non_finite_reference_stops_with_training_diverged() -> None:
    model = _model()
    n = _n(model)
    traj = _trajectory(n, 6)
    cmd = OnlineCMD(model, warmup=WARMUP, modes=3, samples=40, seed=0)
    for w in traj[:4]:
        _set(model, w)
        cmd.update(model)
    assert cmd.ref_index is not None
    ref = int(cmd.ref_index[-1])
    name, index = _where(model, ref)
    a0, b0 = cmd.coefficients()
    w = traj[4].copy()
    w[ref] = np.nan
    _set(model, w)
    with pytest.raises(PipelineError, match="training diverged") as err:
        cmd.update(model)
    msg = str(err.value)
    assert f"{name}[{', '.join(map(str, index))}]" in msg and re.search(r"epoch 5\b", msg), msg
    # nothing was added: the state is the one of epoch 4, and a finite epoch 5 goes through
    assert cmd.epoch == 4
    a1, b1 = cmd.coefficients()
    assert np.array_equal(a0, a1) and np.array_equal(b0, b1)
    _set(model, traj[4])
    cmd.update(model)
    assert cmd.epoch == 5 and np.isfinite(cmd.cmd_vector()).all()


def test_nan_during_the_warmup_is_held_at_its_last_finite_value() -> None:
    model = _model()
    n = _n(model)
    traj = _trajectory(n, 6)
    cmd = OnlineCMD(model, warmup=4, modes=3, samples=40, seed=0)
    k = 7
    for t, w in enumerate(traj):
        w = w.copy()
        if t == 2:
            w[k] = np.nan
        _set(model, w)
        if t == 2:
            with pytest.warns(PipelineWarning, match=r"epoch 3\b.*\b1 parameter"):
                cmd.update(model)
        else:
            cmd.update(model)
    assert cmd.flags is not None and cmd.fit is not None
    assert cmd.flags[k] & FLAG_NONFINITE and cmd.nonfinite_counts == {3: 1}
    a, b = cmd.coefficients()
    # no finite fit over the warm-up: a = 0, b = its last finite warm-up value (epoch 4)
    assert a[k] == 0.0 and b[k] == np.float64(np.float32(traj[3, k]))
    assert np.isfinite(cmd.fit.mean_w).all() and np.isfinite(cmd.fit.c_rw).all()
    v = cmd.cmd_vector()
    assert np.isfinite(v).all() and v[k] == np.float32(traj[3, k])


def test_store_backend_follows_the_same_policy(tmp_path) -> None:
    model = _model()
    n = _n(model)
    traj = _trajectory(n, 8)
    k_warm = 5  # NaN at warm-up epoch 2
    sync = pipeline.RuntimeOptions(mode="sync", progress=False)
    mem = OnlineCMD(model, warmup=WARMUP, modes=3, samples=40, seed=0)
    url = str(tmp_path / "online.zarr")
    kw = {"warmup": WARMUP, "modes": 3, "samples": 40, "seed": 0}
    with OnlineCMD(model, store=url, runtime=sync, **kw) as big:
        assert big.store is not None
        big.store.block_rows = 16
        bad: int | None = None
        for t, w in enumerate(traj):
            epoch = t + 1
            w = w.copy()
            if epoch == 2:
                w[k_warm] = np.inf
            if epoch >= 5:
                if bad is None:
                    bad = _two_non_references(mem)[0]
                w[bad] = np.nan
            _set(model, w)
            if epoch == 2 or epoch >= 5:
                with pytest.warns(PipelineWarning, match=rf"epoch {epoch}\b.*\b1 parameter"):
                    mem.update(model)
                with pytest.warns(PipelineWarning, match=rf"epoch {epoch}\b.*\b1 parameter"):
                    big.update(model)
            else:
                mem.update(model)
                big.update(model)
            if not mem.ready:
                continue
            a1, b1 = mem.coefficients()
            a2, b2 = big.coefficients()
            np.testing.assert_allclose(a2, a1, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(b2, b1, rtol=1e-9, atol=1e-12)
            v = big.cmd_vector()
            assert np.isfinite(v).all()
            np.testing.assert_allclose(v, mem.cmd_vector(), rtol=1e-6, atol=1e-6)
        assert bad is not None
        assert np.array_equal(big.nonfinite_index, np.array(sorted([k_warm, bad])))
        assert np.array_equal(big.nonfinite_index, mem.nonfinite_index)
        assert big.nonfinite_counts == mem.nonfinite_counts == {2: 1, 5: 1, 6: 1, 7: 1, 8: 1}
        # the store's sums never absorbed the NaN/Inf
        import zarr

        for name in ("mean_w_0", "mean_w_1", "c_rw_0", "c_rw_1"):
            assert np.isfinite(zarr.open_array(url, path=f"online/{name}", mode="r")[...]).all()
        flags = zarr.open_array(url, path="online/flags", mode="r")[...]
        assert np.array_equal(np.flatnonzero(flags & FLAG_NONFINITE), big.nonfinite_index)


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    for s in range(0, len(x), 16):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[s : s + 16]), y[s : s + 16]).backward()
        opt.step()


def test_embedded_cmd_never_writes_a_non_finite_value() -> None:
    model = _model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = torch.randn(64, 3, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cmd = EmbeddedCMD(
        model, opt, warmup=WARMUP, modes=2, samples=40, embed_every=1, embed_fraction=0.5
    )
    for _ in range(WARMUP + 2):
        _train(model, opt, x, y)
        cmd.update(model)
    assert cmd.embedded.any() and cmd.ref_index is not None and cmd.fit is not None
    emb = int(np.flatnonzero(cmd.embedded)[0])
    free = int(np.flatnonzero(~cmd.embedded & ~np.isin(np.arange(cmd.n_params), cmd.ref_index))[0])
    params = list(model.parameters())

    def put(i: int, value: float) -> None:
        name, index = _where(model, i)
        with torch.no_grad():
            dict(model.named_parameters())[name][index] = value

    _train(model, opt, x, y)
    put(emb, float("nan"))
    put(free, float("nan"))
    with pytest.warns(PipelineWarning, match=r"\b2 parameter"):
        cmd.update(model)
    assert cmd.flags is not None
    assert cmd.flags[emb] & FLAG_NONFINITE and cmd.flags[free] & FLAG_NONFINITE
    assert cmd.embedded[emb] and not cmd.embedded[free]  # a flagged parameter is never embedded
    cmd.apply()  # puts the embedded one back on its (finite) a r + b
    w = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    assert np.isfinite(w[cmd.embedded]).all()
    assert np.isfinite(cmd.cmd_vector()).all()
    # a reference turning NaN mid-epoch: apply() leaves that mode's embedded parameters as they
    # were instead of writing NaN into them
    ref = int(cmd.ref_index[cmd.fit.mode[emb]])
    before = w.copy()
    put(ref, float("nan"))
    cmd.apply()
    w = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    same_mode = cmd.embedded & (cmd.fit.mode == cmd.fit.mode[emb])
    assert same_mode.any() and np.isfinite(w[cmd.embedded]).all()
    assert np.array_equal(w[same_mode], before[same_mode])
    with pytest.raises(PipelineError, match="training diverged"):
        cmd.update(model)

"""Online CMD and Embedded CMD in a real training loop (digits MLP and CNN).

- after every epoch past the warm-up, (a, b) equal a dense float64 batch refit over the same
  window with the same modes and references, to float32 rounding;
- the warm-up's fit equals the post-hoc kernel's on the warm-up window;
- ``current_state_dict`` never changes the model, and loads with strict=True;
- memory after the warm-up is O(N) and does not grow with the epochs;
- Embedded CMD: the embedded fraction grows, references are never embedded, embedded
  parameters get zero gradients and optimiser state and follow a * r(t) + b exactly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.kernels.cmd import FLAG_CONSTANT, References, fit_block
from pipeline.online import EmbeddedCMD, OnlineCMD
from workflows.digits import MLP, SimpleCNN, evaluate, load_digits_split


def _batches(n: int, bs: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for s in range(0, n, bs):
        yield order[s : s + bs]


def _train_epoch(model, opt, x, y, gen, bs=64) -> None:
    model.train()
    for idx in _batches(len(x), bs, gen):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def _flat(model) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().astype(np.float64)


def _batch_refit(hist: np.ndarray, ref_index: np.ndarray, mode: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense float64 least squares of every row against its mode's reference over the window."""
    r = hist[ref_index]  # (M, T)
    rc = r - r.mean(axis=1, keepdims=True)
    wc = hist - hist.mean(axis=1, keepdims=True)
    q = (rc * rc).sum(axis=1)
    cov = (wc * rc[mode]).sum(axis=1)
    a = np.where(q[mode] > 0, cov / np.where(q[mode] > 0, q[mode], 1), 0.0)
    b = hist.mean(axis=1) - a * r.mean(axis=1)[mode]
    a[ref_index], b[ref_index] = 1.0, 0.0
    return a, b


@pytest.fixture(scope="module")
def data():
    return load_digits_split(0)


def test_online_equals_batch_refit_every_epoch(data) -> None:
    xtr, ytr, xte, yte = data
    torch.manual_seed(0)
    model = MLP(hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    cmd = OnlineCMD(model, warmup=5, modes=4, samples=300, seed=0)
    hist = []
    mem = []
    for epoch in range(14):
        _train_epoch(model, opt, xtr, ytr, gen)
        before = [p.detach().clone() for p in model.parameters()]
        cmd.update(model)
        hist.append(_flat(model))
        if not cmd.ready:
            assert epoch + 1 < 5
            sd = cmd.current_state_dict()  # during the warm-up: the model's own weights
            assert all(torch.equal(sd[n], p) for n, p in model.named_parameters())
            continue
        h = np.stack(hist, axis=1)
        assert cmd.fit is not None and cmd.ref_index is not None
        want_a, want_b = _batch_refit(h, cmd.ref_index, cmd.fit.mode)
        a, b = cmd.coefficients()
        scale = np.abs(h).max(axis=1) + 1e-30
        # to float32 rounding of the weights (the inputs), relative to each row's scale
        assert np.all(np.abs(b - want_b) <= 1e-6 * scale), epoch
        r_span = np.ptp(h[cmd.ref_index], axis=1)[cmd.fit.mode] + 1e-30
        assert np.all(np.abs(a - want_a) * r_span <= 1e-6 * scale), epoch
        # the CMD weights: a new state_dict; the model is untouched
        sd = cmd.current_state_dict()
        for p, q in zip(model.parameters(), before, strict=True):
            assert torch.equal(p.detach(), q)
        fresh = MLP(hidden=32)
        fresh.load_state_dict(sd, strict=True)
        r_now = h[cmd.ref_index, -1]
        np.testing.assert_allclose(_flat(fresh), (a * r_now[cmd.fit.mode] + b).astype(np.float32), rtol=0, atol=0)
        mem.append(cmd.memory_bytes())
    n = cmd.n_params
    assert len(set(mem)) == 1 and mem[0] == 18 * n  # O(N): two float64 sums, uint8 mode and flags
    _, acc = evaluate(fresh, xte, yte)
    assert acc > 0.8


def test_warmup_fit_matches_the_post_hoc_kernel(data) -> None:
    xtr, ytr, _, _ = data
    torch.manual_seed(1)
    model = SimpleCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    cmd = OnlineCMD(model, warmup=4, modes=3, samples=200, seed=3)
    hist = []
    for _ in range(4):
        _train_epoch(model, opt, xtr, ytr, gen)
        cmd.update()
        hist.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy())
    assert cmd.ready and cmd.n_modes == 3
    h = np.stack(hist, axis=1)
    assert cmd.ref_index is not None
    bf = fit_block(h, References.from_profiles(h[cmd.ref_index].astype(np.float64)), (cmd.ref_index, np.arange(3)))
    a, b = cmd.coefficients()
    assert np.array_equal(cmd.fit.mode, bf.mode)  # type: ignore[union-attr]
    const = (bf.flags & 1) != 0
    assert np.array_equal(b[const], bf.b[const])  # constant parameters: exact
    np.testing.assert_allclose(a, bf.a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b, bf.b, rtol=1e-9, atol=1e-12)


def test_bad_arguments() -> None:
    m = MLP(hidden=4)
    with pytest.raises(ValueError, match="warmup"):
        OnlineCMD(m, warmup=1)
    with pytest.raises(ValueError, match="exactly one"):
        OnlineCMD(m, modes=None)
    cmd = OnlineCMD(m, warmup=3)
    with pytest.raises(RuntimeError, match="warming up"):
        cmd.coefficients()
    with pytest.raises(ValueError, match="parameters"):
        cmd.update(MLP(hidden=5))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="embed_fraction"):
        EmbeddedCMD(m, opt, embed_fraction=0)


def test_embedded_cmd(data) -> None:
    xtr, ytr, xte, yte = data
    torch.manual_seed(2)
    model = MLP(hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(2)
    cmd = EmbeddedCMD(model, opt, warmup=4, modes=4, samples=300, seed=0, embed_every=2, embed_fraction=0.3)
    for _ in range(14):
        _train_epoch(model, opt, xtr, ytr, gen)
        cmd.update()
    fr = [h["embedded"] for h in cmd.history]
    assert fr[:5] == [0.0] * 5 and all(b >= a for a, b in itertools.pairwise(fr))
    # 5 checks (epochs 6, 8, ..., 14), each embedding 30% of the rest
    assert fr[-1] == pytest.approx(1 - 0.7**5, abs=0.01)
    assert cmd.ref_index is not None and not cmd.embedded[cmd.ref_index].any()
    # one more step: embedded parameters get no gradient, no optimiser state, and sit on a r + b
    opt.zero_grad()
    idx = torch.arange(64)
    F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
    for p, mask in zip(cmd._params, cmd._masks, strict=True):
        assert p.grad is not None and torch.all(p.grad[mask] == 0)
    opt.step()
    for p, mask in zip(cmd._params, cmd._masks, strict=True):
        assert torch.all(opt.state[p]["momentum_buffer"][mask] == 0)
    w = _flat(model)
    e = cmd.embedded
    assert cmd.fit is not None
    r = w[cmd.ref_index]
    want = (cmd.a_frozen[e] * r[cmd.fit.mode[e]] + cmd.b_frozen[e]).astype(np.float32)
    assert np.array_equal(w[e].astype(np.float32), want)
    # the embedded model still classifies
    _, acc = evaluate(model, xte, yte)
    assert acc > 0.8
    cmd.remove()
    assert not cmd.embedded.any()


def test_store_backed_equals_in_memory(data, tmp_path, monkeypatch) -> None:
    """The running sums in a Zarr store, updated by Dask tasks block by block, give the same
    fit as the in-memory sums; an update that fails midway leaves the previous epoch intact and
    simply runs again."""
    import pipeline
    import pipeline.graph.online as online_graph

    xtr, ytr, _, _ = data
    torch.manual_seed(3)
    model = MLP(hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    mem = OnlineCMD(model, warmup=4, modes=4, samples=300, seed=0)
    url = str(tmp_path / "online.zarr")
    threads = pipeline.RuntimeOptions(mode="threads", progress=False)
    with OnlineCMD(model, warmup=4, modes=4, samples=300, seed=0, store=url, runtime=threads) as big:
        # small blocks, so an update is many tasks
        big.store.block_rows = 1000  # type: ignore[union-attr]
        for epoch in range(10):
            _train_epoch(model, opt, xtr, ytr, gen)
            mem.update(model)
            if epoch == 6:  # one block fails once: the update raises, then succeeds when re-run
                real = online_graph.update_task
                calls = {"n": 0}

                def flaky(url, r0, r1, dr, n1, calls=calls, real=real):
                    calls["n"] += 1
                    if r0 == 2000 and calls["n"] < 100:
                        calls["n"] = 100
                        raise OSError("disk hiccup")
                    real(url, r0, r1, dr, n1)

                monkeypatch.setattr(online_graph, "update_task", flaky)
                with pytest.raises(OSError, match="disk hiccup"):
                    big.update(model)
                assert big.epoch == mem.epoch - 1
            big.update(model)
            assert big.epoch == mem.epoch and big.ready == mem.ready
            if not mem.ready:
                continue
            assert np.array_equal(big.ref_index, mem.ref_index)
            a1, b1 = mem.coefficients()
            a2, b2 = big.coefficients()
            np.testing.assert_allclose(a2, a1, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(b2, b1, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(big.cmd_vector(), mem.cmd_vector(), rtol=1e-6, atol=1e-7)
            assert big.memory_bytes() < 1000  # only the per-mode statistics stay in memory
    # the warm-up is an ordinary store: info works, and the post-hoc study is there
    info = pipeline.info(url)
    assert info["n_epochs"] == 4 and "online-warmup" in info["analyses"]


def test_lightning_callback() -> None:
    from pipeline.online import lightning_callback

    model = MLP(hidden=4)
    cmd = OnlineCMD(model, warmup=3, modes=1, samples=10)
    try:
        import lightning  # noqa: F401
    except ImportError:
        try:
            import pytorch_lightning  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="needs lightning"):
                lightning_callback(cmd)
            pytest.skip("lightning is not installed")
    cb = lightning_callback(cmd)
    cb.on_train_epoch_end(None, model)
    assert cmd.epoch == 1


def test_embedded_with_frozen_and_channels_last_parameters(data) -> None:
    """A frozen parameter (requires_grad=False) and non-contiguous (channels_last) weights."""
    xtr, ytr, _, _ = data
    torch.manual_seed(4)
    model = SimpleCNN().to(memory_format=torch.channels_last)
    model.fc2.bias.requires_grad_(False)
    assert not model.conv2.weight.is_contiguous()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(4)
    cmd = EmbeddedCMD(model, opt, warmup=3, modes=3, samples=200, embed_every=1, embed_fraction=0.5)
    for _ in range(6):
        _train_epoch(model, opt, xtr, ytr, gen)
        cmd.update()
    # 3 checks of 50%: 7/8 of the parameters that can be embedded; never a reference, nor a
    # parameter constant over the warm-up (the frozen bias, dead units)
    assert cmd.flags is not None and cmd.ref_index is not None
    eligible = (cmd.flags & FLAG_CONSTANT) == 0
    eligible[cmd.ref_index] = False
    assert cmd.embedded[eligible].mean() == pytest.approx(0.875, abs=0.01)
    assert not cmd.embedded[~eligible].any()
    names = [n for n, _ in model.named_parameters()]
    start = sum(p.numel() for p in list(model.parameters())[: names.index("fc2.bias")])
    assert not cmd.embedded[start : start + model.fc2.bias.numel()].any()
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    e = cmd.embedded
    assert cmd.fit is not None and cmd.ref_index is not None
    want = (cmd.a_frozen[e] * w[cmd.ref_index].astype(np.float64)[cmd.fit.mode[e]] + cmd.b_frozen[e]).astype(np.float32)
    assert np.array_equal(w[e], want)
    assert cmd.memory_bytes() > 2 * 8 * cmd.n_params + 4 * 8 * cmd.n_params

"""Online and Embedded CMD inside a PyTorch training loop (the follow-up paper).

>>> cmd = OnlineCMD(model, warmup=20, modes=10, samples=1000, seed=0)   # doctest: +SKIP
>>> for epoch in range(epochs):                                          # doctest: +SKIP
...     train_one_epoch(model, optimizer)
...     cmd.update(model)
...     evaluate(cmd.current_state_dict())    # the CMD weights; the model is not touched

**Warm-up.** The first ``warmup`` updates record the parameters (in memory, float32: N x F x 4
bytes). Post-hoc CMD on that window (stratified sampling of K parameters, complete linkage on
|corr|, one reference per mode, every parameter assigned to its best-correlated reference) fixes
the modes, the references and every parameter's mode for good.

**After the warm-up.** Every update adds the epoch to per-parameter centred float64 running sums
(:class:`~pipeline.kernels.online.RunningFit`), so ``(a, b)`` are always the exact least-squares
fit over ``[start, t]``, as a batch refit would give, in O(N) memory with no history.
``current_state_dict()`` returns ``a * r(t) + b`` with ``r(t)`` the references' current values.

**Embedded CMD** (:class:`EmbeddedCMD`). Every ``embed_every`` updates after the warm-up, the
``embed_fraction`` of the not-yet-embedded parameters whose fit moved least since the last check
(``|a - a_prev| * rms(r) + |b - b_prev|``, the largest change of ``a r + b`` over the window's
reference values, in weight units) are embedded: their ``(a, b)`` are frozen, their gradients
are zeroed by a hook, their optimiser state (momentum, Adam moments) is zeroed, and after every
optimiser step they are set to ``a * r(t) + b`` from the live references. References, and
parameters with NaN/Inf, are never embedded.

Parameters: every floating-point ``nn.Parameter`` of the model (buffers, e.g. BatchNorm
statistics, are not decomposed: ``current_state_dict`` takes them from the model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.cluster import cluster_modes
from pipeline.kernels.cmd import FLAG_NONFINITE, References, fit_block, pearson
from pipeline.kernels.online import RunningFit
from pipeline.runtime import Runner, RuntimeOptions
from pipeline.sampling import sample_varying
from pipeline.store.analysis import mode_dtype

if TYPE_CHECKING:
    from pipeline.online_store import StoreRunningFit

__all__ = ["EmbeddedCMD", "OnlineCMD", "lightning_callback"]

_MAX_DRAW_ROUNDS = 20


def _named_float_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]


class OnlineCMD:
    """Online CMD alongside training; see the module docstring.

    Parameters
    ----------
    model
        The model being trained (only read: its parameters are never changed).
    warmup
        F, the number of updates (epochs) recorded before the modes are fixed (at least 2).
    modes, threshold
        Cut the dendrogram into at most ``modes`` clusters, or at distance ``threshold``.
    samples
        K, the number of sampled parameters for the clustering.
    seed
        Seed of the sampling.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        warmup: int = 20,
        modes: int | None = 10,
        threshold: float | None = None,
        samples: int = 1000,
        seed: int = 0,
        store: str | None = None,
        runtime: RuntimeOptions | None = None,
        run: Runner | None = None,
    ) -> None:
        if warmup < 2:
            raise ValueError("warmup must be at least 2 epochs")
        if (modes is None) == (threshold is None):
            raise ValueError("give exactly one of modes or threshold")
        if samples < 2:
            raise ValueError("samples must be at least 2")
        self.model = model
        self.warmup = warmup
        self.modes = modes
        self.threshold = threshold
        self.samples = samples
        self.seed = seed
        params = _named_float_params(model)
        if not params:
            raise ValueError("the model has no floating-point parameters")
        self.names = [n for n, _ in params]
        self.shapes = [tuple(p.shape) for _, p in params]
        self.dtypes = [p.dtype for _, p in params]
        self.sizes = [p.numel() for _, p in params]
        self.offsets = list(np.cumsum([0, *self.sizes[:-1]]).astype(int))
        self.n_params = int(sum(self.sizes))
        self.epoch = 0  # updates seen
        self._history: list[np.ndarray] | None = []
        self.fit: RunningFit | None = None
        self.ref_index: np.ndarray | None = None
        self.sample_index: np.ndarray | None = None
        self.flags: np.ndarray | None = None
        self._r_now: np.ndarray | None = None
        self._ready = False
        self.store: StoreRunningFit | None = None
        if store is not None:
            from pipeline.online_store import StoreRunningFit

            self.store = StoreRunningFit(
                store, self.names, self.shapes, self.offsets, self.sizes, warmup, runtime, run
            )
            self._history = None

    def __enter__(self) -> OnlineCMD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the runtime a store-backed instance started (nothing otherwise)."""
        if self.store is not None:
            self.store.close()

    # ------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        """True once the warm-up is over and the modes are fixed."""
        return self._ready

    @property
    def n_modes(self) -> int:
        return 0 if self.ref_index is None else int(self.ref_index.size)

    def _flat(self, model: nn.Module) -> np.ndarray:
        with torch.no_grad():
            parts = [p.detach().reshape(-1).to("cpu", torch.float32) for _, p in _named_float_params(model)]
            return torch.cat(parts).numpy()

    def memory_bytes(self) -> int:
        """Bytes held in this process now: the warm-up history, or the running sums after it
        (with a store: only the per-mode statistics)."""
        if self._history is not None:
            return sum(h.nbytes for h in self._history)
        if self.fit is None:
            return 0 if self.ref_index is None else 3 * 8 * int(self.ref_index.size)
        return int(self.fit.mean_w.nbytes + self.fit.c_rw.nbytes + self.fit.mode.nbytes)

    # ------------------------------------------------------------------ updates
    def update(self, model: nn.Module | None = None) -> None:
        """Add the current parameters as one epoch (call once per epoch)."""
        w = self._flat(model if model is not None else self.model)
        if w.size != self.n_params:
            raise ValueError(f"the model has {w.size} parameters, OnlineCMD was made for {self.n_params}")
        if not self._ready:
            if self.store is not None:
                self.store.record(w, self.epoch)
                if self.epoch + 1 == self.warmup:
                    self.ref_index, self._r_now = self.store.finish_warmup(
                        self.modes, self.threshold, self.samples, self.seed
                    )
                    self._ready = True
                self.epoch += 1
                return
            assert self._history is not None
            self._history.append(w.copy())
            self.epoch += 1
            if len(self._history) == self.warmup:
                self._fit_warmup()
                self._ready = True
            return
        assert self.ref_index is not None
        r = w[self.ref_index].astype(np.float64)
        if self.store is not None:
            # a failed update leaves the previous epoch's sums intact: call update() again
            self.store.update(w, r)
        else:
            assert self.fit is not None
            self.fit.update(w, r)
        self._r_now = r
        self.epoch += 1

    def _sample(self, hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx, prof, _ = sample_varying(
            self.offsets, self.sizes, self.samples, self.seed, lambda rows: (hist[rows], 0),
            rounds=_MAX_DRAW_ROUNDS,
        )
        if idx.size < 2:
            raise ValueError("fewer than 2 parameters vary over the warm-up: nothing to decompose")
        return idx, prof

    def _fit_warmup(self) -> None:
        assert self._history is not None
        hist = np.stack(self._history, axis=1)  # (N, F) float32
        sample_index, profiles = self._sample(hist)
        clustering = cluster_modes(pearson(profiles), modes=self.modes, threshold=self.threshold)
        ref_index = sample_index[clustering.references]
        refs = References.from_profiles(hist[ref_index].astype(np.float64))
        m = np.arange(ref_index.size)
        bf = fit_block(hist, refs, (ref_index, m))
        self.flags = bf.flags
        # mode ids in the smallest unsigned dtype (one byte per parameter up to 256 modes)
        self.fit = RunningFit.from_history(hist, hist[ref_index], bf.mode.astype(mode_dtype(ref_index.size)))
        self.ref_index = ref_index
        self.sample_index = sample_index
        self._r_now = hist[ref_index, -1].astype(np.float64)
        self._history = None  # O(N) from now on

    # ------------------------------------------------------------------ results
    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` per parameter (float64), exact least squares over the window so far.
        References are their own fit: a = 1, b = 0."""
        if not self._ready:
            raise RuntimeError(f"OnlineCMD is warming up ({self.epoch} of {self.warmup} epochs)")
        if self.store is not None:
            a, b = np.empty(self.n_params), np.empty(self.n_params)
            for r0, _mode, ab, bb in self.store.coefficient_blocks():
                a[r0 : r0 + ab.size], b[r0 : r0 + ab.size] = ab, bb
        else:
            assert self.fit is not None
            a, b = self.fit.coefficients()
        assert self.ref_index is not None
        a[self.ref_index] = 1.0
        b[self.ref_index] = 0.0
        return a, b

    def cmd_vector(self) -> np.ndarray:
        """The CMD weights ``a * r(t) + b`` at the last update, flat float32 (N,), computed in
        float64 (with a store: block by block, so only the output is model-sized)."""
        if not self._ready:
            raise RuntimeError(f"OnlineCMD is warming up ({self.epoch} of {self.warmup} epochs)")
        assert self._r_now is not None and self.ref_index is not None
        r = self._r_now
        if self.store is not None:
            out = np.empty(self.n_params, dtype=np.float32)
            for r0, mode, a, b in self.store.coefficient_blocks():
                out[r0 : r0 + a.size] = a * r[mode] + b
            out[self.ref_index] = r.astype(np.float32)  # a reference is its own fit
            return out
        a, b = self.coefficients()
        assert self.fit is not None
        return (a * r[self.fit.mode] + b).astype(np.float32)

    def current_state_dict(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """A new state_dict with the CMD weights in place of the parameters (buffers copied from
        the model). During the warm-up, a copy of the model's own weights. The model and its
        tensors are never modified."""
        src = model if model is not None else self.model
        sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
        if not self._ready:
            return sd
        flat = self.cmd_vector()
        for name, shape, dtype, off, size in zip(
            self.names, self.shapes, self.dtypes, self.offsets, self.sizes, strict=True
        ):
            t = torch.from_numpy(flat[off : off + size].copy()).reshape(shape)
            sd[name] = t.to(dtype=dtype, device=sd[name].device)
        return sd


class EmbeddedCMD(OnlineCMD):
    """Online CMD that also embeds parameters; see the module docstring.

    Parameters
    ----------
    model, warmup, modes, threshold, samples, seed
        As for :class:`OnlineCMD`.
    optimizer
        The optimiser training ``model``: a step hook keeps embedded parameters on
        ``a * r(t) + b`` and their optimiser state at zero.
    embed_every
        L: embed every L updates after the warm-up.
    embed_fraction
        P: the fraction of the not-yet-embedded parameters embedded at each check.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        warmup: int = 20,
        modes: int | None = 10,
        threshold: float | None = None,
        samples: int = 1000,
        seed: int = 0,
        embed_every: int = 10,
        embed_fraction: float = 0.1,
    ) -> None:
        super().__init__(model, warmup=warmup, modes=modes, threshold=threshold, samples=samples, seed=seed)
        if embed_every < 1:
            raise ValueError("embed_every must be at least 1")
        if not 0 < embed_fraction <= 1:
            raise ValueError("embed_fraction must be in (0, 1]")
        self.optimizer = optimizer
        self.embed_every = embed_every
        self.embed_fraction = embed_fraction
        self.embedded = np.zeros(self.n_params, dtype=bool)
        self.a_frozen = np.zeros(self.n_params)
        self.b_frozen = np.zeros(self.n_params)
        self._prev: tuple[np.ndarray, np.ndarray] | None = None
        self.history: list[dict[str, Any]] = []
        self._params = [p for _, p in _named_float_params(model)]
        self._masks = [torch.zeros(p.shape, dtype=torch.bool, device=p.device) for p in self._params]
        self._ref_pos: list[tuple[int, int]] = []  # (param index, element) of each reference
        self._follow: list[tuple[int, np.ndarray, np.ndarray]] = []
        for p, mask in zip(self._params, self._masks, strict=True):
            if p.requires_grad:  # a frozen parameter gets no gradient to mask
                p.register_hook(lambda g, mask=mask: g.masked_fill(mask, 0.0))
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply())

    def memory_bytes(self) -> int:
        """As :meth:`OnlineCMD.memory_bytes`, plus the embedding state (frozen a and b, the
        last check's a and b, the masks)."""
        extra = self.a_frozen.nbytes + self.b_frozen.nbytes + self.embedded.nbytes
        extra += sum(m.numel() for m in self._masks)
        if self._prev is not None:
            extra += self._prev[0].nbytes + self._prev[1].nbytes
        return super().memory_bytes() + extra

    @property
    def fraction_embedded(self) -> float:
        return float(self.embedded.mean())

    def update(self, model: nn.Module | None = None) -> None:
        was_ready = self.ready
        super().update(model)
        if not self.ready:
            self.history.append({"epoch": self.epoch, "embedded": 0.0})
            return
        if not was_ready:  # the warm-up just ended: locate the references in the tensors
            assert self.ref_index is not None
            for r in self.ref_index:
                i = int(np.searchsorted(self.offsets, r, side="right") - 1)
                self._ref_pos.append((i, int(r - self.offsets[i])))
            self._prev = self.coefficients()
        elif (self.epoch - self.warmup) % self.embed_every == 0:
            self._embed()
        self.history.append({"epoch": self.epoch, "embedded": self.fraction_embedded})

    def _embed(self) -> None:
        a, b = self.coefficients()
        assert self._prev is not None and self.fit is not None and self.ref_index is not None
        pa, pb = self._prev
        self._prev = (a, b)
        r_rms = np.sqrt(self.fit.mean_r**2 + self.fit.m2_r / max(self.fit.n, 1))
        moved = np.abs(a - pa) * r_rms[self.fit.mode] + np.abs(b - pb)
        candidate = ~self.embedded & np.isfinite(moved)
        candidate[self.ref_index] = False
        if self.flags is not None:
            candidate &= (self.flags & FLAG_NONFINITE) == 0
        idx = np.flatnonzero(candidate)
        k = round(self.embed_fraction * idx.size)
        if k == 0:
            return
        chosen = idx[np.argsort(moved[idx], kind="stable")[:k]]
        self.embedded[chosen] = True
        self.a_frozen[chosen] = a[chosen]
        self.b_frozen[chosen] = b[chosen]
        # what apply() needs after every optimiser step, found once per embedding: per parameter
        # tensor, its embedded elements (flat indices, in C order like the mask) and their modes
        self._follow = []
        for i, (off, size) in enumerate(zip(self.offsets, self.sizes, strict=True)):
            emb = self.embedded[off : off + size]
            self._masks[i].copy_(torch.from_numpy(emb.reshape(self.shapes[i])).to(self._masks[i].device))
            if emb.any():
                sel = off + np.flatnonzero(emb)
                self._follow.append((i, sel, self.fit.mode[sel].astype(np.int64)))
        self.apply()

    def _ref_values(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(
                [self._params[i].detach().reshape(-1)[j].to("cpu", torch.float64) for i, j in self._ref_pos]
            )

    @torch.no_grad()
    def apply(self) -> None:
        """Set the embedded parameters to ``a * r(t) + b`` from the live references, and zero
        their optimiser state (called after every optimiser step)."""
        if not self._follow:
            return
        r = self._ref_values().numpy()
        for i, sel, mode in self._follow:
            p = self._params[i]
            # a_frozen/b_frozen are read here, not cached: a caller may round them (federated)
            vals = self.a_frozen[sel] * r[mode] + self.b_frozen[sel]
            # boolean-mask assignment follows the logical (C) order of the elements, like sel,
            # so it also works for non-contiguous parameters (e.g. channels_last weights)
            p.data[self._masks[i]] = torch.from_numpy(vals).to(p.device, p.dtype)
            state = self.optimizer.state.get(p, {})
            for v in state.values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.masked_fill_(self._masks[i], 0.0)

    def cmd_vector(self) -> np.ndarray:
        """As :meth:`OnlineCMD.cmd_vector`, with the frozen fit for embedded parameters."""
        v = super().cmd_vector()
        if self.embedded.any():
            assert self.fit is not None and self._r_now is not None
            e = self.embedded
            v[e] = (self.a_frozen[e] * self._r_now[self.fit.mode[e]] + self.b_frozen[e]).astype(np.float32)
        return v

    def remove(self) -> None:
        """Detach the optimiser hook (the gradient hooks stay, with empty masks)."""
        self._hook.remove()
        for m in self._masks:
            m.zero_()
        self.embedded[:] = False
        self._follow = []


def lightning_callback(cmd: OnlineCMD) -> Any:
    """A Lightning ``Callback`` that calls ``cmd.update(pl_module)`` at the end of every
    training epoch (``lightning`` or ``pytorch_lightning`` must be installed)."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as e:
            raise ImportError("lightning_callback needs lightning (pip install lightning)") from e

    class OnlineCMDCallback(Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            cmd.update(pl_module)

    return OnlineCMDCallback()

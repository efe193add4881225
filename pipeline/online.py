"""Online and Embedded CMD inside a PyTorch training loop (the follow-up paper).

>>> cmd = OnlineCMD(model, warmup=20, modes=10, samples=1000, seed=0)   # doctest: +SKIP
>>> for epoch in range(epochs):                                          # doctest: +SKIP
...     train_one_epoch(model, optimizer)
...     cmd.update(model)
...     evaluate(cmd.current_state_dict())    # the CMD weights; the model is not touched

**Warm-up.** The first ``warmup`` updates (at least :data:`MIN_WARMUP` = 3, the shortest window
the post-hoc fit accepts) record the parameters (in memory, float32: N x F x 4 bytes). Post-hoc
CMD on that window (stratified sampling of K parameters, complete linkage on |corr|, one
reference per mode, every parameter assigned to its best-correlated reference) fixes the modes,
the references and every parameter's mode for good.

**After the warm-up.** Every update adds the epoch to per-parameter centred float64 running sums
(:class:`~pipeline.kernels.online.RunningFit`), so ``(a, b)`` are always the exact least-squares
fit over ``[start, t]``, as a batch refit would give, in O(N) memory with no history.
``current_state_dict()`` returns ``a * r(t) + b`` with ``r(t)`` the references' current values.

**NaN/Inf.** Every update checks the parameters:

- a parameter that is NaN/Inf at an update after the warm-up is flagged ``FLAG_NONFINITE`` in
  ``flags`` (for good, even if it turns finite again) and keeps its last finite fit, the fit
  over ``[start, t - 1]``: its running sums never take the value in (they are not updated any
  more), and no other parameter's fit, its mode's included, is affected;
- a parameter with NaN/Inf during the warm-up has no finite fit: it is flagged the same way and
  held at ``a = 0``, ``b = `` its last finite warm-up value (NaN only if it was never finite);
- every update that sees NaN/Inf warns (:class:`~pipeline.errors.PipelineWarning`, with the
  count and the epoch) and records the count in ``nonfinite_counts`` (epoch -> count);
- a reference that turns NaN/Inf stops the update with a :class:`~pipeline.errors.PipelineError`
  naming the tensor, the element and the epoch ("training diverged"); the state stays the
  previous epoch's, so a finite epoch can still be added.

So ``coefficients()``, ``cmd_vector()`` and ``current_state_dict()`` are finite for every
parameter that was ever finite. The store backend (``store=``) follows the same policy.

**Embedded CMD** (:class:`EmbeddedCMD`). Every ``embed_every`` updates after the warm-up, the
``embed_fraction`` of the not-yet-embedded parameters whose fit moved least since the last check
(``|a - a_prev| * rms(r) + |b - b_prev|``, the largest change of ``a r + b`` over the window's
reference values, in weight units) are embedded: their ``(a, b)`` are frozen, their gradients
are zeroed by a hook, their optimiser state (momentum, Adam moments) is zeroed, and after every
optimiser step they are set to ``a * r(t) + b`` from the live references. References, parameters
flagged NaN/Inf, and parameters that were constant over the warm-up (``FLAG_CONSTANT``: e.g. a
layer frozen during the warm-up, whose fit says nothing about how it moves once unfrozen) are
never embedded. Nothing non-finite is ever written into the model: an embedded parameter keeps
its frozen, finite fit, and while a reference is NaN/Inf (training diverging between two
updates) ``apply()`` leaves that mode's embedded parameters as they are; the next ``update()``
then raises.

Parameters: every floating-point ``nn.Parameter`` of the model (buffers, e.g. BatchNorm
statistics, are not decomposed: ``current_state_dict`` takes them from the model).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError, PipelineWarning
from pipeline.kernels.cluster import cluster_modes
from pipeline.kernels.cmd import (
    FLAG_CONSTANT,
    FLAG_NONFINITE,
    References,
    fit_block,
    pearson,
    varying_rows,
)
from pipeline.kernels.online import RunningFit, coefficients_rows, nonfinite_rows
from pipeline.kernels.sampling import Pool, draw_samples
from pipeline.runtime import Runner, RuntimeOptions
from pipeline.store.analysis import mode_dtype

if TYPE_CHECKING:
    from pipeline.online_store import StoreRunningFit

__all__ = ["MIN_WARMUP", "EmbeddedCMD", "OnlineCMD", "lightning_callback"]

_MAX_DRAW_ROUNDS = 20
MIN_WARMUP = 3  #: the shortest warm-up: the post-hoc fit refuses windows of fewer epochs


def _named_float_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]


class OnlineCMD:
    """Online CMD alongside training; see the module docstring.

    Parameters
    ----------
    model
        The model being trained (only read: its parameters are never changed).
    warmup
        F, the number of updates (epochs) recorded before the modes are fixed (at least
        :data:`MIN_WARMUP` = 3, the shortest window the post-hoc fit accepts).
    modes, threshold
        Cut the dendrogram into at most ``modes`` clusters, or at distance ``threshold``.
    samples
        K, the number of sampled parameters for the clustering.
    seed
        Seed of the sampling.
    store
        Keep the running sums in this Zarr store (:mod:`pipeline.online_store`), not in
        memory; ``flags`` is then the store's ``online/flags`` and this attribute stays None.
    runtime, run
        How the store backend runs its Dask graphs.

    Attributes
    ----------
    flags
        (N,) uint8 after the warm-up (in-memory backend): the warm-up fit's flags, plus
        ``FLAG_NONFINITE`` for parameters that turned NaN/Inf later.
    nonfinite_counts
        ``{epoch: number of NaN/Inf parameter values at that update}``, epochs with any only.
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
        if warmup < MIN_WARMUP:
            raise ValueError(
                f"warmup must be at least {MIN_WARMUP} epochs (the post-hoc fit of the warm-up "
                f"needs {MIN_WARMUP}), got {warmup}"
            )
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
        #: parameters that vary over the warm-up, when a scan counted them (sampling fell
        #: short of K by rejection, e.g. behind a frozen backbone); None otherwise
        self.n_varying: int | None = None
        self.flags: np.ndarray | None = None
        self._r_now: np.ndarray | None = None
        self._ready = False
        self.nonfinite_counts: dict[int, int] = {}
        # flagged NaN/Inf parameters (sorted) and the (a, b) each one is held at
        self._held_index = np.empty(0, dtype=np.int64)
        self._held_a = np.empty(0, dtype=np.float64)
        self._held_b = np.empty(0, dtype=np.float64)
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

    @property
    def nonfinite_index(self) -> np.ndarray:
        """The parameters flagged NaN/Inf so far (sorted flat indices, int64)."""
        return self._held_index.copy()

    def memory_bytes(self) -> int:
        """Bytes held in this process now: the warm-up history, or after it the per-parameter
        state (in memory: two float64 sums, the mode id and the flags, 18 B per parameter up
        to 256 modes; the O(M) per-mode numbers are left out; with a store: only the per-mode
        statistics), plus 24 B per parameter flagged NaN/Inf (its index and held a and b)."""
        if self._history is not None:
            return sum(h.nbytes for h in self._history)
        held = self._held_index.nbytes + self._held_a.nbytes + self._held_b.nbytes
        if self.fit is None:
            return held + (0 if self.ref_index is None else 3 * 8 * int(self.ref_index.size))
        assert self.flags is not None
        per_param = self.fit.mean_w.nbytes + self.fit.c_rw.nbytes + self.fit.mode.nbytes
        return int(per_param + self.flags.nbytes + held)

    # ------------------------------------------------------------------ updates
    def update(self, model: nn.Module | None = None) -> None:
        """Add the current parameters as one epoch (call once per epoch).

        NaN/Inf follow the policy of the module docstring: flagged, held, counted and warned
        about (:class:`~pipeline.errors.PipelineWarning`); a non-finite reference raises
        :class:`~pipeline.errors.PipelineError` and adds nothing.
        """
        w = self._flat(model if model is not None else self.model)
        if w.size != self.n_params:
            raise ValueError(f"the model has {w.size} parameters, OnlineCMD was made for {self.n_params}")
        epoch = self.epoch + 1  # the number this update gets (1-based, as in nonfinite_counts)
        finite = np.isfinite(w)
        n_bad = int(w.size - np.count_nonzero(finite))
        if not self._ready:
            if self.store is not None:
                self.store.record(w, self.epoch)
                if self.epoch + 1 == self.warmup:
                    self.ref_index, self._r_now, bad, last = self.store.finish_warmup(
                        self.modes, self.threshold, self.samples, self.seed
                    )
                    self._hold(bad, np.zeros(bad.size), last)
                    self._ready = True
                self.epoch += 1
            else:
                assert self._history is not None
                self._history.append(w.copy())
                self.epoch += 1
                if len(self._history) == self.warmup:
                    self._fit_warmup()
                    self._ready = True
            self._report(epoch, n_bad)
            return
        assert self.ref_index is not None
        r = w[self.ref_index].astype(np.float64)
        if not np.isfinite(r).all():
            raise self._diverged(epoch, r)
        new = np.empty(0, dtype=np.int64)
        if n_bad:  # newly non-finite parameters: held at their fit before this epoch
            new = np.setdiff1d(np.flatnonzero(~finite), self._held_index, assume_unique=True)
        if self.store is not None:
            a_new, b_new = self.store.coefficients_of(new) if new.size else (new, new)
            # a failed update leaves the previous epoch's sums intact: call update() again
            self.store.update(w, r)
        else:
            assert self.fit is not None
            fit = self.fit
            a_new, b_new = coefficients_rows(
                fit.mean_w[new], fit.c_rw[new], fit.mode[new], fit.mean_r, fit.m2_r
            )
            skip = None
            if n_bad or self._held_index.size:
                skip = ~finite
                skip[self._held_index] = True
            fit.update(w, r, skip)
        self._hold(new, a_new, b_new)
        self._r_now = r
        self.epoch += 1
        self._report(epoch, n_bad)

    def _hold(self, idx: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        """Flag the parameters ``idx`` NaN/Inf and hold them at ``(a, b)`` from now on."""
        if idx.size == 0:
            return
        index = np.concatenate([self._held_index, np.asarray(idx, dtype=np.int64)])
        order = np.argsort(index, kind="stable")
        self._held_index = index[order]
        self._held_a = np.concatenate([self._held_a, np.asarray(a, dtype=np.float64)])[order]
        self._held_b = np.concatenate([self._held_b, np.asarray(b, dtype=np.float64)])[order]
        if self.flags is not None:
            self.flags[idx] |= FLAG_NONFINITE

    def _override_held(self, r0: int, a: np.ndarray, b: np.ndarray) -> None:
        """Put the held ``(a, b)`` into ``a`` and ``b``, the rows ``[r0, r0 + a.size)``."""
        lo, hi = np.searchsorted(self._held_index, [r0, r0 + a.size])
        if hi > lo:
            loc = self._held_index[lo:hi] - r0
            a[loc] = self._held_a[lo:hi]
            b[loc] = self._held_b[lo:hi]

    def _locate(self, i: int) -> str:
        """``name[i, j, ...]`` of flat parameter index ``i``."""
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        index = np.unravel_index(i - self.offsets[k], self.shapes[k]) if self.shapes[k] else ()
        return f"{self.names[k]}[{', '.join(str(int(j)) for j in index)}]"

    def _diverged(self, epoch: int, r: np.ndarray) -> PipelineError:
        assert self.ref_index is not None
        bad = np.flatnonzero(~np.isfinite(r))
        m = int(bad[0])
        return PipelineError(
            f"training diverged: at epoch {epoch} the reference of mode {m}, "
            f"{self._locate(int(self.ref_index[m]))}, is {r[m]}"
            + (f" ({bad.size} of {r.size} references are NaN/Inf)" if bad.size > 1 else "")
            + f"; Online CMD cannot go on (it keeps the state of epoch {epoch - 1})"
        )

    def _report(self, epoch: int, n_bad: int) -> None:
        if not n_bad:
            return
        self.nonfinite_counts[epoch] = n_bad
        if self._ready:
            what = (
                f"{self._held_index.size} parameter(s) flagged FLAG_NONFINITE in all, each held at "
                "its last finite fit"
            )
        else:
            what = "they will be flagged FLAG_NONFINITE when the warm-up ends"
        warnings.warn(
            f"Online CMD, epoch {epoch}: {n_bad} parameter value(s) are NaN/Inf; {what} "
            "(counts per epoch: nonfinite_counts)",
            PipelineWarning,
            stacklevel=3,
        )

    def _sample(self, hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        def scan() -> tuple[list[Pool], int]:
            ok = varying_rows(hist.T)
            pools = []
            for i, (off, size) in enumerate(zip(self.offsets, self.sizes, strict=True)):
                found = off + np.flatnonzero(ok[off : off + size])
                order = np.random.default_rng([self.seed, 2, i]).permutation(found)
                pools.append(Pool(i, int(found.size), order[: self.samples].astype(np.int64)))
            return pools, 0

        drawn = draw_samples(
            self.offsets, self.sizes, self.samples, self.seed, lambda rows: (hist[rows], 0),
            rounds=_MAX_DRAW_ROUNDS, scan=scan,
        )
        self.n_varying = drawn.n_varying
        idx, prof = drawn.index, drawn.profiles
        if idx.size < 2:
            raise ValueError("fewer than 2 parameters vary over the warm-up: nothing to decompose")
        if idx.size < self.samples:
            warnings.warn(
                f"Online CMD: only {drawn.n_varying:,} parameters vary over the warm-up (finite, "
                f"not constant): {idx.size:,} sampled of the {self.samples:,} asked",
                PipelineWarning,
                stacklevel=4,
            )
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
        self.flags = np.asarray(bf.flags, dtype=np.uint8)
        # NaN/Inf in the warm-up: no fit; zero sums (never updated), held at the last finite value
        bad, last = nonfinite_rows(hist)
        if bad.size:
            hist[bad] = 0.0
        # mode ids in the smallest unsigned dtype (one byte per parameter up to 256 modes)
        self.fit = RunningFit.from_history(hist, hist[ref_index], bf.mode.astype(mode_dtype(ref_index.size)))
        self._hold(bad, np.zeros(bad.size), last)
        self.ref_index = ref_index
        self.sample_index = sample_index
        self._r_now = hist[ref_index, -1].astype(np.float64)
        self._history = None  # O(N) from now on

    # ------------------------------------------------------------------ results
    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` per parameter (float64), exact least squares over the window so far.
        References are their own fit: a = 1, b = 0; a parameter flagged NaN/Inf has its held
        fit (see the module docstring)."""
        if not self._ready:
            raise RuntimeError(f"OnlineCMD is warming up ({self.epoch} of {self.warmup} epochs)")
        if self.store is not None:
            a, b = np.empty(self.n_params), np.empty(self.n_params)
            for r0, _mode, ab, bb in self.store.coefficient_blocks():
                self._override_held(r0, ab, bb)
                a[r0 : r0 + ab.size], b[r0 : r0 + ab.size] = ab, bb
        else:
            assert self.fit is not None
            a, b = self.fit.coefficients()
            self._override_held(0, a, b)
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
                self._override_held(r0, a, b)
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
        self._hooked: set[int] = set()
        for i in range(len(self._params)):
            self._mask_gradient(i)
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply())

    def _mask_gradient(self, i: int) -> None:
        """Zero the embedded elements' gradient of parameter ``i`` (a frozen parameter gets no
        gradient to mask: its hook is registered once it requires one, at an embedding)."""
        p = self._params[i]
        if i not in self._hooked and p.requires_grad:
            p.register_hook(lambda g, mask=self._masks[i]: g.masked_fill(mask, 0.0))
            self._hooked.add(i)

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
        nonfinite = self.nonfinite_counts.get(self.epoch, 0)
        if not self.ready:
            self.history.append({"epoch": self.epoch, "embedded": 0.0, "nonfinite": nonfinite})
            return
        if not was_ready:  # the warm-up just ended: locate the references in the tensors
            assert self.ref_index is not None
            for r in self.ref_index:
                i = int(np.searchsorted(self.offsets, r, side="right") - 1)
                self._ref_pos.append((i, int(r - self.offsets[i])))
            self._prev = self.coefficients()
        elif (self.epoch - self.warmup) % self.embed_every == 0:
            self._embed()
        self.history.append(
            {"epoch": self.epoch, "embedded": self.fraction_embedded, "nonfinite": nonfinite}
        )

    def _embed(self) -> None:
        a, b = self.coefficients()
        assert self._prev is not None and self.fit is not None and self.ref_index is not None
        pa, pb = self._prev
        self._prev = (a, b)
        r_rms = np.sqrt(self.fit.mean_r**2 + self.fit.m2_r / max(self.fit.n, 1))
        moved = np.abs(a - pa) * r_rms[self.fit.mode] + np.abs(b - pb)
        candidate = ~self.embedded & np.isfinite(moved)
        candidate[self.ref_index] = False
        # never: NaN/Inf (held, not fitted), or constant over the warm-up (e.g. frozen then:
        # a = 0 and a window of its warm-up value, which says nothing of how it moves now)
        assert self.flags is not None
        candidate &= (self.flags & (FLAG_NONFINITE | FLAG_CONSTANT)) == 0
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
                self._mask_gradient(i)
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
        their optimiser state (called after every optimiser step). Never writes NaN/Inf: an
        embedded parameter whose value would be non-finite (its reference is NaN/Inf: training
        is diverging, and the next :meth:`update` raises) keeps its current value."""
        if not self._follow:
            return
        r = self._ref_values().numpy()
        for i, sel, mode in self._follow:
            p = self._params[i]
            # a_frozen/b_frozen are read here, not cached: a caller may round them (federated)
            vals = self.a_frozen[sel] * r[mode] + self.b_frozen[sel]
            ok = np.isfinite(vals)
            if not ok.all():
                now = p.data[self._masks[i]].to("cpu", torch.float64).numpy()
                vals = np.where(ok, vals, now)
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

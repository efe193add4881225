"""Online CMD in memory (:class:`OnlineCMD`): the warm-up, the running fit, NaN/Inf, the results.

:class:`OnlineCMD` records the warm-up, fits it post hoc (sampling, clustering, one reference
per mode), then keeps every parameter's running least-squares fit
(:class:`~pipeline.kernels.online.RunningFit`) and applies the NaN/Inf policy of
:mod:`pipeline.online`. With ``store=`` the per-parameter sums live in a Zarr store instead,
kept by :class:`~pipeline.online.store_backed.StoreRunningFit`; this class then holds only the
per-mode state and the held NaN/Inf parameters.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from pipeline.config import DEFAULT_SAMPLES, DRAW_ROUNDS, MIN_EPOCHS, ONLINE_MODES, ONLINE_WARMUP
from pipeline.errors import PipelineError, PipelineWarning
from pipeline.kernels.cluster import check_cut, cluster_modes
from pipeline.kernels.cmd import (
    FLAG_NONFINITE,
    References,
    fit_block,
    pearson,
    varying_rows,
)
from pipeline.kernels.online import RunningFit, coefficients_rows, nonfinite_rows
from pipeline.kernels.sampling import Pool, draw_samples
from pipeline.online.store_backed import StoreRunningFit
from pipeline.runtime import Runner, RuntimeOptions
from pipeline.store.analysis import mode_dtype

__all__ = ["MIN_WARMUP", "OnlineCMD", "named_float_params"]

MIN_WARMUP = MIN_EPOCHS  #: the shortest warm-up: the post-hoc fit refuses windows of fewer epochs


def named_float_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The floating-point parameters of ``model`` (name, parameter), in ``named_parameters`` order:
    the ones Online CMD decomposes."""
    return [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]


class OnlineCMD:
    """Online CMD alongside training; see :mod:`pipeline.online`.

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
        Keep the running sums in this Zarr store (:mod:`pipeline.online.store_backed`), not in
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
        warmup: int = ONLINE_WARMUP,
        modes: int | None = ONLINE_MODES,
        threshold: float | None = None,
        samples: int = DEFAULT_SAMPLES,
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
        check_cut(modes, threshold)
        if samples < 2:
            raise ValueError("samples must be at least 2")
        self.model = model
        self.warmup = warmup
        self.modes = modes
        self.threshold = threshold
        self.samples = samples
        self.seed = seed
        params = named_float_params(model)
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
            parts = [
                p.detach().reshape(-1).to("cpu", torch.float32)
                for _, p in named_float_params(model)
            ]
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

        NaN/Inf follow the policy of :mod:`pipeline.online`: flagged, held, counted and warned
        about (:class:`~pipeline.errors.PipelineWarning`); a non-finite reference raises
        :class:`~pipeline.errors.PipelineError` and adds nothing.
        """
        w = self._flat(model if model is not None else self.model)
        if w.size != self.n_params:
            raise ValueError(
                f"the model has {w.size} parameters, OnlineCMD was made for {self.n_params}"
            )
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
            self.offsets,
            self.sizes,
            self.samples,
            self.seed,
            lambda rows: (hist[rows], 0),
            rounds=DRAW_ROUNDS,
            scan=scan,
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
        self.fit = RunningFit.from_history(
            hist, hist[ref_index], bf.mode.astype(mode_dtype(ref_index.size))
        )
        self._hold(bad, np.zeros(bad.size), last)
        self.ref_index = ref_index
        self.sample_index = sample_index
        self._r_now = hist[ref_index, -1].astype(np.float64)
        self._history = None  # O(N) from now on

    # ------------------------------------------------------------------ results
    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` per parameter (float64), exact least squares over the window so far.
        References are their own fit: a = 1, b = 0; a parameter flagged NaN/Inf has its held
        fit (see :mod:`pipeline.online`)."""
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

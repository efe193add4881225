"""Embedded CMD (:class:`EmbeddedCMD`): Online CMD that freezes parameters on their fit in training.

It owns the embedding policy of :mod:`pipeline.online` (which parameters, when), the gradient
and optimiser-step hooks, and keeping embedded parameters on ``a * r(t) + b``; the running fit
is :class:`~pipeline.online.memory.OnlineCMD`'s (in memory).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import (
    DEFAULT_SAMPLES,
    EMBED_EVERY,
    EMBED_FRACTION,
    ONLINE_MODES,
    ONLINE_WARMUP,
)
from pipeline.kernels.cmd import FLAG_CONSTANT, FLAG_NONFINITE
from pipeline.online.memory import OnlineCMD, named_float_params

__all__ = ["EmbeddedCMD"]


class EmbeddedCMD(OnlineCMD):
    """Online CMD that also embeds parameters; see :mod:`pipeline.online`.

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
        warmup: int = ONLINE_WARMUP,
        modes: int | None = ONLINE_MODES,
        threshold: float | None = None,
        samples: int = DEFAULT_SAMPLES,
        seed: int = 0,
        embed_every: int = EMBED_EVERY,
        embed_fraction: float = EMBED_FRACTION,
    ) -> None:
        super().__init__(
            model, warmup=warmup, modes=modes, threshold=threshold, samples=samples, seed=seed
        )
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
        self._params = [p for _, p in named_float_params(model)]
        self._masks = [
            torch.zeros(p.shape, dtype=torch.bool, device=p.device) for p in self._params
        ]
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
            self._masks[i].copy_(
                torch.from_numpy(emb.reshape(self.shapes[i])).to(self._masks[i].device)
            )
            if emb.any():
                self._mask_gradient(i)
                sel = off + np.flatnonzero(emb)
                self._follow.append((i, sel, self.fit.mode[sel].astype(np.int64)))
        self.apply()

    def _ref_values(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(
                [
                    self._params[i].detach().reshape(-1)[j].to("cpu", torch.float64)
                    for i, j in self._ref_pos
                ]
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
            v[e] = (self.a_frozen[e] * self._r_now[self.fit.mode[e]] + self.b_frozen[e]).astype(
                np.float32
            )
        return v

    def remove(self) -> None:
        """Detach the optimiser hook (the gradient hooks stay, with empty masks)."""
        self._hook.remove()
        for m in self._masks:
            m.zero_()
        self.embedded[:] = False
        self._follow = []

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

Layout: :mod:`pipeline.online.memory` (:class:`OnlineCMD`, the running fit in memory),
:mod:`pipeline.online.embedded` (:class:`EmbeddedCMD`), :mod:`pipeline.online.store_backed`
(the running sums in a store, client side; their Zarr I/O is :mod:`pipeline.store.online`,
their Dask tasks :mod:`pipeline.graph.online`), :mod:`pipeline.online.lightning`
(:func:`lightning_callback`). The per-parameter math is :mod:`pipeline.kernels.online`.
"""

from pipeline.online.embedded import EmbeddedCMD
from pipeline.online.lightning import lightning_callback
from pipeline.online.memory import MIN_WARMUP, OnlineCMD
from pipeline.online.store_backed import StoreRunningFit

__all__ = ["MIN_WARMUP", "EmbeddedCMD", "OnlineCMD", "StoreRunningFit", "lightning_callback"]

"""DMD reconstructions of a trajectory: the whole network, and per-node Koopman operators.

Owns the weights that exact DMD of rank r gives back for every epoch of a trajectory W
(N parameters x T epochs), in the two forms of the CMD paper (002 §2, figs 5b, 5c, 22):

- **full** (:func:`full_dmd`): one operator for all N parameters, built from the T x T Gram
  by :func:`pipeline.kernels.baselines.dmd_model` (the DMD of ``cmd-pipeline bench``);
- **node** (:func:`node_dmd`): the "Koopman node operator" of Dogra and Redman (the paper's
  [27]): the parameters are grouped by the node they feed (row j of a layer's weight and
  element j of its bias) and each group gets its own DMD of rank ``min(r, its size, T - 1)``.

Both reconstruct ``x_t = Phi diag(Lambda^t) b`` with amplitudes fitted to the first
snapshot, i.e. the real part ``X2 K`` of :class:`~pipeline.kernels.baselines.DMDModel`.
Arrays in, arrays out: no store, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.kernels.baselines import dmd_model, gram_sqrt

__all__ = ["full_dmd", "node_dmd", "node_groups"]


def _dmd(w: np.ndarray, rank: int) -> tuple[np.ndarray, int]:
    """Exact DMD of rank ``rank`` of the rows of ``w`` (rows x T): the reconstruction and the
    rank kept."""
    g = w.T @ w
    model = dmd_model(g, gram_sqrt(g), rank)
    return w[:, 1:] @ model.k, model.effective_rank


def full_dmd(w: np.ndarray, rank: int) -> tuple[np.ndarray, int]:
    """The whole-network DMD reconstruction of ``w`` (N x T, float64) at rank ``rank``.

    Returns the (N, T) reconstruction and the effective rank (capped at T - 1 and at the
    numerical rank of the first T - 1 snapshots).

    >>> t = np.arange(6.0)
    >>> w = np.stack([0.9**t, 2 * 0.9**t + 0.5**t, 0.5**t])  # two exponential modes
    >>> rec, r = full_dmd(w, 2)
    >>> r, bool(np.allclose(rec, w))
    (2, True)
    """
    return _dmd(np.asarray(w, dtype=np.float64), rank)


def node_groups(tensors: Sequence[tuple[str, int, tuple[int, ...]]]) -> np.ndarray:
    """A node id for every row of the trajectory, from its tensors ``(name, offset, shape)``.

    Row j of the first axis of ``<module>.weight`` and element j of ``<module>.bias`` (any
    tensor of the same module with that first axis) are node ``(module, j)``.

    >>> node_groups([("fc.weight", 0, (2, 3)), ("fc.bias", 6, (2,))]).tolist()
    [0, 0, 0, 1, 1, 1, 0, 1]
    """
    n = sum(int(np.prod(s)) for _, _, s in tensors)
    out = np.empty(n, dtype=np.int64)
    ids: dict[tuple[str, int], int] = {}
    for name, offset, shape in tensors:
        module = name.rsplit(".", 1)[0]
        size = int(np.prod(shape))
        rows = shape[0] if shape else 1
        per = size // rows
        for j in range(rows):
            key = (module, j)
            node = ids.setdefault(key, len(ids))
            out[offset + j * per : offset + (j + 1) * per] = node
    return out


def node_dmd(w: np.ndarray, nodes: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """Per-node DMD of ``w`` (N x T): each node's rows get their own operator of rank
    ``min(rank, node size, T - 1)``. Returns the reconstruction and the mean effective rank
    over the nodes.

    >>> t = np.arange(6.0)
    >>> w = np.stack([0.9**t, 2 * 0.9**t, 0.5**t, 3 * 0.5**t])
    >>> rec, r = node_dmd(w, np.array([0, 0, 1, 1]), 5)
    >>> r, bool(np.allclose(rec, w))
    (1.0, True)
    """
    w = np.asarray(w, dtype=np.float64)
    rec = np.empty_like(w)
    ranks = []
    order = np.argsort(nodes, kind="stable")
    bounds = np.flatnonzero(np.diff(nodes[order])) + 1
    for rows in np.split(order, bounds):
        rec[rows], r = _dmd(w[rows], rank)
        ranks.append(r)
    return rec, float(np.mean(ranks))

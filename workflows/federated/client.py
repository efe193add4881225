"""One federated client: local data, local model, and its copy of the embedding state.

Owns :class:`Client`: decoding downloads, local SGD that keeps embedded parameters on
``a * r + b``, and uploads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflows.federated.config import FedConfig
from workflows.federated.data import _seed_of
from workflows.federated.messages import Download, _affine, _decode_new
from workflows.federated.weights import _params, get_flat, set_flat

__all__ = ["Client"]


class Client:
    """One client: its data, a local model, and its copy of the embedding state.

    The embedding state (which parameters are embedded, their ``a, b``, mode, and the
    reference positions) is built only from the :class:`EmbedUpdate` messages received.
    """

    def __init__(self, cid: int, x: Tensor, y: Tensor, model: nn.Module, config: FedConfig) -> None:
        self.cid = cid
        self.x, self.y = x, y
        self.model = model
        self.config = config
        self.params = _params(model)
        self.n_params = sum(p.numel() for p in self.params)
        n = self.n_params
        self.embedded = np.zeros(n, dtype=bool)
        self.a = np.zeros(n)
        self.b = np.zeros(n)
        self.mode = np.zeros(n, dtype=np.int64)
        self.ref_index: np.ndarray | None = None
        self._emb_idx = np.empty(0, dtype=np.int64)
        self._masks = [torch.zeros(p.shape, dtype=torch.bool) for p in self.params]
        for p, m in zip(self.params, self._masks, strict=True):
            p.register_hook(lambda g, m=m: g.masked_fill(m, 0.0))

    @property
    def n_samples(self) -> int:
        return int(self.x.shape[0])

    def receive(self, msg: Download) -> None:
        """Apply an embedding update if any, then rebuild the whole model from the message."""
        if msg.embed is not None:
            e = msg.embed
            if e.ref_index is not None:
                self.ref_index = e.ref_index.astype(np.int64)
            new = _decode_new(np.flatnonzero(~self.embedded), e.mask, e.index)
            self.embedded[new] = True
            self.a[new] = e.a.astype(np.float64)
            self.b[new] = e.b.astype(np.float64)
            self.mode[new] = e.mode.astype(np.int64)
            self._emb_idx = np.flatnonzero(self.embedded)
            off = 0
            for p, m in zip(self.params, self._masks, strict=True):
                k = p.numel()
                m.copy_(torch.from_numpy(self.embedded[off : off + k].reshape(p.shape)))
                off += k
        flat = np.empty(self.n_params, dtype=np.float32)
        if msg.values.size != self.n_params - self._emb_idx.size:
            raise ValueError("download size does not match the client's embedding state")
        flat[~self.embedded] = msg.values
        if self._emb_idx.size:
            flat[self._emb_idx] = self.embedded_values(flat)
        set_flat(self.model, flat)

    def embedded_values(self, flat: np.ndarray) -> np.ndarray:
        """``a * r + b`` (float32) of the embedded parameters, from the references in ``flat``."""
        assert self.ref_index is not None
        e = self._emb_idx
        return _affine(self.a[e], self.b[e], self.mode[e], flat[self.ref_index])

    @torch.no_grad()
    def _follow(self, opt: torch.optim.Optimizer) -> None:
        """After a step: embedded parameters back on ``a * r + b``, their momentum zeroed."""
        if not self._emb_idx.size:
            return
        flat = get_flat(self.model)
        flat[self._emb_idx] = self.embedded_values(flat)
        set_flat(self.model, flat)
        for p, m in zip(self.params, self._masks, strict=True):
            for v in opt.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.masked_fill_(m, 0.0)

    def train(self, seed: int, round_: int) -> float:
        """``local_epochs`` of SGD on the client's data; the mean mini-batch loss."""
        cfg = self.config
        self.model.train()
        opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        gen = torch.Generator().manual_seed(_seed_of(seed, round_, self.cid, 0xC1))
        n = self.n_samples
        total = 0.0
        for _ in range(cfg.local_epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.model(self.x[idx]), self.y[idx])
                loss.backward()
                opt.step()
                self._follow(opt)
                total += loss.item() * idx.numel()
        return total / (n * cfg.local_epochs)

    def upload(self) -> np.ndarray:
        """Client to server: the non-embedded parameters, float32."""
        return get_flat(self.model)[~self.embedded]

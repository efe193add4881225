"""The server side of one federated run: one method on one seed.

Owns :class:`Federation`: building the global model and the clients, each round's
download, local training, upload and weighted aggregation, the server-side Embedded CMD
and the per-round byte accounting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.online import EmbeddedCMD
from workflows.digits import evaluate, load_digits_split
from workflows.federated.client import Client
from workflows.federated.config import METHODS, FedConfig, Method, _build_model
from workflows.federated.data import partition
from workflows.federated.messages import Download, EmbedUpdate, _encode_new, _uint_for
from workflows.federated.weights import _params, get_flat, set_flat

__all__ = ["Federation"]


class Federation:
    """One method ("fedavg" or "cmd") on one seed; :meth:`run_round` advances one round."""

    def __init__(
        self,
        config: FedConfig,
        seed: int,
        method: Method,
        data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        parts: list[np.ndarray] | None = None,
        model_factory: Callable[[], nn.Module] | None = None,
    ) -> None:
        """``data`` (train and test tensors, default: the digits of ``seed``), ``parts``
        (the clients' sample indices, default: :func:`partition` of ``data``) and
        ``model_factory`` (builds one untrained model, default: the model ``config`` names)
        let the same federation run on another data set and model."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        self.config, self.seed, self.method = config, seed, method
        self.x_train, self.y_train, self.x_test, self.y_test = data or load_digits_split(seed)
        if parts is None:
            parts = partition(
                self.y_train.numpy(),
                config.clients,
                alpha=config.alpha,
                seed=seed,
                min_size=config.min_client_size,
            )
        self.parts = parts
        build = model_factory or (lambda: _build_model(config))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build()
            self.clients = [
                Client(
                    k,
                    self.x_train[torch.from_numpy(p)],
                    self.y_train[torch.from_numpy(p)],
                    build(),
                    config,
                )
                for k, p in enumerate(parts)
            ]
        self.n_params = sum(p.numel() for p in _params(self.model))
        sizes = np.array([c.n_samples for c in self.clients], dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self.cmd: EmbeddedCMD | None = None
        if method == "cmd":
            dummy = torch.optim.SGD(self.model.parameters(), lr=0.0)  # the server never steps
            self.cmd = EmbeddedCMD(
                self.model,
                dummy,
                warmup=config.warmup,
                modes=config.modes,
                samples=config.samples,
                seed=seed,
                embed_every=config.embed_every,
                embed_fraction=config.embed_fraction,
            )
        self.round = 0
        self._sent_embedded = np.zeros(self.n_params, dtype=bool)  # what clients know
        self._sent_refs = False
        self.ab_rounding_max_abs = 0.0
        self.cum_bytes = 0
        self.history: list[dict[str, Any]] = []

    @property
    def embedded(self) -> np.ndarray:
        return self.cmd.embedded if self.cmd is not None else self._sent_embedded

    def _download(self) -> Download:
        flat = get_flat(self.model)
        embed = None
        if self.cmd is not None:
            new = np.flatnonzero(self.cmd.embedded & ~self._sent_embedded)
            if new.size:
                assert self.cmd.fit is not None and self.cmd.ref_index is not None
                ab = np.dtype(self.config.ab_dtype)
                mask, index = _encode_new(np.flatnonzero(~self._sent_embedded), new, self.n_params)
                embed = EmbedUpdate(
                    mask=mask,
                    index=index,
                    a=self.cmd.a_frozen[new].astype(ab),
                    b=self.cmd.b_frozen[new].astype(ab),
                    mode=self.cmd.fit.mode[new].astype(_uint_for(max(self.cmd.n_modes - 1, 0))),
                    ref_index=None
                    if self._sent_refs
                    else self.cmd.ref_index.astype(_uint_for(self.n_params - 1)),
                )
                self._sent_embedded[new] = True
                self._sent_refs = True
        return Download(values=flat[~self._sent_embedded], embed=embed)

    def _freeze_wire_ab(self, new: np.ndarray) -> None:
        """Round the newly frozen (a, b) to the wire type, so the server uses what it sends."""
        cmd = self.cmd
        if self.config.ab_dtype == "float64" or not new.size:
            return
        assert cmd is not None and cmd.fit is not None and cmd.ref_index is not None
        r = get_flat(self.model)[cmd.ref_index].astype(np.float64)[cmd.fit.mode[new]]
        before = (cmd.a_frozen[new] * r + cmd.b_frozen[new]).astype(np.float32)
        cmd.a_frozen[new] = cmd.a_frozen[new].astype(np.float32).astype(np.float64)
        cmd.b_frozen[new] = cmd.b_frozen[new].astype(np.float32).astype(np.float64)
        after = (cmd.a_frozen[new] * r + cmd.b_frozen[new]).astype(np.float32)
        diff = float(np.max(np.abs(after.astype(np.float64) - before)))
        self.ab_rounding_max_abs = max(self.ab_rounding_max_abs, diff)
        cmd.apply()

    def run_round(self, check: Callable[[Federation], None] | None = None) -> dict[str, Any]:
        """Download, local training, upload, aggregation, server-side CMD; one record."""
        self.round += 1
        msg = self._download()
        server_flat = get_flat(self.model)
        down = msg.nbytes
        embed_bytes = msg.embed.nbytes if msg.embed is not None else 0
        up = 0
        total = np.zeros(int((~self._sent_embedded).sum()), dtype=np.float64)
        full = np.zeros(self.n_params, dtype=np.float64)
        losses = []
        for k, client in enumerate(self.clients):
            client.receive(msg)
            if not np.array_equal(get_flat(client.model), server_flat):
                raise RuntimeError(f"client {k} did not rebuild the global model from the message")
            losses.append(client.train(self.seed, self.round))
            values = client.upload()
            up += values.nbytes
            total += self.weights[k] * values.astype(np.float64)
            if self._sent_embedded.any():  # diagnostic only, never sent: the full average
                full += self.weights[k] * get_flat(client.model).astype(np.float64)
        if check is not None:
            check(self)  # the clients' models after local training, before aggregation
        flat = server_flat.copy()
        flat[~self._sent_embedded] = total.astype(np.float32)
        set_flat(self.model, flat)
        new_count = 0
        emb_diff = 0.0
        if self.cmd is not None:
            self.cmd.apply()  # embedded parameters from the averaged references
            e = self._sent_embedded
            if e.any():  # exactness note 1: the same as averaging the clients' a r_k + b
                diff = np.abs(get_flat(self.model)[e].astype(np.float64) - full[e])
                emb_diff = float(diff.max())
            before = self.cmd.embedded.copy()
            self.cmd.update(self.model)
            new = np.flatnonzero(self.cmd.embedded & ~before)
            new_count = int(new.size)
            self._freeze_wire_ab(new)
        test_loss, test_acc = evaluate(self.model, self.x_test, self.y_test)
        k = len(self.clients)
        nbytes = k * down + up  # the same download to each client; up: summed over clients
        self.cum_bytes += nbytes
        rec = {
            "round": self.round,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "train_loss": float(np.dot(self.weights, losses)),
            "bytes": nbytes,
            "bytes_down": k * down,
            "bytes_up": up,
            "bytes_embed_msg": k * embed_bytes,
            "cum_bytes": self.cum_bytes,
            "embedded_fraction": float(self.embedded.mean()),
            "n_embedded": int(self.embedded.sum()),
            "n_newly_embedded": new_count,
            "embedded_vs_full_average_max_abs": emb_diff,
        }
        self.history.append(rec)
        return rec

    def run(self, on_round: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        while self.round < self.config.rounds:
            rec = self.run_round()
            if on_round is not None:
                on_round(rec)
        return self.history

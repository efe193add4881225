"""Federated learning on the digits data: FedAvg against FedAvg with Embedded CMD.

Tests the claim of ALGORITHM.md ("Embedded CMD"): *in federated learning this cuts
communication: embedded parameters need no transfer, only the references and the rest do*.

Simulation
----------
K clients each hold a disjoint part of the digits training set (:func:`partition`: an IID
split, or a non-IID split of every class over the clients with Dirichlet(alpha) proportions;
both seeded). One global model lives on the server. Every round, every client downloads the
global model, trains ``local_epochs`` epochs of SGD with momentum on its own data (a fresh
optimiser every round: clients are stateless, nothing about optimiser state is ever sent),
and uploads its weights; the server averages them weighted by partition size (float64 sum,
rounded once to float32). Both methods run the same code with the same seeds: same initial
model, same partitions, same mini-batch order per (seed, round, client).

- **fedavg**: every round each client downloads and uploads all N float32 parameters:
  ``2 x K x 4 x N`` bytes per round.
- **cmd**: the server runs :class:`pipeline.online.EmbeddedCMD` on the *global* model, one
  update per round (a round is CMD's "epoch"): ``warmup`` rounds recorded, then the modes,
  the references and every parameter's mode are fixed; every ``embed_every`` rounds the
  ``embed_fraction`` of the not-yet-embedded parameters whose fit moved least are embedded,
  their ``(a, b)`` frozen. Embedded parameters are never sent again: a client downloads
  only the non-embedded parameters (the M references are non-embedded parameters, so they
  are in that vector, counted once) and uploads only the non-embedded parameters. The
  download of the round after an embedding also carries, once, what a client needs to
  follow the newly embedded parameters (:class:`EmbedUpdate`): which parameters (a bit mask
  over the client's non-embedded positions, or their indices in the smallest unsigned
  type, whichever is smaller), their ``a`` and ``b`` (float32 by default, ``--ab-dtype``),
  their mode (the smallest unsigned type that holds M-1: uint8 for M <= 256), and with the
  first embedding only, the positions of the M references (smallest unsigned type for N).
  On a client, a :class:`Client` keeps its embedded parameters on ``a * r + b``: their
  gradients are masked, their momentum zeroed, and after every optimiser step they are
  recomputed from the client's *live* reference values. The server, after averaging the
  non-embedded parameters, recomputes its embedded parameters from the averaged references.

Bytes are the sizes of the numpy arrays actually handed from server to client and back
(every message is built, "sent" and decoded: a client rebuilds its whole model from what it
received). A broadcast is counted once per client; no protocol overhead, no compression.
Per round the records hold: the global model's test loss and accuracy after aggregation,
the bytes of that round (down, up, and the one-time embedding part) and cumulated, and the
embedded fraction at the end of the round (an embedding decided in round t takes effect on
the clients with the download of round t + 1).

What is exact, and what is not
------------------------------
1. *Aggregation loses nothing.* On every client, after its last step, every embedded
   parameter is ``a * r_k + b`` (r_k its own references); FedAvg's weights sum to one, so
   ``sum_k p_k (a r_k + b) = a (sum_k p_k r_k) + b``: averaging the clients' embedded
   parameters and recomputing them from the averaged references give the same global model
   in exact arithmetic. In floating point they differ only by the float32 rounding of each
   client's ``a r_k + b`` before the average (a few ulp); the server's value is the single
   rounding of ``a r + b`` from the averaged (float32) references. So not uploading
   embedded parameters changes nothing beyond rounding; the approximation is the embedding
   itself (those parameters are confined to ``a r + b`` during local training), the same
   approximation as centralised Embedded CMD.
2. *Clients and server agree bit for bit.* Both evaluate ``a * r + b`` in float64 from the
   same float32 references and the same ``(a, b)`` and round to float32. With
   ``--ab-dtype float32`` the server rounds its frozen ``a, b`` (``EmbeddedCMD.a_frozen``,
   ``b_frozen``) to float32 right after each embedding, so it uses exactly the values it
   sends; the largest change this makes to an embedded weight is recorded
   (``ab_rounding_max_abs``). Every download is checked: the model a client rebuilds from
   the message is bitwise the server's global model (else the run stops).
3. *The fit is the global trajectory's.* ``(a, b)`` are the exact least-squares fit of each
   parameter against its reference over the global models of rounds ``[warmup, t]``
   (:class:`pipeline.kernels.online.RunningFit`); the server has these models anyway, so
   fitting costs no communication. Clients never see the fit, only the frozen ``(a, b)``.
   With non-IID clients a client's local drift need not follow the global correlations;
   its embedded parameters follow them regardless (by construction).
4. *What is not counted or simulated*: client sampling, stragglers, secure aggregation,
   compression/quantisation of the float32 payload, message headers.
5. During the warm-up and until the first embedding, the two methods are the same
   computation: accuracy and bytes coincide exactly. The round that carries the first
   embedding message can cost more than a FedAvg round (``a, b``, mode and which-mask for
   each newly embedded parameter weigh more than the 8 bytes it saves per client that
   round); from then on every round is cheaper.

Determinism: every random choice derives from the seed (numpy ``SeedSequence`` and torch
generators); results are identical for the same torch build and thread count (the CLI runs
torch on one intra-op thread unless ``--threads`` says otherwise, and restores it after).

Example (the default run: 5 clients, 40 rounds, MLP, IID, 3 seeds)::

    python -m workflows.federated --out runs/federated
    python -m workflows.federated --out runs/federated_noniid --alpha 0.5
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.online import EmbeddedCMD
from workflows.digits import MLP, N_CLASSES, SimpleCNN, evaluate, load_digits_split

__all__ = [
    "Client",
    "Download",
    "EmbedUpdate",
    "FedConfig",
    "Federation",
    "format_table",
    "main",
    "partition",
    "plot",
    "run_experiment",
    "run_seed",
    "summarise",
]

Method = Literal["fedavg", "cmd"]
METHODS: tuple[Method, ...] = ("fedavg", "cmd")
FLOAT_BYTES = 4  # the parameters travel as float32


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FedConfig:
    """Configuration of one federated experiment (both methods, one seed at a time).

    Parameters
    ----------
    clients : int
        K, the number of clients (all take part in every round).
    rounds : int
        Communication rounds.
    local_epochs : int
        Passes of each client over its own data per round.
    model : {"mlp", "cnn"}
        :class:`workflows.digits.MLP` or :class:`workflows.digits.SimpleCNN`.
    hidden : int
        Hidden width of the model.
    alpha : float or None
        None: IID split; else the Dirichlet concentration of the non-IID label split.
    lr, momentum, batch_size
        Client SGD.
    warmup, embed_every, embed_fraction, modes, samples
        Server-side :class:`pipeline.online.EmbeddedCMD` (rounds are its epochs).
    ab_dtype : {"float32", "float64"}
        Wire type of the frozen ``a, b``.
    min_client_size : int
        The non-IID split is redrawn (seeded) until every client holds this many samples.
    """

    clients: int = 5
    rounds: int = 40
    local_epochs: int = 1
    model: Literal["mlp", "cnn"] = "mlp"
    hidden: int = 64
    alpha: float | None = None
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    warmup: int = 8
    embed_every: int = 4
    embed_fraction: float = 0.1
    modes: int = 10
    samples: int = 1000
    ab_dtype: Literal["float32", "float64"] = "float32"
    min_client_size: int = 10

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError("clients must be >= 1")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError("rounds and local_epochs must be >= 1")
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"model must be 'mlp' or 'cnn', got {self.model!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError("alpha must be > 0")
        if self.warmup < 3 or self.embed_every < 1 or not 0 < self.embed_fraction <= 1:
            raise ValueError("need warmup >= 3, embed_every >= 1, 0 < embed_fraction <= 1")
        if self.ab_dtype not in ("float32", "float64"):
            raise ValueError("ab_dtype must be 'float32' or 'float64'")


def _build_model(config: FedConfig) -> nn.Module:
    return MLP(hidden=config.hidden) if config.model == "mlp" else SimpleCNN(hidden=config.hidden)


def _seed_of(*keys: int) -> int:
    """A 32-bit seed derived from integer keys (independent streams per key tuple)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def _uint_for(max_value: int) -> np.dtype:
    """The smallest unsigned integer type holding ``0..max_value``."""
    for t in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.uint64)


# ---------------------------------------------------------------------------- data


def partition(
    labels: np.ndarray,
    clients: int,
    *,
    alpha: float | None,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split sample indices over clients: disjoint, covering, sorted, seeded.

    ``alpha=None``: a random permutation cut into ``clients`` near-equal parts (IID).
    Else, for every class, its samples (shuffled) are cut with proportions drawn from
    Dirichlet(alpha, ..., alpha); the draw is repeated until every client holds at least
    ``min_size`` samples.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(_seed_of(seed, 0xFED))
    n = labels.size
    if alpha is None:
        return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            prop = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(prop)[:-1] * idx.size).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(p.size for p in out) >= min_size:
            return out
    raise ValueError(f"no Dirichlet({alpha}) split gives every client {min_size} samples")


# ------------------------------------------------------------------------ messages


@dataclass
class EmbedUpdate:
    """What a client needs, once, to follow newly embedded parameters."""

    mask: np.ndarray | None  # packed bits over the client's non-embedded positions, or
    index: np.ndarray | None  # the new positions (smallest unsigned type): one of the two
    a: np.ndarray
    b: np.ndarray
    mode: np.ndarray  # smallest unsigned type for M - 1
    ref_index: np.ndarray | None = None  # only with the first embedding

    def arrays(self) -> list[np.ndarray]:
        out = [self.a, self.b, self.mode]
        out += [x for x in (self.mask, self.index, self.ref_index) if x is not None]
        return out

    @property
    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in self.arrays()))


@dataclass
class Download:
    """Server to client: the non-embedded parameters (float32), maybe an embedding update."""

    values: np.ndarray
    embed: EmbedUpdate | None = None

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) + (self.embed.nbytes if self.embed is not None else 0)


def _encode_new(free: np.ndarray, new: np.ndarray, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Which of the ``free`` positions are ``new``: a bit mask or an index list, the smaller."""
    mask = np.packbits(np.isin(free, new))
    index = new.astype(_uint_for(n - 1))
    return (mask, None) if mask.nbytes <= index.nbytes else (None, index)


def _decode_new(free: np.ndarray, mask: np.ndarray | None, index: np.ndarray | None) -> np.ndarray:
    if mask is not None:
        return free[np.unpackbits(mask, count=free.size).astype(bool)]
    assert index is not None
    return index.astype(np.int64)


def _affine(a: np.ndarray, b: np.ndarray, mode: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``a * r[mode] + b`` in float64, rounded to float32: EmbeddedCMD.apply's arithmetic."""
    return (a * r.astype(np.float64)[mode] + b).astype(np.float32)


# -------------------------------------------------------------------- flat weights


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.dtype.is_floating_point]


def get_flat(model: nn.Module) -> np.ndarray:
    """All floating-point parameters, flat float32 (a copy), in ``model.parameters()`` order."""
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in _params(model)]).numpy().copy()


def set_flat(model: nn.Module, flat: np.ndarray) -> None:
    """Write a flat float32 vector into the parameters (the inverse of :func:`get_flat`)."""
    off = 0
    with torch.no_grad():
        for p in _params(model):
            k = p.numel()
            p.copy_(torch.from_numpy(np.ascontiguousarray(flat[off : off + k])).reshape(p.shape))
            off += k
    if off != flat.size:
        raise ValueError(f"{flat.size} values for {off} parameters")


# ------------------------------------------------------------------------- clients


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


# -------------------------------------------------------------------------- server


class Federation:
    """One method ("fedavg" or "cmd") on one seed; :meth:`run_round` advances one round."""

    def __init__(
        self,
        config: FedConfig,
        seed: int,
        method: Method,
        data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        parts: list[np.ndarray] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        self.config, self.seed, self.method = config, seed, method
        self.x_train, self.y_train, self.x_test, self.y_test = data or load_digits_split(seed)
        if parts is None:
            parts = partition(
                self.y_train.numpy(), config.clients, alpha=config.alpha, seed=seed,
                min_size=config.min_client_size,
            )
        self.parts = parts
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = _build_model(config)
            self.clients = [
                Client(k, self.x_train[torch.from_numpy(p)], self.y_train[torch.from_numpy(p)],
                       _build_model(config), config)
                for k, p in enumerate(parts)
            ]
        self.n_params = sum(p.numel() for p in _params(self.model))
        sizes = np.array([c.n_samples for c in self.clients], dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self.cmd: EmbeddedCMD | None = None
        if method == "cmd":
            dummy = torch.optim.SGD(self.model.parameters(), lr=0.0)  # the server never steps
            self.cmd = EmbeddedCMD(
                self.model, dummy, warmup=config.warmup, modes=config.modes,
                samples=config.samples, seed=seed, embed_every=config.embed_every,
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
                    mask=mask, index=index,
                    a=self.cmd.a_frozen[new].astype(ab), b=self.cmd.b_frozen[new].astype(ab),
                    mode=self.cmd.fit.mode[new].astype(_uint_for(max(self.cmd.n_modes - 1, 0))),
                    ref_index=None if self._sent_refs else
                    self.cmd.ref_index.astype(_uint_for(self.n_params - 1)),
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


# ------------------------------------------------------------------------ experiment


def run_seed(
    config: FedConfig, seed: int, on_round: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Both methods on one seed (same data, partitions and initial model)."""
    data = load_digits_split(seed)
    y = data[1].numpy()
    parts = partition(y, config.clients, alpha=config.alpha, seed=seed, min_size=config.min_client_size)
    out: dict[str, Any] = {
        "seed": seed,
        "partition_sizes": [int(p.size) for p in parts],
        "label_histograms": [np.bincount(y[p], minlength=N_CLASSES).tolist() for p in parts],
    }
    for method in METHODS:
        fed = Federation(config, seed, method, data=data, parts=parts)
        init_loss, init_acc = evaluate(fed.model, fed.x_test, fed.y_test)
        t0 = time.perf_counter()
        log: Callable[[dict[str, Any]], None] | None = None
        if on_round is not None:
            def log(rec: dict[str, Any], m: str = method) -> None:
                on_round(m, rec)
        fed.run(log)
        res: dict[str, Any] = {
            "initial": {"test_loss": init_loss, "test_acc": init_acc},
            "rounds": fed.history,
            "seconds": time.perf_counter() - t0,
        }
        if fed.cmd is not None:
            res["n_modes"] = fed.cmd.n_modes
            res["ab_rounding_max_abs"] = fed.ab_rounding_max_abs
            res["embedded_vs_full_average_max_abs"] = max(
                r["embedded_vs_full_average_max_abs"] for r in fed.history
            )
        out[method] = res
        out["n_params"] = fed.n_params
    return out


def _mean_std(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over seeds: final and best accuracy, total bytes, bytes ratio cmd/fedavg (mean, std
    with ddof=1)."""
    out: dict[str, Any] = {}
    for m in METHODS:
        out[m] = {
            "final_acc": _mean_std([r[m]["rounds"][-1]["test_acc"] for r in runs]),
            "best_acc": _mean_std([max(x["test_acc"] for x in r[m]["rounds"]) for r in runs]),
            "final_loss": _mean_std([r[m]["rounds"][-1]["test_loss"] for r in runs]),
            "total_bytes": _mean_std([r[m]["rounds"][-1]["cum_bytes"] for r in runs]),
            "final_embedded_fraction": _mean_std([r[m]["rounds"][-1]["embedded_fraction"] for r in runs]),
        }
    out["bytes_ratio_cmd_over_fedavg"] = _mean_std(
        [r["cmd"]["rounds"][-1]["cum_bytes"] / r["fedavg"]["rounds"][-1]["cum_bytes"] for r in runs]
    )
    return out


def _pm(d: dict[str, float], scale: float = 1.0, fmt: str = ".4f") -> str:
    return f"{d['mean'] * scale:{fmt}} ± {d['std'] * scale:{fmt}}"


def format_table(result: dict[str, Any]) -> str:
    """The Markdown summary table and a per-round table (means over seeds)."""
    s = result["summary"]
    cfg = result["config"]
    split = "IID" if cfg["alpha"] is None else f"non-IID Dirichlet(alpha={cfg['alpha']})"
    seeds = result["seeds"]
    lines = [
        f"# Federated digits: FedAvg vs FedAvg + Embedded CMD ({cfg['model']}, "
        f"{result['n_params']} parameters)",
        "",
        f"{cfg['clients']} clients, {split}, {cfg['rounds']} rounds x {cfg['local_epochs']} local "
        f"epoch(s); CMD warm-up {cfg['warmup']} rounds, embed every {cfg['embed_every']} rounds, "
        f"{cfg['embed_fraction']:.0%} per check, {cfg['modes']} modes; a, b sent as "
        f"{cfg['ab_dtype']}; seeds {seeds} (mean ± std, ddof=1).",
        "",
        "| method | final acc | best acc | final loss | total MB | bytes vs FedAvg | embedded at end |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, name in (("fedavg", "FedAvg"), ("cmd", "FedAvg + Embedded CMD")):
        ratio = "1" if m == "fedavg" else _pm(s["bytes_ratio_cmd_over_fedavg"])
        lines.append(
            f"| {name} | {_pm(s[m]['final_acc'])} | {_pm(s[m]['best_acc'])} | "
            f"{_pm(s[m]['final_loss'])} | {_pm(s[m]['total_bytes'], 1e-6, '.3f')} | {ratio} | "
            f"{_pm(s[m]['final_embedded_fraction'], 1.0, '.3f')} |"
        )
    lines += [
        "",
        "Per round (means over seeds; MB = 1e6 bytes, both directions, all clients):",
        "",
        "| round | FedAvg acc | CMD acc | FedAvg MB | CMD MB | FedAvg cum MB | CMD cum MB | embedded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = result["runs"]
    for i in range(cfg["rounds"]):
        def mean(m: str, key: str, i: int = i) -> float:
            return float(np.mean([r[m]["rounds"][i][key] for r in runs]))

        lines.append(
            f"| {i + 1} | {mean('fedavg', 'test_acc'):.4f} | {mean('cmd', 'test_acc'):.4f} | "
            f"{mean('fedavg', 'bytes') * 1e-6:.4f} | {mean('cmd', 'bytes') * 1e-6:.4f} | "
            f"{mean('fedavg', 'cum_bytes') * 1e-6:.3f} | {mean('cmd', 'cum_bytes') * 1e-6:.3f} | "
            f"{mean('cmd', 'embedded_fraction'):.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against cumulative bytes, bytes per round, embedded fraction per round."""
    from matplotlib.figure import Figure

    runs = result["runs"]
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    ax_acc, ax_bytes, ax_emb = fig.subplots(1, 3)
    colours = {"fedavg": "tab:blue", "cmd": "tab:orange"}
    labels = {"fedavg": "FedAvg", "cmd": "FedAvg + Embedded CMD"}
    for m in METHODS:
        for r in runs:
            x = [0.0] + [rec["cum_bytes"] * 1e-6 for rec in r[m]["rounds"]]
            y = [r[m]["initial"]["test_acc"]] + [rec["test_acc"] for rec in r[m]["rounds"]]
            ax_acc.plot(x, y, color=colours[m], alpha=0.25, lw=0.8)
        x = np.mean([[0.0] + [rec["cum_bytes"] * 1e-6 for rec in r[m]["rounds"]] for r in runs], axis=0)
        y = np.mean(
            [[r[m]["initial"]["test_acc"]] + [rec["test_acc"] for rec in r[m]["rounds"]] for r in runs],
            axis=0,
        )
        ax_acc.plot(x, y, color=colours[m], lw=2, label=labels[m])
        rounds = np.arange(1, len(runs[0][m]["rounds"]) + 1)
        per = np.mean([[rec["bytes"] * 1e-6 for rec in r[m]["rounds"]] for r in runs], axis=0)
        ax_bytes.plot(rounds, per, color=colours[m], lw=2, label=labels[m])
    rounds = np.arange(1, len(runs[0]["cmd"]["rounds"]) + 1)
    emb = np.array([[rec["embedded_fraction"] for rec in r["cmd"]["rounds"]] for r in runs])
    ax_emb.plot(rounds, emb.mean(axis=0), color=colours["cmd"], lw=2, marker=".")
    ax_acc.set(xlabel="cumulative communication (MB)", ylabel="test accuracy (global model)",
               title="accuracy vs bytes (thin: seeds)")
    lo = min(min(rec["test_acc"] for rec in r[m]["rounds"]) for r in runs for m in METHODS)
    ax_acc.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax_acc.legend(loc="lower right")
    ax_bytes.set(xlabel="round", ylabel="MB per round (all clients)", title="communication per round")
    ax_bytes.set_ylim(bottom=0)
    ax_bytes.legend(loc="lower left")
    ax_emb.set(xlabel="round", ylabel="fraction of parameters embedded", title="embedded fraction",
               ylim=(0, 1))
    ax_emb.axvline(result["config"]["warmup"], color="grey", ls=":", lw=1)
    fig.savefig(path, dpi=120)


def run_experiment(
    config: FedConfig,
    seeds: Sequence[int],
    out: Path | str,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """All seeds, both methods; writes ``results.json``, ``table.md`` and ``federated.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:
        def on_round(m: str, rec: dict[str, Any], seed: int = seed) -> None:
            if log is not None:
                log(
                    f"seed {seed} {m:6s} round {rec['round']:3d}  acc {rec['test_acc']:.4f}  "
                    f"loss {rec['test_loss']:.4f}  MB {rec['bytes'] * 1e-6:.4f}  "
                    f"cum MB {rec['cum_bytes'] * 1e-6:.3f}  embedded {rec['embedded_fraction']:.3f}"
                )

        runs.append(run_seed(config, seed, on_round))
    n_params = runs[0]["n_params"]
    k = config.clients
    result: dict[str, Any] = {
        "workflow": "federated",
        "config": asdict(config),
        "seeds": list(seeds),
        "n_params": n_params,
        "wire": {
            "parameters": "float32",
            "a_b": config.ab_dtype,
            "mode": str(_uint_for(max(config.modes - 1, 0))),
            "which": "bit mask over non-embedded positions or "
            f"{_uint_for(n_params - 1)} indices, whichever is smaller",
            "ref_index": str(_uint_for(n_params - 1)) + ", once",
            "fedavg_bytes_per_round": 2 * k * FLOAT_BYTES * n_params,
        },
        "summary": summarise(runs),
        "runs": runs,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    table = format_table(result)
    (out / "table.md").write_text(table, encoding="utf-8")
    plot(result, out / "federated.png")
    return result


# ----------------------------------------------------------------------------- CLI


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"seeds must be integers: {text!r}") from exc
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workflows.federated --out DIR [options]``."""
    d = FedConfig()
    p = argparse.ArgumentParser(
        prog="python -m workflows.federated",
        description="Simulated federated learning on the digits: FedAvg against FedAvg with "
        "Embedded CMD (embedded parameters are not communicated).",
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--local-epochs", type=int, default=d.local_epochs)
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma separated (0,1,2)")
    p.add_argument("--model", choices=("mlp", "cnn"), default=d.model)
    p.add_argument("--hidden", type=int, default=d.hidden)
    split = p.add_mutually_exclusive_group()
    split.add_argument("--iid", action="store_true", help="IID split (the default)")
    split.add_argument("--alpha", type=float, default=None, help="non-IID Dirichlet(alpha) split")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--embed-every", type=int, default=d.embed_every)
    p.add_argument("--embed-fraction", type=float, default=d.embed_fraction)
    p.add_argument("--modes", type=int, default=d.modes)
    p.add_argument("--samples", type=int, default=d.samples)
    p.add_argument("--ab-dtype", choices=("float32", "float64"), default=d.ab_dtype)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads while running (default 1: these models are too small to "
        "gain from more, and spinning threads are slow on a busy machine); restored on exit",
    )
    p.add_argument("--quiet", action="store_true", help="no per-round log")
    args = p.parse_args(argv)
    try:
        config = FedConfig(
            clients=args.clients, rounds=args.rounds, local_epochs=args.local_epochs,
            model=args.model, hidden=args.hidden, alpha=args.alpha, lr=args.lr,
            momentum=args.momentum, batch_size=args.batch_size, warmup=args.warmup,
            embed_every=args.embed_every, embed_fraction=args.embed_fraction, modes=args.modes,
            samples=args.samples, ab_dtype=args.ab_dtype,
        )
    except ValueError as exc:
        p.error(str(exc))
    if args.threads < 1:
        p.error("--threads must be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run_experiment(
            config, args.seeds, args.out,
            log=None if args.quiet else (lambda s: print(s, flush=True)),
        )
    finally:
        torch.set_num_threads(previous)
    print(format_table(result).split("\n\nPer round")[0], flush=True)
    print(f"done in {result['seconds']:.1f} s; wrote {args.out}/results.json, table.md, federated.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
